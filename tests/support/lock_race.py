"""Races two processes for scaletune.lock, many times, from one small process (tests/unit/test_lock.py).

    python tests/support/lock_race.py ROOT RACES

Forking the pytest process (torch loaded) made each contender costly; this process imports only
scaletune.lock, so its forks start in a millisecond. For race i, in ROOT/race-<i>, two forked contenders wait at
a barrier, try acquire_lock at the same moment, report ("took", pid) or ("refused", message), and stay alive
(holding what they took) until both have tried, so the winner is never a dead owner whose lock may be taken
over. It prints one JSON list: the two outcomes of each race, sorted. The test judges them.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from pathlib import Path

from scaletune.errors import CheckpointError
from scaletune.lock import acquire_lock


def _contender(root: str, start, done, results) -> None:
    start.wait()
    try:
        acquire_lock(Path(root), env={})
        results.put(("took", os.getpid()))
    except CheckpointError as e:
        results.put(("refused", str(e)))
    done.wait()


def race(root: Path, races: int) -> list[list]:
    ctx = multiprocessing.get_context("fork")
    outcomes = []
    for i in range(races):
        folder = root / f"race-{i}"
        folder.mkdir()
        start, done, results = ctx.Barrier(2), ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_contender, args=(str(folder), start, done, results)) for _ in range(2)]
        for p in procs:
            p.start()
        outcomes.append(sorted([results.get(timeout=60), results.get(timeout=60)]))
        for p in procs:
            p.join(timeout=60)
    return outcomes


if __name__ == "__main__":
    print(json.dumps(race(Path(sys.argv[1]), int(sys.argv[2]))))
