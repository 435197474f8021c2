"""The output-dir lock (scaletune.lock) raced and judged in real processes: no training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scaletune.errors import CheckpointError
from scaletune.lock import LOCK_FILE, acquire_lock, release_lock

RACES = 300


@pytest.mark.slow  # 600 processes, forked from one small process (support/lock_race.py): a few seconds
def test_two_processes_racing_for_the_lock_never_both_take_it(tmp_path):
    race = Path(__file__).resolve().parents[1] / "support" / "lock_race.py"
    proc = subprocess.run([sys.executable, str(race), str(tmp_path), str(RACES)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    races = json.loads(proc.stdout)
    assert len(races) == RACES, races[:3]
    both = []
    for i, outcomes in enumerate(races):
        kinds = [kind for kind, _ in outcomes]
        if kinds != ["refused", "took"]:
            both.append((i, outcomes))
            continue
        winner = outcomes[1][1]
        assert "is in use by another run" in outcomes[0][1] and f"(pid {winner} on" in outcomes[0][1], outcomes
        assert json.loads((tmp_path / f"race-{i}" / LOCK_FILE).read_text())["pid"] == winner
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
