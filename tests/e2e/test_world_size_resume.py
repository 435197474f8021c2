"""A checkpoint written on 2 processes resumes on 1, and one written on 1 resumes on 2 (DDP; ZeRO-2 and ZeRO-3
through DeepSpeed's universal checkpoint; FSDP2 in test_fsdp2.py): the data position
is samples of the global order, the global batch is kept by rescaling accumulation, and the per-step losses
continue those of the uninterrupted run (fp32, no dropout)."""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest

from scaletune.checkpoint import verify
from support.tiny import REPO, accelerate_launch, run_cli

pytestmark = pytest.mark.slow  # every test here launches a training run or a process


def args(model, files, out, **kw):
    base = {"--model_name_or_path": model, "--train_file": files["train_file"], "--do_eval": "false",
            "--do_predict": "false", "--output_dir": str(out), "--max_steps": "9", "--save_steps": "3",
            "--logging_steps": "1", "--per_device_train_batch_size": "8", "--disable_tqdm": "true",
            "--learning_rate": "1e-3", "--validation_split_percentage": "0",
            **{f"--{k}": str(v) for k, v in kw.items()}}
    return [x for kv in base.items() for x in kv]


def losses(out) -> dict:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.mark.parametrize("saved_on,resumed_on,accumulation", [(2, 1, 1), (1, 2, 2)])
def test_resume_on_another_process_count(tiny_bert_no_dropout, sentiment_files, tmp_path, saved_on, resumed_on,
                                         accumulation):
    full = tmp_path / "full"
    accelerate_launch(saved_on, args(tiny_bert_no_dropout, sentiment_files, full,
                                     gradient_accumulation_steps=accumulation), timeout=300)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    # Mid-epoch: 96 rows in 12 full batches of 8, 6 updates an epoch. (With a short last batch, accelerate pads
    # it on N > 1 processes with samples from the epoch's start, so the N-process run itself sees other samples.)
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    proc = accelerate_launch(resumed_on, args(tiny_bert_no_dropout, sentiment_files, resumed,
                                              gradient_accumulation_steps=accumulation,
                                              resume_from_checkpoint="latest"), timeout=300)
    new_accumulation = accumulation * saved_on // resumed_on
    assert (f"gradient_accumulation_steps {accumulation} -> {new_accumulation} keeps the global batch"
            in proc.stderr + proc.stdout)
    a, b = losses(full), losses(resumed)
    assert sorted(b) == list(range(1, 10))
    for step in range(4, 10):
        assert b[step] == pytest.approx(a[step], abs=1e-4), (step, a[step], b[step])
    state = json.loads((resumed / "trainer_state.json").read_text())
    assert state["world_size"] == resumed_on and state["global_step"] == 9
    assert re.search(r"Resumed from \S+checkpoint-3 at step 3\.", proc.stdout), proc.stdout[-2000:]
    if saved_on > resumed_on:  # each fact in one line: the counts (with the rescaling), whose random state is dropped
        counts = f"checkpoint-3 was written by {saved_on} process(es) and this run has {resumed_on}"
        said = [line for line in proc.stderr.splitlines() if counts in line]
        assert len(said) == 1 and said[0].startswith("scaletune: "), proc.stderr[-3000:]
        dropped = [line for line in proc.stdout.splitlines() if "random state" in line]
        assert dropped == ["scaletune: the random state of processes 1..1 is dropped (the checkpoint has 2, this run "
                           "has 1)."], proc.stdout[-3000:]


# A count that cannot keep the global batch is refused: test_faults.py::
# test_resume_of_a_one_process_checkpoint_on_two_processes_is_refused (its one-process run resumed on two).


def _launch(preset: str, processes: int, argv: list[str], cwd):
    return run_cli([str(REPO / "launch"), preset, "--cpu", str(processes), *argv],
                   env={"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}, cwd=cwd, timeout=600)


@pytest.mark.parametrize("preset,saved_on,resumed_on,accumulation", [("deepspeed_zero2", 2, 1, 1),
                                                                     ("deepspeed_zero3", 1, 2, 2)])
def test_zero_checkpoints_resume_on_another_count_through_the_universal_format(
        tiny_bert_no_dropout, sentiment_files, tmp_path, preset, saved_on, resumed_on, accumulation):
    """ZeRO partitions the optimizer state per process; the resume converts the checkpoint to DeepSpeed's
    universal format in a view beside it (the checkpoint itself stays as written) and continues the run."""
    full = tmp_path / "full"
    _launch(preset, saved_on, args(tiny_bert_no_dropout, sentiment_files, full, max_steps=6,
                                   gradient_accumulation_steps=accumulation), tmp_path)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    proc = _launch(preset, resumed_on, args(tiny_bert_no_dropout, sentiment_files, resumed, max_steps=6,
                                            gradient_accumulation_steps=accumulation,
                                            resume_from_checkpoint="latest"), tmp_path)
    said = proc.stdout + proc.stderr
    assert f"gradient_accumulation_steps {accumulation} -> {accumulation * saved_on // resumed_on}" in said
    assert "converted to DeepSpeed's universal checkpoint" in said
    a, b = losses(full), losses(resumed)
    assert sorted(b) == list(range(1, 7))
    for step in range(4, 7):  # fp32, no dropout: the same updates on the other count
        assert b[step] == pytest.approx(a[step], abs=1e-4), (step, a[step], b[step])
    assert not [p for p in resumed.iterdir() if p.name.startswith(".universal-")]  # the view is gone
    assert verify(resumed / "checkpoint-3") is None  # and the checkpoint it was made from is as written
