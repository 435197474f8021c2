"""`python -m scaletune.ray` on a local Ray (this machine's CPUs, 2 workers, gloo): the run trains and evaluates
as a 2-process `accelerate launch` of the same config, and a worker killed after a reported checkpoint is
restarted by Ray from that checkpoint and finishes as the uninterrupted run. Argument handling (one-line errors)
is in tests/unit/test_ray_entry.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from scaletune.tracking import read_jsonl
from support.faults import clean_env, launch_cmd, launch_env, logs, run, start, wait_for

pytest.importorskip("ray.train.torch")
pytestmark = pytest.mark.slow  # every test here launches processes

STEPS = 16


def job(tiny_bert, sentiment_files, out: Path) -> list[str]:
    args = ["--model_name_or_path", tiny_bert, "--output_dir", str(out), "--max_steps", str(STEPS),
            "--eval_strategy", "steps", "--eval_steps", "4", "--save_strategy", "steps", "--save_steps", "4",
            "--logging_steps", "1", "--disable_tqdm", "true"]
    for key, path in sentiment_files.items():
        args += [f"--{key}", path]
    return args


def ray_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "scaletune.ray", "--num_workers", "2", *args]


def ray_env() -> dict:
    return clean_env({"CUDA_VISIBLE_DEVICES": ""})  # CPU workers (gloo), as the accelerate launch reference


def results(out: Path) -> tuple[dict, dict]:
    losses = {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r}
    return json.loads((out / "all_results.json").read_text()), losses


def assert_same(got: tuple[dict, dict], want: tuple[dict, dict]) -> None:
    (got_metrics, got_losses), (want_metrics, want_losses) = got, want
    assert sorted(got_metrics) == sorted(want_metrics) and sorted(got_losses) == list(range(1, STEPS + 1))
    for key, value in want_metrics.items():
        assert got_metrics[key] == pytest.approx(value, rel=1e-4), key
    for step, loss in want_losses.items():
        assert got_losses[step] == pytest.approx(loss, rel=1e-4), step


@pytest.fixture(scope="module")
def launched(tiny_bert, sentiment_files, tmp_path_factory) -> tuple[dict, dict]:
    """The reference: `accelerate launch --multi_gpu --num_processes 2` (gloo) of the same job."""
    out = tmp_path_factory.mktemp("launched") / "out"
    proc = run(launch_cmd(2, job(tiny_bert, sentiment_files, out)), timeout=300, env=launch_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results(out)


def test_ray_trains_as_accelerate_launch(tiny_bert, sentiment_files, launched, tmp_path):
    out = tmp_path / "out"
    proc = run(ray_cmd(*job(tiny_bert, sentiment_files, out)), timeout=300, env=ray_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same(results(out), launched)
    assert (out / "model.safetensors").is_file() and (out / "predictions.csv").is_file()
    # Every checkpoint scaletune wrote, reported once: Ray's copies are the steps' checkpoints.
    reported = [json.loads((p / "trainer_state.json").read_text())["global_step"] for p in ray_checkpoints(out)]
    assert sorted(reported) == list(range(4, STEPS + 1, 4))


def ray_checkpoints(out: Path) -> list[Path]:
    return [p for p in (out / "ray").rglob("checkpoint_*") if p.is_dir()]


def reported_steps(out: Path) -> list[int]:
    """The steps of the checkpoints Ray has registered (its snapshot, written once a report is complete)."""
    snapshots = list((out / "ray").glob("*/checkpoint_manager_snapshot.json"))
    try:
        snapshot = json.loads(snapshots[0].read_text()) if snapshots else {}
    except ValueError:  # being written
        return []
    return [r["metrics"]["step"] for r in snapshot.get("checkpoint_results", [])]


def ray_workers(root_pid: int) -> list[int]:
    """The Ray Train worker processes started under `root_pid` (the driver starts the local Ray)."""
    parents, names = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                names[int(entry.name)] = (entry / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue

    def under(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == root_pid:
                return True
        return False

    return sorted(pid for pid, cmd in names.items() if b"RayTrainWorker" in cmd and under(pid))


def test_a_killed_worker_is_restarted_from_the_last_reported_checkpoint(tiny_bert, sentiment_files, launched,
                                                                         tmp_path):
    out = tmp_path / "out"
    proc = start(ray_cmd("--max_failures", "1", *job(tiny_bert, sentiment_files, out)), tmp_path, "ray",
                 env=ray_env())
    try:
        wait_for(lambda: reported_steps(out), proc, 240, "a checkpoint registered by Ray")
        workers = ray_workers(proc.pid)
        assert len(workers) == 2 and not (out / "all_results.json").exists(), workers  # mid-run
        os.kill(workers[-1], signal.SIGKILL)
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    _, stderr = logs(proc)
    assert proc.returncode == 0, stderr[-3000:]
    resumed = [line for line in stderr.splitlines() if "resuming from Ray's last reported checkpoint" in line]
    # One restart (Ray's log monitor may echo a worker's line twice: the same line).
    assert len(set(resumed)) == 1 and str(out / "ray") in resumed[0], stderr[-3000:]
    assert_same(results(out), launched)
