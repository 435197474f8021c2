"""Runs the bad-input table's cases through `scaletune.train.main` in ONE process (tests/e2e/test_bad_input_table.py).

    PYTHONPATH=tests python -m support.bad_input_driver CASES_JSON RESULTS_JSON WATCHED_DIR

A process per case cost 2-8 s each (imports; torch once past preflight) for ~60 cases. Here each case gets what
its own process would: fds 1 and 2 pointed at files (os.dup2, so that whatever any library or C code writes is
caught, not only sys.stdout/sys.stderr), `sys.argv` as under `python -m scaletune.train`, the warnings shown
again (a warning printed once per process must not be hidden from the next case), and accelerate's singleton
state reset after it. It records main's return value (a SystemExit's code), or the class and traceback of an
exception that escaped main (a bug: the test fails on it), what fds 1 and 2 received, and the digest of
WATCHED_DIR after the case. The test judges them.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

from support.faults import tree_digest


def _flush_all() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        ctypes.CDLL(None).fflush(None)  # C stdio buffers (a library writing through printf)
    except (OSError, AttributeError):
        pass


def run_case(args: list[str], watched: Path) -> dict:
    from scaletune import train

    saved = {fd: os.dup(fd) for fd in (1, 2)}
    result: dict = {}
    with tempfile.TemporaryFile("w+b") as out, tempfile.TemporaryFile("w+b") as err:
        _flush_all()
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        argv = sys.argv
        sys.argv = [train.__file__, *args]
        try:
            with warnings.catch_warnings():  # entering resets the "already shown" registries; leaving restores
                warnings.onceregistry.clear()
                result["exit"] = train.main(list(args))
        except SystemExit as e:
            result["exit"] = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:  # noqa: BLE001 - an escaped exception is the finding, reported to the test
            result["escaped"] = f"{type(e).__name__}: {traceback.format_exc()}"
        finally:
            _flush_all()
            sys.argv = argv
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            _reset_accelerate()
        out.seek(0)
        err.seek(0)
        result["stdout"] = out.read().decode(errors="replace")
        result["stderr"] = err.read().decode(errors="replace")
    result["digest"] = tree_digest(watched)
    return result


def _reset_accelerate() -> None:
    """A case that got as far as an Accelerator leaves its process-wide state: the next case starts without it."""
    if "accelerate.state" in sys.modules:
        sys.modules["accelerate.state"].AcceleratorState._reset_state(reset_partial_state=True)


def main() -> None:
    cases, results, watched = sys.argv[1:4]
    table = json.loads(Path(cases).read_text())
    Path(results).write_text(json.dumps({name: run_case(args, Path(watched)) for name, args in table.items()}))


if __name__ == "__main__":
    main()
