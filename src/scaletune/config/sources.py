"""Where a config comes from: CLI flags, a YAML/JSON file, a Python dict, a packaged recipe, or a file plus
CLI overrides -- the sources `HfArgumentParser` users know -- turned into a validated `Config`.

Conversion is strict: a CLI string becomes the field's type only when it means exactly that value (`8` for
an int, never `8.7` or `true`), and a YAML/JSON value keeps its type, so `schema.py` rejects a boolean given
for a string instead of turning it into "True". Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import os
import typing
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import ConfigError
from .checks import suggestion, unwrap_optional
from .schema import FIELD_GROUP, FIELD_TYPE, GROUPS, Config

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# Older names people still type; mapped to the current TrainingArguments names.
ALIASES = {"evaluation_strategy": "eval_strategy", "block_size": "max_seq_length"}
RESOLVED_SECTION = "resolved"
"""The section of the output dir's config.yaml where a run records what it resolved from the data and the
machine (text columns, task, precision; scaletune.predict reads it). Not config: skipped when a file is read."""
TRUE_WORDS = ("true", "1", "yes", "y", "on")
FALSE_WORDS = ("false", "0", "no", "n", "off")

ConfigSource = Union[None, dict, str, os.PathLike, list, Config]


def load_config(source: ConfigSource = None, overrides: Optional[dict] = None) -> Config:
    """Build a validated Config from a dict, a YAML/JSON path or recipe name, or a list of CLI arguments.

    With no source at all, the embedded offline demo recipe is used.
    """
    if isinstance(source, Config):
        return source
    values: dict = {}
    if source is None or (isinstance(source, list) and not source):
        values = load_file(recipe_path("demo"))
    elif isinstance(source, list):
        config_file, cli = parse_cli([str(a) for a in source])
        # Flags alone start from the defaults, not the demo, as HfArgumentParser does.
        values = load_file(resolve_recipe(config_file)) if config_file is not None else {}
        values.update(cli)
    elif isinstance(source, dict):
        values = dict(source)
    else:
        values = load_file(resolve_recipe(str(source)))
    values.update(overrides or {})

    grouped: dict = {g: {} for g in GROUPS}
    for key, value in values.items():
        key = canonical_key(key)
        grouped[FIELD_GROUP[key]][key] = coerce(key, value)
    return Config(**{g: GROUPS[g](**kw) for g, kw in grouped.items()})


def canonical_key(key: str) -> str:
    """The field a user's key names (`--eval-strategy`, `evaluation_strategy` -> eval_strategy), or an error."""
    key = str(key).replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in FIELD_GROUP:
        hint = suggestion(key, FIELD_GROUP) or " See the configuration reference in README.md."
        raise ConfigError(f"Unknown config key {key!r}.{hint}")
    return key


def coerce(key: str, value: Any) -> Any:
    """A CLI string (or a YAML/JSON scalar) as the field's type, when it means exactly one value of it.

    Anything else is returned unchanged, so the dataclass's type check names the key, the value and the
    rule in one message.
    """
    tp, optional = unwrap_optional(FIELD_TYPE[key])
    if isinstance(value, str) and optional and value.lower() in ("none", "null"):
        return None
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)  # `max_steps: 1000.0` in a YAML/JSON file: the same number
    if not isinstance(value, str):
        return value
    text = value.strip()
    if typing.get_origin(tp) is dict:
        return _parse_mapping(text, value)
    if tp is bool:
        return True if text.lower() in TRUE_WORDS else False if text.lower() in FALSE_WORDS else value
    if tp is int:
        return _parse_int(text, value)
    if tp is float:
        try:
            return float(text)
        except ValueError:
            return value
    return value


def _parse_mapping(text: str, value: str) -> Any:
    """`name=file,name=file` (the command line's form of a mapping key); anything else stays a string, for the
    type check's message."""
    pairs = [item.partition("=") for item in text.split(",")]
    if not all(eq and k.strip() and v.strip() for k, eq, v in pairs):
        return value
    return {k.strip(): v.strip() for k, _, v in pairs}


def _parse_int(text: str, value: str) -> Any:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)  # `1e3` is a whole number; `8.7` is not, and stays a string for the error
    except ValueError:
        return value
    return int(number) if math.isfinite(number) and number.is_integer() else value


def parse_cli(argv: list[str]) -> tuple[Optional[str], dict]:
    """Split `[CONFIG] --key value --flag --key=value ...` into (config file, overrides)."""
    config_file = None
    overrides: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            if config_file is None and i == 0:
                config_file = arg
                i += 1
                continue
            raise ConfigError(f"Unexpected argument {arg!r}: options are written --key value.")
        key, eq, value = arg[2:].partition("=")
        key = canonical_key(key)
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            is_flag = unwrap_optional(FIELD_TYPE[key])[0] is bool
            if nxt is None or (nxt.startswith("--") and not _is_number(nxt)):
                if not is_flag:
                    raise ConfigError(f"--{key} needs a value.")
                value = "true"  # a bare boolean flag, as HfArgumentParser's `--fp16`
            else:
                value = nxt
                i += 1
        overrides[key] = value
        i += 1
    return config_file, overrides


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def load_file(path: str | os.PathLike) -> dict:
    """The flat {key: value} of a YAML/JSON config file (flat, or grouped under model:/data:/training:)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist.")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        detail = " ".join(str(e).split())  # the parser's message spans lines; the error is one
        raise ConfigError(f"Config file {str(path)!r} is not valid "
                          f"{path.suffix.lstrip('.').upper() or 'YAML'}: {detail}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {str(path)!r} must hold a mapping of keys to values.")
    flat: dict = {}
    for k, v in data.items():
        if k == RESOLVED_SECTION:
            continue  # a run's config.yaml used as a config: its record follows from the rest
        if k in GROUPS and isinstance(v, dict):
            flat.update(v)
        else:
            flat[k] = v
    return flat


def recipe_path(name: str) -> Path:
    return RECIPES / f"{name}.yaml"


def resolve_recipe(name_or_path: str) -> str:
    """A config argument is a file path, or the name of a packaged recipe (`demo`, `imdb_bert`)."""
    if Path(name_or_path).exists() or name_or_path.endswith((".yaml", ".yml", ".json")):
        return name_or_path
    candidate = recipe_path(name_or_path)
    if candidate.exists():
        return str(candidate)
    names = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    raise ConfigError(f"No config file or packaged recipe named {name_or_path!r}. Recipes: {', '.join(names)}.")
