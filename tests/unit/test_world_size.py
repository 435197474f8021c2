"""Resume on another process count, decided before anything is built (`resume.preflight`): which backends
can, how accumulation is rescaled to keep the global batch, and the one-line refusals. The training arguments
are never rewritten: the rescaled accumulation is a field of the `Resume` value, and `preflight.run_config`
makes the run's config from it."""

from pathlib import Path

import pytest

from scaletune.checkpoint import CheckpointError
from scaletune.config import TrainingArguments, load_config
from scaletune.preflight import run_config
from scaletune.resume import Resume, accumulation_for, preflight, rescaled_accumulation
from scaletune.state import TrainingState


@pytest.mark.parametrize("accumulation,saved,world,expected", [
    (1, 2, 1, 2), (2, 1, 2, 1), (2, 2, 4, 1), (1, 4, 2, 2), (3, 2, 4, None), (1, 1, 2, None)])
def test_rescaled_accumulation_keeps_the_global_batch(accumulation, saved, world, expected):
    assert rescaled_accumulation(accumulation, saved, world) == expected


def resume_on(world: int, accumulation: int, saved_world: int = 2, batches_in_epoch: int = 4) -> Resume:
    args = TrainingArguments(gradient_accumulation_steps=accumulation)
    saved = TrainingState(global_step=2, world_size=saved_world, batches_in_epoch=batches_in_epoch)
    resumed = Resume(Path("out/checkpoint-2"), saved, None, world, accumulation_for("checkpoint-2", saved, args, world))
    assert args.gradient_accumulation_steps == accumulation  # the given arguments are not rewritten
    return resumed


def test_a_resume_on_another_count_keeps_the_global_batch_and_says_so(capsys):
    resumed = resume_on(world=4, accumulation=2)
    assert (resumed.accumulation, resumed.saved.world_size, resumed.world_size) == (1, 2, 4)
    assert "written by 2 process(es) and this run has 4: gradient_accumulation_steps 2 -> 1" in capsys.readouterr().err
    cfg = load_config({"train_file": "x.csv", "gradient_accumulation_steps": 2})
    assert run_config(cfg, resumed).training.gradient_accumulation_steps == 1
    assert cfg.training.gradient_accumulation_steps == 2


def test_a_position_or_batch_that_does_not_divide_is_refused():
    with pytest.raises(CheckpointError, match="gradient_accumulation_steps x 2 / 4 to be a whole number"):
        resume_on(world=4, accumulation=1)
    with pytest.raises(CheckpointError, match=r"\(3 batches into the epoch on each of 2 processes\) is not a whole"):
        resume_on(world=4, accumulation=2, batches_in_epoch=3)


def test_the_same_count_changes_nothing():
    resumed = resume_on(world=2, accumulation=3)
    assert resumed.accumulation == 3 and resumed.same_world
    cfg = load_config({"train_file": "x.csv", "gradient_accumulation_steps": 3})
    assert run_config(cfg, resumed) is cfg


@pytest.mark.slow  # finished_run trains a run
def test_preflight_reads_the_checkpoint_once_into_the_resume_value(finished_run, monkeypatch):
    """The trainer state is read once, in preflight; everything later consumes the Resume value."""
    import scaletune.checkpoint as checkpoint

    reads = []
    read = checkpoint.read_trainer_state
    monkeypatch.setattr(checkpoint, "read_trainer_state", lambda folder: reads.append(Path(folder).name) or read(folder))
    args = TrainingArguments(output_dir=str(finished_run), resume_from_checkpoint="latest")
    resumed = preflight(args, {"RANK": "1", "WORLD_SIZE": "1"})
    assert resumed.path.name == "checkpoint-2" and resumed.saved.global_step == 2
    assert resumed.saved_config["per_device_train_batch_size"] == args.per_device_train_batch_size
    assert reads.count("checkpoint-2") == 2  # verify() checks it, then it is read into the value
