"""Keep credentials from the environment out of everything a run writes or prints.

    secret_values(env=None) -> tuple[str, ...]   # values of secret-named variables, longest first
    redact(obj, env=None)                        # copy of a str/dict/list/tuple (nested) with each value -> "***"
    redact_values(obj, values)                   # the same with values already collected (per-step callers)

A variable is secret when its name is WANDB_API_KEY, HF_TOKEN or HUGGING_FACE_HUB_TOKEN, or matches *_TOKEN,
*_KEY, *SECRET* or *PASSWORD* (case-insensitive). Values shorter than MIN_SECRET_LENGTH are not redacted:
a 4-character "secret" such as `true` or `main` would blank out ordinary words all over the output.

Only the values are matched, never the names, so a config that merely mentions HF_TOKEN is left alone.
Standard library only: the tracker and the config writer call this before anything heavy is imported.
"""

from __future__ import annotations

import os
from fnmatch import fnmatchcase
from pathlib import PurePath
from typing import Any, Iterable, Mapping, Optional

REDACTED = "***"
MIN_SECRET_LENGTH = 8
SECRET_NAMES = frozenset({"WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"})
SECRET_PATTERNS = ("*_TOKEN", "*_KEY", "*SECRET*", "*PASSWORD*")


def is_secret_name(name: str) -> bool:
    upper = name.upper()
    return upper in SECRET_NAMES or any(fnmatchcase(upper, p) for p in SECRET_PATTERNS)


def secret_values(env: Optional[Mapping[str, str]] = None) -> tuple[str, ...]:
    """The values to hide, longest first so that a secret containing another one is replaced whole."""
    env = os.environ if env is None else env
    # Stripped: `export X=$(cat keyfile)` style values may carry a newline the outputs will not.
    values = {v.strip() for k, v in env.items() if is_secret_name(k) and v and len(v.strip()) >= MIN_SECRET_LENGTH}
    return tuple(sorted(values, key=lambda v: (-len(v), v)))


def redact(obj: Any, env: Optional[Mapping[str, str]] = None) -> Any:
    """A copy of `obj` with every secret value from `env` (default os.environ) replaced by "***"."""
    return redact_values(obj, secret_values(env))


def redact_values(obj: Any, values: Iterable[str]) -> Any:
    if isinstance(values, str):  # one string would be taken as its characters: every letter redacted
        raise TypeError("redact_values takes a collection of secret values, not one string; wrap it in a tuple.")
    values = tuple(values)
    return _redact(obj, values)


def _redact(obj: Any, values: tuple[str, ...]) -> Any:
    if isinstance(obj, str):
        for v in values:
            if v in obj:
                obj = obj.replace(v, REDACTED)
        return obj
    if isinstance(obj, Mapping):
        return {_redact(k, values): _redact(v, values) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_redact(v, values) for v in obj]
        # A namedtuple takes its fields positionally; a plain tuple or list takes one iterable.
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, PurePath):  # e.g. an output path in the end-of-run summary
        text = str(obj)
        redacted = _redact(text, values)
        return obj if redacted == text else type(obj)(redacted)
    return obj  # numbers, None, bools: nothing to hide
