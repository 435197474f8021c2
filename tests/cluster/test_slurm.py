"""`sbatch slurm/train.sh` against a real Slurm (munge + slurmctld + two slurmd) started by the suite itself.

Every job is the same small training job (tiny BERT, 2 processes in all, CPU/gloo), so the runs can be compared
with each other: one node x 2 processes, two nodes x 1 process, and a preempted + requeued run must all end
with the same weights and metrics. Skipped (with the reason) only where Slurm cannot run: not root, no apt.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from support.tiny import REPO
from support.wandb_reader import find_runs, read_run

pytestmark = pytest.mark.slow  # every test here launches a training run or a process

TRAIN_SH = str(REPO / "slurm" / "train.sh")
MAX_STEPS = 48  # 4 epochs of 12 updates (96 examples / (4 per device x 2 processes))
SIGNAL_AFTER_STEP = 3


def job_env(tmp: Path) -> dict:
    """What the submitting shell would have: the venv first on PATH, offline hub and W&B."""
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp / "wandb"),
        "WANDB_SILENT": "true",
        "WANDB_X_DISABLE_STATS": "true",  # no system-metrics sampling: CPU time on a 2-core CI machine
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        # CPU training comes from train.sh (no GPU allocated -> ./launch --cpu); this would disable DeepSpeed.
        "ACCELERATE_USE_CPU": None,
    }
    return env


def train_args(model: str, files: dict, output_dir: Path) -> list[str]:
    return ["--model_name_or_path", model, "--train_file", files["train_file"],
            "--validation_file", files["validation_file"], "--test_file", files["test_file"],
            "--output_dir", str(output_dir), "--max_steps", str(MAX_STEPS), "--per_device_train_batch_size", "4",
            "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "16", "--save_steps", "16",
            "--learning_rate", "1e-3", "--report_to", "wandb", "--disable_tqdm", "true", "--plot_curves", "false"]


def submit(cluster, tmp: Path, args: list[str], nodes: int = 1, nproc_per_node: int = 2,
           env: dict | None = None) -> tuple[str, Path]:
    """sbatch slurm/train.sh on CPU nodes: the #SBATCH GPU/CPU/time defaults overridden on the command line."""
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / "slurm.out"
    env = {**job_env(tmp), "NPROC_PER_NODE": str(nproc_per_node), **(env or {})}
    job = cluster.sbatch([f"--nodes={nodes}", "--gpus-per-node=0", "--cpus-per-task=2", "--time=15",
                          f"--output={log}", TRAIN_SH, *args], env=env, cwd=tmp)
    return job, log


def finished(cluster, job: str, log: Path, timeout: float = 240) -> dict:
    rec = cluster.wait_done(job, timeout=timeout)
    assert rec["JobState"] == "COMPLETED", f"job {job}: {rec.get('JobState')}\n{read(log)[-6000:]}"
    return rec


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def weights(output_dir: Path) -> dict:
    return load_file(output_dir / "model.safetensors")


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def results(output_dir: Path) -> dict:
    return json.loads((output_dir / "all_results.json").read_text())


def trainer_state(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text())


def logged_steps(output_dir: Path) -> list[int]:
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass  # a line being written
    return steps


def wait_for_step(cluster, job: str, log: Path, output_dir: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not any(s >= step for s in logged_steps(output_dir)):
        state = cluster.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} is {state}\n{read(log)[-6000:]}"
        assert time.monotonic() < deadline, read(log)[-6000:]
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(slurm_cluster, tiny_bert, sentiment_files, tmp_path_factory):
    """One node, 2 processes, never interrupted: the run the others must reproduce."""
    tmp = tmp_path_factory.mktemp("slurm_reference")
    out = tmp / "out"
    job, log = submit(slurm_cluster, tmp, train_args(tiny_bert, sentiment_files, out))
    rec = finished(slurm_cluster, job, log)
    return {"job": job, "record": rec, "log": log, "out": out, "tmp": tmp}


