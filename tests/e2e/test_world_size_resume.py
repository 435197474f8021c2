"""A ZeRO-3 checkpoint written on 1 process resumes on 2 through DeepSpeed's universal checkpoint (DDP both ways,
ZeRO-2 2 -> 1 and FSDP2 2 -> 4: test_scale_out.py, from its preset runs): the data position is samples of the
global order, the global batch is kept by rescaling accumulation, and the per-step losses continue those of the
uninterrupted run (fp32, no dropout)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from scaletune.checkpoint import verify
from support.tiny import REPO, run_cli

pytestmark = pytest.mark.slow  # every test here launches a training run or a process


def args(model, files, out, **kw):
    base = {"--model_name_or_path": model, "--train_file": files["train_file"], "--do_eval": "false",
            "--do_predict": "false", "--output_dir": str(out), "--max_steps": "9", "--save_steps": "3",
            "--logging_steps": "1", "--per_device_train_batch_size": "8", "--disable_tqdm": "true",
            "--plot_curves": "false", "--learning_rate": "1e-3", "--validation_split_percentage": "0",
            **{f"--{k}": str(v) for k, v in kw.items()}}
    return [x for kv in base.items() for x in kv]


def losses(out) -> dict:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


# DDP 2 -> 1 and 1 -> 2, ZeRO-2 2 -> 1 and FSDP2 2 -> 4: tests/e2e/test_scale_out.py, each the resume of a
# checkpoint its preset runs write anyway (test_ddp_checkpoint_resumes_on_another_process_count, ...).
# A count that cannot keep the global batch is refused: test_faults.py::
# test_resume_of_a_one_process_checkpoint_on_two_processes_is_refused (its one-process run resumed on two).


def _launch(preset: str, processes: int, argv: list[str], cwd):
    return run_cli([str(REPO / "launch"), preset, "--cpu", str(processes), *argv],
                   env={"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}, cwd=cwd, timeout=600)


@pytest.mark.parametrize("preset,saved_on,resumed_on,accumulation", [("deepspeed_zero3", 1, 2, 2)])
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
