"""`python -m scaletune.ray` on a local Ray (this machine's CPUs, 2 workers, gloo): one Ray run, one of whose workers
is killed after the first checkpoint Ray registered, is restarted by Ray once from its copy of the last reported
checkpoint and ends as the uninterrupted run (metrics, per-step losses), with its export and predictions, and with
exactly the steps' checkpoints registered, each complete. The uninterrupted run is made in this process on one
process with both workers' batch: without dropout, 2 processes compute what 1 does (tests/e2e/test_scale_out.py),
so no second 2-process launch is needed for it. (That a 2-process resume restores each rank's random state, with
dropout on, is checked by tests/cluster/test_slurm.py; an uninterrupted Ray run checks nothing this one does not:
it trains the same steps, reports the same way.)
Argument handling (one-line errors) is in tests/unit/test_ray_entry.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from scaletune.tracking import read_jsonl
from support.faults import clean_env, logs, start, wait_for

pytest.importorskip("ray.train.torch")
pytestmark = pytest.mark.slow  # every test here launches processes

STEPS = 16
PER_WORKER = 8
RESUMED = "scaletune.ray: resuming from Ray's last reported checkpoint "


def job(tiny_bert, sentiment_files, out: Path, per_device: int = PER_WORKER) -> list[str]:
    args = ["--model_name_or_path", tiny_bert, "--output_dir", str(out), "--max_steps", str(STEPS),
            "--per_device_train_batch_size", str(per_device),
            "--eval_strategy", "steps", "--eval_steps", "4", "--save_strategy", "steps", "--save_steps", "4",
            "--logging_steps", "1", "--disable_tqdm", "true", "--plot_curves", "false"]
    for key, path in sentiment_files.items():
        args += [f"--{key}", path]
    return args


def ray_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "scaletune.ray", "--num_workers", "2", *args]


def ray_env() -> dict:
    return clean_env({"CUDA_VISIBLE_DEVICES": ""})  # CPU workers (gloo), as the accelerate launch reference


def results(out: Path) -> tuple[dict, dict]:
    # A step logged before the kill and again after the restart: the last record is the resumed run's.
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
def uninterrupted(tiny_bert_no_dropout, sentiment_files, tmp_path_factory) -> tuple[dict, dict]:
    """The reference: the same job, never interrupted, in this process on 1 process x 16 (2 workers x 8)."""
    from scaletune.train import run

    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    run(job(tiny_bert_no_dropout, sentiment_files, out, per_device=2 * PER_WORKER))
    return results(out)


def registered(out: Path) -> dict[Path, int]:
    """{folder: step} of the checkpoints Ray has registered, in report order (its snapshot, written once a
    report is complete; a folder Ray copied for a report that never completed is not in it)."""
    snapshots = list((out / "ray").glob("*/checkpoint_manager_snapshot.json"))
    try:
        snapshot = json.loads(snapshots[0].read_text()) if snapshots else {}
    except ValueError:  # being written
        return {}
    return {snapshots[0].parent / r["checkpoint_dir_name"]: r["metrics"]["step"]
            for r in snapshot.get("checkpoint_results", [])}


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


def test_a_ray_run_with_a_killed_worker_resumes_from_rays_checkpoint_and_ends_as_the_uninterrupted_run(
        tiny_bert_no_dropout, sentiment_files, uninterrupted, tmp_path):
    from scaletune.checkpoint import read_trainer_state, verify

    out = tmp_path / "out"
    proc = start(ray_cmd("--max_failures", "1", *job(tiny_bert_no_dropout, sentiment_files, out)), tmp_path, "ray",
                 env=ray_env())
    try:
        wait_for(lambda: registered(out), proc, 240, "a checkpoint registered by Ray")
        workers = ray_workers(proc.pid)
        assert len(workers) == 2 and not (out / "all_results.json").exists(), workers  # mid-run
        os.kill(workers[-1], signal.SIGKILL)
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    _, stderr = logs(proc)
    assert proc.returncode == 0, stderr[-3000:]

    assert_same(results(out), uninterrupted)
    assert (out / "model.safetensors").is_file() and (out / "predictions.csv").is_file()

    # One restart (Ray's log monitor may echo a worker's line twice: the same line), from a folder Ray registered.
    resumed = {line.split(RESUMED, 1)[1].rstrip(".") for line in stderr.splitlines() if RESUMED in line}
    checkpoints = registered(out)
    assert len(resumed) == 1 and Path(resumed.pop()) in checkpoints, stderr[-3000:]
    # The first attempt reported up to the restart point, the restarted one from the next save on: every save
    # step exactly once, in order (a step reported twice would be a restart from an older checkpoint than the
    # last reported). Each registered folder is that step's complete checkpoint.
    assert list(checkpoints.values()) == list(range(4, STEPS + 1, 4)), checkpoints
    for folder, step in checkpoints.items():
        assert verify(folder) is None and read_trainer_state(folder).global_step == step, folder