def test_one_node_two_processes_completes_and_writes_the_model(reference):
    out, log = reference["out"], read(reference["log"])
    assert reference["record"]["ExitCode"] == "0:0"
    assert "1 node(s) x 2 process(es) = 2" in log
    assert "node node1: machine_rank 0" in log
    # 96 examples / (4 per device x 2 processes) = 12 updates per epoch: the data was split over 2 ranks.
    state = trainer_state(out)
    assert state["global_step"] == MAX_STEPS and state["epoch"] == pytest.approx(MAX_STEPS / 12)
    model = weights(out)
    assert any("classifier" in k for k in model)
    assert {"eval_loss", "eval_accuracy", "test_loss"} <= set(results(out))
    assert (out / "predictions.csv").exists()
    assert logged_steps(out).count(MAX_STEPS) >= 1


@pytest.mark.parametrize("preset", [None, "deepspeed_zero2"])
def test_two_nodes_one_process_each_rendezvous_and_train(slurm_cluster, reference, tiny_bert,
                                                         sentiment_files, tmp_path, preset):
    """Default (DDP, multi_node preset) and DeepSpeed ZeRO-2 across two nodes (torchrun on each node)."""
    out = tmp_path / "out"
    preset_arg = [preset] if preset else []  # `sbatch slurm/train.sh PRESET ...`, as ./launch PRESET
    job, log = submit(slurm_cluster, tmp_path, [*preset_arg, *train_args(tiny_bert, sentiment_files, out)],
                      nodes=2, nproc_per_node=1)
    rec = finished(slurm_cluster, job, log)
    text = read(log)
    assert rec["NodeList"] == "node[1-2]"
    assert f"2 node(s) x 1 process(es) = 2, preset {preset or 'multi_node'}, rendezvous node1:" in text
    # Each node's launcher got its own rank (SLURM_NODEID expanded per task, not the batch shell's 0).
    assert "node node1: machine_rank 0" in text and "node node2: machine_rank 1" in text
    assert trainer_state(out)["global_step"] == MAX_STEPS
    last = out / f"checkpoint-{MAX_STEPS}"
    if preset == "deepspeed_zero2":  # DeepSpeed really ran: ZeRO optimizer shards of both ranks
        assert (last / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()
    else:
        assert (last / "optimizer.bin").exists()
    # Same world size, seed and data as the one-node run: the same ranks saw the same shards and the
    # gradients were all-reduced across the two nodes, so the result is the same model.
    assert max_weight_diff(out, reference["out"]) < 1e-6
    for key, value in results(reference["out"]).items():
        assert results(out)[key] == pytest.approx(value, rel=1e-6), key


def test_preempted_job_checkpoints_requeues_resumes_and_matches(slurm_cluster, reference, tiny_bert,
                                                                sentiment_files, tmp_path):
    out = tmp_path / "out"
    job, log = submit(slurm_cluster, tmp_path, train_args(tiny_bert, sentiment_files, out))

    # Signal mid-run: once training is under way (handlers installed), long before the last step.
    wait_for_step(slurm_cluster, job, log, out, SIGNAL_AFTER_STEP)
    slurm_cluster.scancel("--signal=USR1", job)  # to the job step's processes, as --signal=USR1@N does

    # The job requeues itself: back to PENDING (Slurm holds a requeued job ~2 min; we release it at once).
    slurm_cluster.wait_until(job, lambda r: r.get("Restarts") == "1" and r.get("JobState") == "PENDING",
                             timeout=120, what="to requeue itself")
    ckpts = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert len(ckpts) == 1 and SIGNAL_AFTER_STEP <= ckpts[0] < 16, ckpts  # the preemption checkpoint, not a
    stopped_at = ckpts[0]                                                  # regular one (save_steps=16)
    assert trainer_state(out / f"checkpoint-{stopped_at}")["global_step"] == stopped_at
    assert not (out / "model.safetensors").exists()  # the first attempt did not finish the run
    first_log = read(log)
    assert "received SIGUSR1" in first_log and f"requeued job {job}" in first_log

    # An interrupted save (no trainer_state.json: killed before it was written last) must never be resumed from.
    torn = out / f"checkpoint-{MAX_STEPS - 1}"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"\0" * 64)

    slurm_cluster.scontrol("update", f"JobId={job}", "StartTime=now")
    rec = finished(slurm_cluster, job, log)
    assert rec["Restarts"] == "1"
    text = read(log)
    assert "attempt 1:" in text and f"Resumed from {out / f'checkpoint-{stopped_at}'} at step {stopped_at}" in text

    # Ends exactly as the uninterrupted run: weights, final metrics, and every logged training loss.
    assert max_weight_diff(out, reference["out"]) < 1e-6
    for key, value in results(reference["out"]).items():
        assert results(out)[key] == pytest.approx(value, rel=1e-6), key
    ref_history = {e["step"]: e for e in trainer_state(reference["out"])["log_history"] if "loss" in e}
    history = {e["step"]: e for e in trainer_state(out)["log_history"] if "loss" in e}
    assert sorted(history) == list(range(1, MAX_STEPS + 1))
    for step, entry in history.items():
        assert entry["loss"] == pytest.approx(ref_history[step]["loss"], rel=1e-5), step

    # One W&B run across both attempts: same id (kept in the checkpoint), steps continuing, nothing twice.
    runs = [read_run(p) for p in find_runs(tmp_path / "wandb")]
    assert len(runs) == 2, [str(r.path) for r in runs]
    run_id = trainer_state(out)["tracker_run_id"]
    assert [r.run_id for r in runs] == [run_id, run_id]
    first_steps, _ = runs[0].series("train/loss")
    second_steps, _ = runs[1].series("train/loss")
    assert first_steps == list(range(1, stopped_at + 1))
    assert second_steps == list(range(stopped_at + 1, MAX_STEPS + 1))
    assert runs[1].summary.get("global_step") == MAX_STEPS


