"""Every error scaletune raises for bad input: one base class, so the entry points have one `except`.

Each message names the problem and the fix; `main` prints it as one line and exits with code 2.
The kinds also subclass the builtin a caller might already catch (ValueError, KeyError, RuntimeError).
"""

from __future__ import annotations

import difflib


class ScaletuneError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""


class ConfigError(ScaletuneError, ValueError):
    """A configuration problem."""


class DataError(ScaletuneError, ValueError):
    """A data problem (files, columns, labels)."""


class CheckpointError(ScaletuneError, RuntimeError):
    """A checkpoint or output-directory problem."""


class ModelError(ScaletuneError, OSError):
    """A model, config or tokenizer that cannot be found or read."""


class AssetError(ScaletuneError, RuntimeError):
    """A packaged offline asset (model or dataset) is missing."""


class NonFiniteError(ScaletuneError, RuntimeError):
    """The loss or gradient norm became NaN or infinite."""


def first_line(error: BaseException) -> str:
    """A library's exception in one line, for a message that wraps it."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def suggestion(given, known) -> str:
    """The hint after a misspelt key, choice or metric name, written once for all: the closest of `known` as
    ` Did you mean 'x'?`, or an empty string when nothing is close."""
    close = difflib.get_close_matches(str(given), list(known), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
