"""The Kubeflow Trainer entry (`python -m scaletune.k8s`) under Kubeflow's environment, hand-set for one pod with
2 processes on CPU (what the torch-distributed runtime gives a node pod): it starts the command of
`./launch multi_gpu --cpu 2`, SIGTERM to it (the kubelet's eviction signal, sent to the container's PID 1 only)
leaves a complete checkpoint and exit 143, and the same command again (the restarted pod) resumes and ends as the
uninterrupted run. That run is made in the pytest process on one process with the pod's global batch: without
dropout 2 processes compute what 1 does (tests/e2e/test_scale_out.py), so it needs no 2-process launch of its own.
(A 2-process resume with dropout on, each rank's random state restored, matching its uninterrupted run to 1e-6:
tests/cluster/test_slurm.py.) The mapping itself and the TrainJob manifest are checked without a process in
tests/unit/test_k8s_entry.py.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys

import pytest

from scaletune.tracking import read_jsonl
from support.faults import checkpoint_dirs, clean_env, logs, run, start, wait_for, worker_pids
from support.tiny import REPO, free_port

pytestmark = pytest.mark.slow  # every test here launches a process


def pet_env(**extra) -> dict:
    return clean_env({"PET_NNODES": "1", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": "0",
                      "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(free_port()),
                      "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, **extra})


def k8s_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "scaletune.k8s", *args]


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r}


def logged_step(out) -> int:
    """The last step in metrics.jsonl so far (a line still being written is skipped)."""
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)


def test_dry_run_prints_the_launch_command_from_kubeflows_variables(tmp_path):
    proc = run(k8s_cmd("--dry-run", "--max_steps", "3", "--output_dir", str(tmp_path / "out")), timeout=120,
               env=pet_env(PET_MASTER_PORT="29500"))
    assert proc.returncode == 0, proc.stderr
    summary, command = proc.stdout.splitlines()
    assert summary == "global batch size: 16 = 8 per device x 1 accumulation x 2 processes"
    words = shlex.split(command[len("command: "):])
    assert words[0] == "ACCELERATE_USE_CPU=true"
    assert words[words.index("--config_file") + 1] == str(REPO / "accelerate_configs" / "multi_gpu.yaml")
    assert [words[words.index(k) + 1] for k in ("--num_processes", "--num_machines", "--machine_rank",
                                                "--main_process_port")] == ["2", "1", "0", "29500"]
    assert words[words.index("scaletune.train") + 1:] == ["--max_steps", "3", "--output_dir", str(tmp_path / "out"),
                                                         "--resume_from_checkpoint", "latest"]
    assert not (tmp_path / "out").exists()


def test_trains_as_launch_checkpoints_on_sigterm_and_the_restarted_pod_resumes(tiny_bert_no_dropout, sentiment_files,
                                                                               tmp_path):
    from scaletune.train import run as train

    def job(per_device: int) -> list[str]:
        return ["--model_name_or_path", tiny_bert_no_dropout, "--train_file", sentiment_files["train_file"],
                "--validation_file", sentiment_files["validation_file"], "--do_predict", "false", "--max_steps",
                "40", "--per_device_train_batch_size", str(per_device), "--logging_steps", "1", "--save_steps",
                "100", "--disable_tqdm", "true", "--plot_curves", "false"]

    reference = tmp_path / "reference"
    train([*job(8), "--output_dir", str(reference)])  # 1 process x 8 = the pod's 2 x 4

    out = tmp_path / "out"
    cmd = k8s_cmd(*job(4), "--output_dir", str(out))
    pod = start(cmd, tmp_path / "logs", "first", env=pet_env())
    try:
        wait_for(lambda: logged_step(out) >= 2, pod, 240, "step 2 of the first pod")
        assert sorted(worker_pids(out)) == [0, 1]  # the world of 2 processes Kubeflow's variables asked for
        os.kill(pod.pid, signal.SIGTERM)  # the container's PID 1 only, as the kubelet does
        pod.wait(timeout=240)
    finally:
        if pod.poll() is None:
            pod.kill()
    stdout, stderr = logs(pod)
    assert "launch: multi_gpu, global batch size: 8 = 4 per device x 1 accumulation x 2 processes" in stderr
    # Non-zero, so the TrainJob's restart policy (the JobSet's failure policy) starts the pod again.
    assert pod.returncode == 143, stderr[-4000:]
    assert "rank 0 received SIGTERM" in stderr + stdout and "rank 1 received SIGTERM" in stderr + stdout
    (stop, ckpt), = checkpoint_dirs(out).items()
    assert 2 <= stop < 40
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == stop
    assert not (out / "model.safetensors").exists()

    again = run(cmd, timeout=300, env=pet_env())
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"Resumed from {ckpt} at step {stop}." in again.stdout + again.stderr
    expected, got = losses(reference), losses(out)
    assert sorted(expected) == sorted(got) == list(range(1, 41))
    # Before the stop, the pod's first run; after it, the resumed steps: each step the uninterrupted run's.
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), step
