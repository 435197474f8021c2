"""Generic field checks shared by the schema's dataclasses: each field holds a value of its declared type.

Kept apart from `schema.py` so that file stays the list of fields, their docs and their rules. Messages are
the rest of one line that starts with the key's name: the value as given, and the rule it breaks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Literal, Optional, Union

from ..errors import ConfigError, suggestion


def unwrap_optional(tp) -> tuple[object, bool]:
    """(the type inside Optional[...], whether None is allowed)."""
    if typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Union[tuple(rest)]), True
    return tp, False


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def check_types(obj) -> None:
    """Every field holds a value of its declared type: the dataclasses are strict however they are built."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        problem = type_problem(getattr(obj, f.name), hints[f.name])
        if problem:
            raise ConfigError(f"{f.name}{problem}")


def type_problem(value, tp) -> Optional[str]:
    """None if `value` fits `tp`, else the rest of a one-line message that starts with the key's name."""
    tp, optional = unwrap_optional(tp)
    if value is None:
        return None if optional else " has no value: give one, or leave the key out for its default."
    # YAML 1.1 reads bare yes/no/on/off as booleans and digits as numbers; the value meant a string.
    quote = " (in YAML, put it in quotes)" if isinstance(value, (bool, int, float)) else ""
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        return None if value in choices and isinstance(value, str) else \
            f"={value!r} is not one of {', '.join(choices)}{quote}.{suggestion(value, choices)}"
    if tp is bool:
        return None if isinstance(value, bool) else f"={value!r} is not a valid bool: use true or false."
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return None
        return f"={value!r} is not a valid int: give a whole number."
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"={value!r} is not a valid float: give a number."
        return None if math.isfinite(value) else f"={value!r} must be a finite number."
    if tp is str:
        return None if isinstance(value, str) else f"={value!r} is not a valid str{quote}."
    if typing.get_origin(tp) is dict:
        if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return None
        return (f"={value!r} is not a mapping of names to files: in YAML, write `name: file` lines under it; on "
                f"the command line, name=file,name=file.")
    return None  # report_to (str or list) is checked where it is normalised


def require(obj, name: str, ok: bool, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={number_text(getattr(obj, name))} must be {rule}.")


def number_text(x) -> str:
    """A number as a user typed it: 4 not 4.0."""
    if isinstance(x, float) and math.isfinite(x) and x.is_integer():
        return str(int(x))
    return str(x)
