"""Helpers for the fault suite (tests/e2e/test_faults.py): real `python -m scaletune.train` / `accelerate launch`
processes, bounded waits, /proc scans, tree digests and the one-line-error check.

Nothing here imports torch at module level: the pytest process stays light, the runs are subprocesses.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from support.tiny import free_port, without_curves

LOCK_FILE = ".scaletune.lock"

# Library progress bars (datasets' "Generating train split", transformers' "Loading weights") go to stderr.
# These are the libraries' own documented switches; with them off, stderr holds only what scaletune prints.
QUIET = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
         # A process killed with SIGKILL loses what it had buffered: the tests read its output afterwards.
         "PYTHONUNBUFFERED": "1"}


def clean_env(extra: Optional[dict] = None) -> dict:
    """The test environment without Slurm (a Slurm job id changes lock ownership and requeue decisions)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, **QUIET, **(extra or {})}


def train_cmd(args: list[str]) -> list[str]:
    """No curves.png unless asked (support.tiny.without_curves), as the runs made in the pytest process (conftest):
    a run resumed the other way round would otherwise report a changed setting."""
    return [sys.executable, "-m", "scaletune.train", *without_curves(args)]


def launch_cmd(num_processes: int, args: list[str]) -> list[str]:
    """`accelerate launch --multi_gpu --num_processes N -m scaletune.train ...` on CPU (gloo)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "scaletune.train", *without_curves(args)]


def launch_env() -> dict:
    return clean_env({"ACCELERATE_USE_CPU": "true"})


def run(cmd: list[str], timeout: float, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run to completion; a hang past `timeout` fails the test (subprocess.TimeoutExpired kills the process)."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or clean_env())


def start(cmd: list[str], log_dir: Path, name: str, env: Optional[dict] = None) -> subprocess.Popen:
    """Start in the background with stdout/stderr to files (a pipe nobody reads would block a long run)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out = open(log_dir / f"{name}.out", "w")
    err = open(log_dir / f"{name}.err", "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env or clean_env())
    proc.log_files = (log_dir / f"{name}.out", log_dir / f"{name}.err")  # type: ignore[attr-defined]
    out.close()
    err.close()
    return proc


def logs(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.log_files  # type: ignore[attr-defined]
    return out.read_text(), err.read_text()


def describe(proc) -> str:
    if isinstance(proc, subprocess.CompletedProcess):
        out, err = proc.stdout, proc.stderr
    else:
        out, err = logs(proc)
    return f"rc={proc.returncode}\n--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-5000:]}"


def wait_for(condition: Callable[[], bool], proc: Optional[subprocess.Popen], timeout: float, what: str,
             interval: float = 0.01) -> None:
    """Poll until `condition()`; fails if `proc` ends first or the deadline passes (a bound, not a timing)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{describe(proc)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s" + (f":\n{describe(proc)}" if proc else ""))
        time.sleep(interval)


def pause(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGSTOP `proc` and wait until the kernel shows every thread of it stopped: the signal is delivered
    asynchronously, thread by thread, and a digest taken in between can miss a file the run is still writing
    (seen in CI: a `.partial/.tmp*` of the background save's thread, after the main thread had stopped)."""
    proc.send_signal(signal.SIGSTOP)

    def stopped() -> bool:
        states = []
        for stat in Path(f"/proc/{proc.pid}/task").glob("*/stat"):
            try:  # field 3, after the parenthesised command name: "T" stopped by a signal
                states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
            except (OSError, IndexError):  # a thread that just ended
                continue
        return bool(states) and all(state in "Tt" for state in states)

    wait_for(stopped, proc, timeout, "the run to stop")


def stop(proc: subprocess.Popen) -> None:
    """Cleanup for a test that failed half way: kill what this test started (by its own pid) and reap it."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


# --------------------------------------------------------------------------- assertions


def nonempty_lines(text: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]+", text) if line.strip()]


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, exactly one non-empty stderr line, `scaletune: error: ...` containing every fragment."""
    lines = nonempty_lines(proc.stderr)
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{describe(proc)}"
    line = lines[0]
    assert line.startswith("scaletune: error: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def tree_digest(root: Path, ignore: tuple = (LOCK_FILE,)) -> dict:
    """{relative path: sha1} of every file under root (hidden ones too), except `ignore` names."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file() and p.name not in ignore}


def partials(root: Path) -> list[str]:
    return sorted(p.name for p in Path(root).iterdir() if p.name.endswith(".partial"))


def checkpoint_dirs(root: Path) -> dict[int, Path]:
    """Every folder named checkpoint-N, complete or not (checkpoint.list_checkpoints shows complete ones only)."""
    out = {}
    for p in Path(root).iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir():
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def all_finite(path: Path) -> bool:
    import torch

    return all(bool(torch.isfinite(t).all()) for t in weights(path).values())


# --------------------------------------------------------------------------- /proc


def _proc_entries():
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            yield entry


def processes_of(output_dir: Path) -> dict[int, str]:
    """{pid: cmdline} of every live (non-zombie) process whose command line names output_dir."""
    needle = str(output_dir).encode()
    found = {}
    for entry in _proc_entries():
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if needle in cmdline and state != "Z":
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")[:200]
    return found


def worker_pids(output_dir: Path) -> dict[int, int]:
    """{rank: pid} of the training workers of the run writing to output_dir (read from /proc)."""
    out = {}
    for entry in _proc_entries():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = dict(kv.split(b"=", 1) for kv in (entry / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"scaletune.train" in cmdline and str(output_dir).encode() in cmdline and b"LOCAL_RANK" in environ:
            out[int(environ[b"RANK"])] = int(entry.name)
    return out