def test_scancel_checkpoints_and_the_job_stays_cancelled(slurm_cluster, tiny_bert, sentiment_files,
                                                          tmp_path):
    """SIGTERM (scancel, preemption, time limit) also stops every rank at one step with a checkpoint; a job
    that Slurm is already ending is not requeued, so a user's scancel stays a cancel."""
    out = tmp_path / "out"
    # W&B on: its service process gets the SIGTERM too and exits; the tracker is dropped, the checkpoint written.
    job, log = submit(slurm_cluster, tmp_path, train_args(tiny_bert, sentiment_files, out))
    wait_for_step(slurm_cluster, job, log, out, SIGNAL_AFTER_STEP)
    slurm_cluster.scancel(job)
    rec = slurm_cluster.wait_gone(job)
    assert rec["JobState"] == "CANCELLED" and rec["Restarts"] == "0", rec
    text = read(log)
    assert "rank 0 received SIGTERM" in text and "not requeueing job" in text
    ckpts = sorted(out.glob("checkpoint-*"))
    assert len(ckpts) == 1 and SIGNAL_AFTER_STEP <= trainer_state(ckpts[0])["global_step"] < 16, ckpts


@pytest.mark.parametrize("mistake, env, message", [
    (["--learning_rat", "1e-4"], {}, "Unknown config key 'learning_rat'. Did you mean 'learning_rate'?"),
    (["--train_file", "/nonexistent/train.csv"], {}, "train_file '/nonexistent/train.csv' does not exist."),
    ([], {"ACCELERATE_CONFIG": "deepspeed_zero9"}, "accelerate config 'deepspeed_zero9' is neither a preset"),
], ids=["unknown-key", "missing-data", "unknown-preset"])
def test_bad_config_fails_fast_with_the_error_first_in_the_log(slurm_cluster, tiny_bert, sentiment_files,
                                                               tmp_path, mistake, env, message):
    args = [*train_args(tiny_bert, sentiment_files, tmp_path / "out"), *mistake]
    start = time.monotonic()
    job, log = submit(slurm_cluster, tmp_path, args, nodes=2, nproc_per_node=1, env=env)
    rec = slurm_cluster.wait_done(job, timeout=60)
    elapsed = time.monotonic() - start
    assert rec["JobState"] == "FAILED" and rec["ExitCode"] == "2:0", rec
    assert elapsed < 20, f"took {elapsed:.0f}s to fail"
    lines = read(log).splitlines()
    assert lines and lines[0].startswith(f"scaletune: error: {message}"), lines[:5]
    assert "machine_rank" not in read(log)  # no node started anything
