"""Resume on another process count, decided before anything is built (`Checkpointer.preflight`): which
backends can, how accumulation is rescaled to keep the global batch, and the one-line refusals."""

import json

import pytest

from scaletune.checkpoint import CheckpointError
from scaletune.checkpointer import adapt_to_world_size, rescaled_accumulation
from scaletune.config import TrainingArguments


def checkpoint(tmp_path, world_size: int, batches_in_epoch: int = 4):
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps(
        {"global_step": 2, "world_size": world_size, "batches_in_epoch": batches_in_epoch}))
    return folder


@pytest.mark.parametrize("accumulation,saved,world,expected", [
    (1, 2, 1, 2), (2, 1, 2, 1), (2, 2, 4, 1), (1, 4, 2, 2), (3, 2, 4, None), (1, 1, 2, None)])
def test_rescaled_accumulation_keeps_the_global_batch(accumulation, saved, world, expected):
    assert rescaled_accumulation(accumulation, saved, world) == expected


@pytest.mark.parametrize("env", [{}, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
                                 {"ACCELERATE_USE_DEEPSPEED": "true"}])
def test_every_backend_resumes_on_another_count_keeping_the_global_batch(tmp_path, capsys, env):
    args = TrainingArguments(gradient_accumulation_steps=2)
    adapt_to_world_size(checkpoint(tmp_path, world_size=2), args, 4, env)
    assert args.gradient_accumulation_steps == 1
    assert "written by 2 process(es) and this run has 4: gradient_accumulation_steps 2 -> 1" in capsys.readouterr().err


def test_a_position_or_batch_that_does_not_divide_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="gradient_accumulation_steps x 2 / 4 to be a whole number"):
        adapt_to_world_size(checkpoint(tmp_path, world_size=2), TrainingArguments(gradient_accumulation_steps=1), 4,
                            {})
    (tmp_path / "checkpoint-2").rename(tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"\(3 batches into the epoch on each of 2 processes\) is not a whole"):
        adapt_to_world_size(checkpoint(tmp_path, world_size=2, batches_in_epoch=3),
                            TrainingArguments(gradient_accumulation_steps=2), 4, {})


def test_the_same_count_changes_nothing(tmp_path):
    args = TrainingArguments(gradient_accumulation_steps=3)
    adapt_to_world_size(checkpoint(tmp_path, world_size=2), args, 2, {"ACCELERATE_USE_DEEPSPEED": "true"})
    assert args.gradient_accumulation_steps == 3
