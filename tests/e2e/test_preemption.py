"""Preemption without Slurm: the requeue decision (pure), signal handling in a real process, and the
cross-rank agreement in a real 2-process gloo run where only one rank is signalled.

The Slurm end to end (scancel --signal, requeue, resume, W&B continuity) is in tests/cluster/test_slurm.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from scaletune.preemption import parse_job_record, requeue_decision
from scaletune.tracking import read_jsonl
from support.faults import worker_pids
from support.trackers import assert_series_match_jsonl, read_mlflow, read_trackio
from support.tiny import free_port

SCONTROL_LINE = (
    "JobId=7 JobName=scaletune UserId=root(0) GroupId=root(0) Priority=1 JobState=RUNNING Reason=None "
    "Requeue=1 Restarts=0 BatchFlag=1 ExitCode=0:0 RunTime=00:00:09 NodeList=node1 "
    "Command=/repo/slurm/train.sh --run_name JobState=COMPLETED WorkDir=/repo StdOut=/repo/slurm-7.out"
)


def test_parse_job_record_keeps_the_first_value_of_a_key():
    job = parse_job_record(SCONTROL_LINE)
    assert job["JobId"] == "7" and job["Requeue"] == "1" and job["BatchFlag"] == "1"
    assert job["JobState"] == "RUNNING"  # not the user's `JobState=COMPLETED` argument inside Command=


@pytest.mark.parametrize("changes, decision, reason", [
    ({}, True, "requeueing"),
    ({"JobState": "COMPLETING"}, False, "COMPLETING, not RUNNING"),  # scancel / scontrol requeue under way
    ({"JobState": "CANCELLED"}, False, "CANCELLED, not RUNNING"),
    ({"Requeue": "0"}, False, "--no-requeue"),
    ({"BatchFlag": "0"}, False, "only batch jobs"),
])
def test_requeue_decision(changes, decision, reason):
    job = {**parse_job_record(SCONTROL_LINE), **changes}
    got, why = requeue_decision(job)
    assert got is decision and reason in why


def test_requeue_decision_without_a_record():
    assert requeue_decision({}) == (False, "Slurm does not know this job (scontrol show job failed)")


SIGNALS_IN_A_PROCESS = r"""
import os, signal, subprocess, sys, time
from accelerate import Accelerator
from scaletune.preemption import PreemptionWatcher, requeue_if_slurm

acc = Accelerator(cpu=True)
w = PreemptionWatcher()
w.install()
assert not w.should_stop(acc)
# A helper started after install() (W&B's service, a compile worker) must not die from the job's signals.
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
time.sleep(0.5)
os.kill(child.pid, signal.SIGUSR1)
os.kill(child.pid, signal.SIGTERM)
os.kill(os.getpid(), signal.SIGUSR1)
deadline = time.time() + 10
while not w.requested and time.time() < deadline:
    time.sleep(0.01)
time.sleep(0.3)
print("requested", w.requested, w.signal_name, "stop", w.should_stop(acc), "child alive", child.poll() is None)
child.kill()
# After the preemption checkpoint: no Slurm job here, so nothing is requeued, and a late SIGTERM (Slurm's
# answer to a requeue) no longer matters.
print("requeued", requeue_if_slurm(acc))
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.3)
print("survived SIGTERM")
"""


@pytest.mark.slow
def test_watcher_turns_a_signal_into_a_stop_and_shields_child_processes():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([sys.executable, "-c", SIGNALS_IN_A_PROCESS], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "requested True SIGUSR1 stop True child alive True" in proc.stdout
    assert "requeued False" in proc.stdout and "survived SIGTERM" in proc.stdout
    assert "rank 0 received SIGUSR1" in proc.stderr


@pytest.mark.slow
def test_one_signalled_rank_stops_every_rank_at_the_same_step(tiny_bert, sentiment_files, tmp_path):
    """Only rank 1 gets SIGUSR1 (as when one node is warned before another): both ranks stop after the same
    update, write one complete checkpoint there, and exit cleanly. The same command again (a requeued job)
    resumes and finishes, continuing the one Trackio run and the one MLflow run that rank 0 alone logs to."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "scaletune.train",
           "--model_name_or_path", tiny_bert, "--train_file", sentiment_files["train_file"],
           "--validation_file", sentiment_files["validation_file"], "--do_predict", "false",
           "--output_dir", str(out), "--max_steps", "60", "--per_device_train_batch_size", "4",
           "--logging_steps", "1", "--save_steps", "50", "--disable_tqdm", "true", "--plot_curves", "false",
           "--resume_from_checkpoint", "latest", "--report_to", "trackio,mlflow"]
    # Both trackers at their defaults: stores inside output_dir, offline.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("TRACKIO_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")}
    proc = subprocess.Popen(cmd, env={**env, "ACCELERATE_USE_CPU": "true"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.exists() and any(json.loads(line)["step"] >= 2 for line in
                                            metrics.read_text().splitlines() if line.endswith("}"))):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-4000:]
            time.sleep(0.05)
        pids = worker_pids(out)
        assert sorted(pids) == [0, 1], pids
        os.kill(pids[1], signal.SIGUSR1)  # to rank 1 only
        log, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Not under Slurm, so nothing requeues the job: it must not exit 0, or a job runner reads success.
    assert proc.returncode != 0, log[-4000:]
    assert "rank 1 received SIGUSR1" in log and "rank 0 received" not in log
    ckpts = sorted(out.glob("checkpoint-*"))
    assert len(ckpts) == 1, ckpts  # one preemption checkpoint, written by both ranks together
    stop = int(ckpts[0].name.split("-")[1])
    assert 2 <= stop < 50
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert state["global_step"] == stop
    assert {f.name for f in ckpts[0].glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert f"Preempted at step {stop}; checkpoint written." in log
    assert not (out / "model.safetensors").exists()  # stopped, not finished

    again = subprocess.run(cmd, env={**env, "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert f"Resumed from {ckpts[0]} at step {stop}." in again.stdout + again.stderr
    records = read_jsonl(out / "metrics.jsonl")
    assert sorted(r["step"] for r in records if "loss" in r) == list(range(1, 61))
    run_id = json.loads((out / "trainer_state.json").read_text())["tracker_run_id"]
    (name, series), = read_trackio(out / "trackio").items()  # one run: rank 1 logged nothing, the relaunch
    assert name.endswith(f"-{run_id}")                         # continued the first attempt's run
    assert_series_match_jsonl(records, series)
    (mlflow_run, history), = read_mlflow(out / "mlruns")
    assert mlflow_run.data.tags["scaletune.run_id"] == run_id and mlflow_run.info.status == "FINISHED"
    assert_series_match_jsonl(records, history)
