"""The documentation generated from the schema: README's configuration reference and `--help` text.

Both read the attribute docstrings of the groups (`schema.py`, `training.py`, `peft.py`: the single source of the docs) and the Literal types
(the single source of allowed values), so a new field or choice is documented everywhere by writing it once.
Everything here is cheap: `--help` must answer without importing torch.
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
import typing
from typing import Literal

from . import schema
from .checks import unwrap_optional
from .schema import GROUPS
from .sources import RECIPES

WIDTH = 100
INDENT = " " * 8


def field_docs() -> dict[str, dict[str, str]]:
    """{group: {field: docstring}} read from the groups' attribute docstrings (the single source of truth)."""
    by_class = {cls.__name__: group for group, cls in GROUPS.items()}
    modules = {sys.modules[cls.__module__] for cls in GROUPS.values()}
    nodes = [node for module in modules for node in ast.parse(inspect.getsource(module)).body]
    docs: dict = {group: {} for group in GROUPS}
    for node in nodes:
        if isinstance(node, ast.ClassDef) and node.name in by_class:
            group = docs[by_class[node.name]] = {}
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    doc = (nxt.value.value if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                           and isinstance(nxt.value.value, str) else "")
                    group[stmt.target.id] = " ".join(doc.split())
    return docs


def choices(tp) -> tuple:
    """The allowed values of a Literal field (Optional or not); () for any other type."""
    tp = unwrap_optional(tp)[0]
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


def default_text(value) -> str:
    return "none" if value is None or value == [] else str(value)


def _defaults() -> dict:
    return {group: cls() for group, cls in GROUPS.items()}


def reference_markdown() -> str:
    """The configuration reference in README.md: `python -m scaletune.config` prints it."""
    lines = []
    defaults = _defaults()
    for group, fields_ in field_docs().items():
        lines += [f"#### {group}", "", "| key | default | meaning |", "|---|---|---|"]
        for name, doc in fields_.items():
            allowed = choices(schema.FIELD_TYPE[name])
            if allowed:
                doc = f"{doc} One of {', '.join(f'`{c}`' for c in allowed)}."
            default = default_text(getattr(defaults[group], name))
            lines.append(f"| `{name}` | `{default}` | {doc.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def metavar(tp) -> str:
    """How `--help` shows a field's value, as argparse would: INT, FLOAT, STR, {a,b,c}, [BOOL]."""
    allowed = choices(tp)
    if allowed:
        return "{" + ",".join(allowed) + "}"
    tp = unwrap_optional(tp)[0]
    if tp is bool:
        return "[BOOL]"  # a bare flag means true
    return {int: "INT", float: "FLOAT"}.get(tp, "STR")


def _option(flag: str, doc: str, default: str | None) -> list[str]:
    # An unset optional's meaning is in its docstring ("Default: loss"), which a bare "none" would contradict.
    if default == "none" and "default" in doc.lower():
        default = None
    text = doc + (f" (default: {default})" if default is not None else "")
    return [f"  {flag}", *textwrap.wrap(text, WIDTH, initial_indent=INDENT, subsequent_indent=INDENT)]


def help_text(prog: str = "scaletune.train") -> str:
    """`python -m scaletune.train --help`: every config key, grouped (predict's is `function_help`)."""
    if prog != "scaletune.train":
        raise ValueError(f"no help text for {prog!r}; commands that mirror a function use function_help.")
    recipes = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
    lines = [
        "usage: python -m scaletune.train [CONFIG] [--key value ...]",
        "       accelerate launch [launcher options] -m scaletune.train [CONFIG] [--key value ...]",
        "       ./launch PRESET [launcher options] [CONFIG] [--key value ...]",
        "",
        "Fine-tune a pretrained model with Trainer semantics: train, evaluate, export the model and write",
        "predictions for the test split.",
        "",
        "Where the configuration comes from:",
        "  CONFIG        a YAML or JSON file (flat, or grouped under model:/data:/training:), or the name of",
        f"                a packaged recipe: {recipes}.",
        "  --key value   one option; given after CONFIG it overrides the file. Also --key=value. A boolean",
        "                option alone means true (--fp16); `none` unsets an optional one.",
        "  Neither: the offline `demo` recipe runs. Options only: every other key takes its default below.",
        "  From Python: scaletune.train.run(dict | path | list of CLI arguments).",
        "  Full reference: README.md (python -m scaletune.config prints it).",
    ]
    defaults = _defaults()
    for group, fields_ in field_docs().items():
        cls = GROUPS[group]
        about = cls.__doc__.strip().rstrip(".")
        lines += ["", f"{group} options ({cls.__name__}): {about[0].lower()}{about[1:]}"]
        for name, doc in fields_.items():
            flag = f"--{name} {metavar(schema.FIELD_TYPE[name])}"
            lines += _option(flag, doc, default_text(getattr(defaults[group], name)))
    return "\n".join(lines)


def function_help(prog: str, function, description: str, option_docs: dict[str, str]) -> str:
    """`--help` for a command that mirrors a function (`python -m scaletune.predict`): the first parameter is
    the positional argument, the others `--name` options; name, type and default come from the signature, the
    meaning from `option_docs`, else from the config field of the same name. The command passes its function
    in, so nothing here imports it (config stays below every command)."""
    hints = typing.get_type_hints(function)
    params = list(inspect.signature(function).parameters.values())
    docs = {name: d for group in field_docs().values() for name, d in group.items()}
    positional, options = params[0], params[1:]  # MODEL_DIR, then --name options
    usage = [positional.name.upper()] + [
        f"--{p.name} {metavar(hints[p.name])}" if p.default is inspect.Parameter.empty
        else f"[--{p.name} {metavar(hints[p.name])}]" for p in options]
    lines = textwrap.wrap(f"usage: python -m {prog} " + " ".join(usage), WIDTH,
                          subsequent_indent=" " * 7, break_on_hyphens=False)
    lines += ["", *textwrap.wrap(" ".join(description.split()), WIDTH), "", "positional arguments:"]
    lines += _option(positional.name.upper(), option_docs.get(positional.name, ""), None)
    lines += ["", "options:", "  -h, --help", f"{INDENT}Show this help and exit."]
    for p in options:
        required = p.default is inspect.Parameter.empty
        lines += _option(f"--{p.name} {metavar(hints[p.name])}",
                         (option_docs.get(p.name) or docs.get(p.name, "")) + (" Required." if required else ""),
                         None if required else default_text(p.default))
    return "\n".join(lines)
