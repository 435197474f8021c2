"""Runs the bad-input table's cases through `scaletune.train.main` in ONE process (tests/e2e/test_bad_input_table.py).

    PYTHONPATH=tests python -m support.bad_input_driver CASES_JSON RESULTS_JSON WATCHED_DIR

A process per case cost 2-8 s each (imports; torch once past preflight) for ~60 cases. Each case gets what its own
process would (support/inprocess.py: fds 1 and 2 caught, `sys.argv`, warnings shown again, accelerate's state
reset after it), in this driver's environment. It records main's return value (a SystemExit's code), or the
traceback of an exception that escaped main (a bug: the test fails on it), what fds 1 and 2 received, and the
digest of WATCHED_DIR after the case. The test judges them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from support.faults import tree_digest
from support.inprocess import main_in_process


def run_case(args: list[str], watched: Path) -> dict:
    proc = main_in_process(args, env=dict(os.environ))
    outcome = {"escaped": proc.escaped} if proc.escaped else {"exit": proc.returncode}
    return {**outcome, "stdout": proc.stdout, "stderr": proc.stderr, "digest": tree_digest(watched)}


def main() -> None:
    cases, results, watched = sys.argv[1:4]
    table = json.loads(Path(cases).read_text())
    Path(results).write_text(json.dumps({name: run_case(args, Path(watched)) for name, args in table.items()}))


if __name__ == "__main__":
    main()
