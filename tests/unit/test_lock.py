"""The output-dir lock (scaletune.lock) raced and judged in real processes: no training run."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scaletune.errors import CheckpointError
from scaletune.lock import LOCK_FILE, acquire_lock, release_lock

RACES = 300


def _contender(root: str, start, done, results) -> None:
    """One of two processes that try to take the lock at the same moment; it stays alive (holding what it took)
    until the other one has tried too, so the winner is never a dead owner whose lock may be taken over."""
    start.wait()
    try:
        acquire_lock(Path(root), env={})
        results.put(("took", os.getpid()))
    except CheckpointError as e:
        results.put(("refused", str(e)))
    done.wait()


@pytest.mark.slow  # 600 processes: 20-50 s on 2 cores, out of the `-m "not slow"` tier
def test_two_processes_racing_for_the_lock_never_both_take_it(tmp_path):
    ctx = multiprocessing.get_context("fork")  # the processes start in milliseconds: 300 races stay cheap
    both = []
    for i in range(RACES):
        root = tmp_path / f"race-{i}"
        root.mkdir()
        start, done, results = ctx.Barrier(2), ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_contender, args=(str(root), start, done, results)) for _ in range(2)]
        for p in procs:
            p.start()
        outcomes = sorted([results.get(timeout=60), results.get(timeout=60)])
        for p in procs:
            p.join(timeout=60)
        kinds = [kind for kind, _ in outcomes]
        if kinds != ["refused", "took"]:
            both.append((i, outcomes))
            continue
        winner = outcomes[1][1]
        assert "is in use by another run" in outcomes[0][1] and f"(pid {winner} on" in outcomes[0][1], outcomes
        assert json.loads((root / LOCK_FILE).read_text())["pid"] == winner
    assert not both, f"{len(both)} of {RACES} races did not end with exactly one owner: {both[:3]}"


def _lock_of(root: Path, **owner) -> Path:
    lock = root / LOCK_FILE
    lock.write_text(json.dumps(owner))
    return lock


def _start_time(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def test_an_empty_or_partial_lock_is_never_taken_for_a_dead_owners(tmp_path):
    lock = tmp_path / LOCK_FILE
    for content in ("", '{"host": "'):
        lock.write_text(content)
        with pytest.raises(CheckpointError, match=r"does not name its owner.*delete .*\.scaletune\.lock"):
            acquire_lock(tmp_path, env={})
        assert lock.read_text() == content  # left as it is


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
def test_a_lock_is_taken_over_only_when_its_pid_and_start_time_name_a_dead_process(tmp_path):
    import socket

    host = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = {"host": host, "pid": sleeper.pid, "process_start": _start_time(sleeper.pid), "started": "then"}
        _lock_of(tmp_path, **alive)
        with pytest.raises(CheckpointError, match=rf"in use by another run \(pid {sleeper.pid} on {host}"):
            acquire_lock(tmp_path, env={})
        # The same pid with another start time: the owner died and its pid was given to this other process.
        _lock_of(tmp_path, **{**alive, "process_start": str(int(alive["process_start"]) - 1)})
        acquire_lock(tmp_path, env={})
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        sleeper.kill()
        sleeper.wait()
    release_lock(tmp_path)
    assert not (tmp_path / LOCK_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary or takeover file left behind
