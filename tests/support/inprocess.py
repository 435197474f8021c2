"""`python -m scaletune.train ARGS` (or scaletune.predict) run by the calling process: `main_in_process(args)`
returns what the process would have (a `subprocess.CompletedProcess`: exit code, stdout, stderr), without its
~6-7 s of imports.

What the run gets is what its own process would get:
- the environment given (default: `support.faults.clean_env()`, as `support.faults.run` gives a process); the
  progress-bar switches among it are read by each library once, at its import, so each library is told directly;
- fds 1 and 2 pointed at files (os.dup2: whatever any library or C code writes is caught), and `sys.stdout` /
  `sys.stderr` and the logging handlers that write to them moved onto those files: under pytest they are
  pytest's capture files, not fds 1 and 2, and transformers' handler keeps the `sys.stderr` of its creation;
- `sys.argv` as under `python -m scaletune.train`;
- warnings as a process shows them: printed on stderr (pytest records them instead), each once again (a warning
  shown once per process must not be hidden by an earlier run), without pytest's "always" for deprecations;
- accelerate's process-wide state reset afterwards.
An exception that escapes main is what a process would print (traceback, exit 1), and is kept in `.escaped`.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
import tempfile
import traceback
import warnings
from contextlib import contextmanager
from typing import Optional

from support.faults import clean_env


def main_in_process(args: list[str], env: Optional[dict] = None,
                    module: str = "scaletune.train") -> subprocess.CompletedProcess:
    """`module.main(args)` (scaletune.train's, or scaletune.predict's) as `python -m module *args` with environment
    `env` would run it."""
    import importlib

    cli = importlib.import_module(module)
    code, escaped, captured = 1, None, {}
    with _environment(clean_env() if env is None else env), _standard_streams(captured):
        argv, sys.argv = sys.argv, [cli.__file__, *args]
        try:
            with _process_warnings():
                code = cli.main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # noqa: BLE001 - a process prints it and exits 1; the test judges that
            escaped = traceback.format_exc()
            sys.stderr.write(escaped)
        finally:
            sys.argv = argv
            _reset_accelerate()
    proc = subprocess.CompletedProcess([sys.executable, "-m", module, *args], code, captured[1], captured[2])
    proc.escaped = escaped  # type: ignore[attr-defined]
    return proc


def _flush_all() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        ctypes.CDLL(None).fflush(None)  # C stdio buffers (a library writing through printf)
    except (OSError, AttributeError):
        pass


@contextmanager
def _environment(env: dict):
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    restore = _progress_bars(env)
    try:
        yield
    finally:
        restore()
        os.environ.clear()
        os.environ.update(saved)


def _progress_bars(env: dict):
    """Turn off the bars that `env` turns off (support/faults.QUIET); returns what turns them on again."""
    def off(variable: str) -> bool:
        return env.get(variable, "").upper() in ("1", "ON", "YES", "TRUE")

    import datasets
    import huggingface_hub.utils as hub
    import transformers.utils.logging as transformers_logging

    undo = []
    if off("HF_DATASETS_DISABLE_PROGRESS_BARS") and datasets.is_progress_bar_enabled():
        datasets.disable_progress_bars()
        undo.append(datasets.enable_progress_bars)
    if off("HF_HUB_DISABLE_PROGRESS_BARS"):  # transformers' bars ("Loading weights") follow the Hub's switch
        if transformers_logging.is_progress_bar_enabled():
            transformers_logging.disable_progress_bar()
            undo.append(transformers_logging.enable_progress_bar)
        if not hub.are_progress_bars_disabled():
            hub.disable_progress_bars()
            undo.append(hub.enable_progress_bars)

    def restore() -> None:
        for turn_on in undo:
            turn_on()

    return restore


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.root, *(lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    return [h for lg in loggers for h in lg.handlers if type(h) is logging.StreamHandler]


@contextmanager
def _standard_streams(captured: dict):
    """fds 1 and 2, sys.stdout/sys.stderr and the handlers writing to them go to files; `captured` gets each
    fd's text on the way out."""
    old = {1: sys.stdout, 2: sys.stderr}
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    files = {fd: tempfile.TemporaryFile("w+b") for fd in (1, 2)}
    _flush_all()
    new = {}
    for fd in (1, 2):
        os.dup2(files[fd].fileno(), fd)
        new[fd] = open(fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stdout, sys.stderr = new[1], new[2]
    fd_of = {id(old[1]): 1, id(sys.__stdout__): 1, id(old[2]): 2, id(sys.__stderr__): 2}
    moved = [(h, h.stream) for h in _stream_handlers() if id(h.stream) in fd_of]
    for handler, stream in moved:
        handler.setStream(new[fd_of[id(stream)]])
    try:
        yield
    finally:
        _flush_all()
        for handler, stream in moved:
            handler.setStream(stream)
        for handler in _stream_handlers():  # made during the run, on the files that go away now
            for fd in (1, 2):
                if handler.stream is new[fd]:
                    handler.setStream(old[fd])
        sys.stdout, sys.stderr = old[1], old[2]
        for fd in (1, 2):
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
            files[fd].seek(0)
            captured[fd] = files[fd].read().decode(errors="replace")
            files[fd].close()


def _show_on_stderr(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextmanager
def _process_warnings():
    with warnings.catch_warnings():  # entering resets the "already shown" registries; leaving restores
        warnings.onceregistry.clear()
        # pytest puts "always" for deprecations in front of Python's defaults; a process has only the defaults.
        warnings.filters[:] = [f for f in warnings.filters if not (
            f[0] == "always" and f[1] is None and f[3] is None
            and f[2] in (DeprecationWarning, PendingDeprecationWarning))]
        warnings.showwarning = _show_on_stderr
        yield


def _reset_accelerate() -> None:
    """A run that got as far as an Accelerator leaves its process-wide state: the next run starts without it."""
    if "accelerate.state" in sys.modules:
        sys.modules["accelerate.state"].AcceleratorState._reset_state(reset_partial_state=True)
