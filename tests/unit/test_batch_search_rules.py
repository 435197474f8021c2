"""auto_find_batch_size's rules (batch_search.py): the halving/doubling that keeps the global batch, the agreement
between ranks, the give-up line, and which sizes a resume reuses. The real probe runs in
tests/e2e/test_batch_search.py."""

from __future__ import annotations

from dataclasses import replace

import pytest

from scaletune.batch_search import (describe, give_up_error, reused_sizes, settle, smaller_eval_batch,
                                    smaller_micro_batch)
from scaletune.config import ConfigError, TrainingArguments
from scaletune.errors import ScaletuneError


@pytest.mark.parametrize("micro, accumulation", [(32, 1), (12, 3), (7, 2), (1, 5), (48, 2)])
def test_each_smaller_micro_batch_keeps_the_global_batch(micro, accumulation):
    seen = [(micro, accumulation)]
    while (step := smaller_micro_batch(*seen[-1])) is not None:
        seen.append(step)
    assert all(m * a == micro * accumulation for m, a in seen)  # the global batch never changes
    assert [m for m, _ in seen] == sorted({m for m, _ in seen}, reverse=True) and seen[-1][0] == 1
    assert all(m <= prev // 2 for (m, _), (prev, _) in zip(seen[1:], seen))  # at least halved each time


def test_halving_doubles_the_accumulation():
    assert smaller_micro_batch(32, 1) == (16, 2)
    assert smaller_micro_batch(16, 2) == (8, 4)
    assert smaller_micro_batch(6, 1) == (3, 2)
    assert smaller_micro_batch(3, 2) == (1, 6)  # odd: the largest divisor below half
    assert smaller_micro_batch(1, 6) is None
    assert [smaller_eval_batch(n) for n in (32, 3, 1)] == [16, 1, None]


def test_settles_on_the_first_size_that_fits_on_every_rank():
    probed = []

    def oom(size):
        probed.append(size)
        return size[0] > 8

    found = settle((32, 1), oom, agree=lambda flag: flag, smaller=lambda s: smaller_micro_batch(*s),
                   give_up=lambda: give_up_error("training micro-batch"))
    assert found == (8, 4) and probed == [(32, 1), (16, 2), (8, 4)]
    assert settle(4, lambda s: False, lambda f: f, smaller_eval_batch, lambda: AssertionError()) == 4


def test_one_ranks_out_of_memory_moves_this_rank_too():
    """This rank fits everything; the other rank (simulated by the agreement) runs out above 4 rows."""
    def agree(flag, sizes=iter([32, 16, 8, 4])):
        other_rank_oom = next(sizes) > 4
        return flag or other_rank_oom

    found = settle((32, 1), lambda s: False, agree, lambda s: smaller_micro_batch(*s),
                   lambda: give_up_error("training micro-batch"))
    assert found == (4, 8)


def test_gives_up_in_one_line_when_a_batch_of_one_does_not_fit():
    with pytest.raises(ConfigError) as e:
        settle((4, 2), lambda s: True, lambda f: f, lambda s: smaller_micro_batch(*s),
               lambda: give_up_error("training micro-batch"))
    message = str(e.value)
    assert isinstance(e.value, ScaletuneError) and "\n" not in message
    assert "training micro-batch of 1 runs out of memory" in message and "gradient_checkpointing" in message


def test_a_resume_reuses_the_sizes_its_checkpoints_run_chose():
    on = replace(TrainingArguments(), auto_find_batch_size=True, per_device_train_batch_size=32)
    saved = {"auto_find_batch_size": True, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 4,
             "per_device_eval_batch_size": 16, "seed": 1}
    assert reused_sizes(on, saved) == {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 4,
                                       "per_device_eval_batch_size": 16}
    assert reused_sizes(replace(on, auto_find_batch_size=False), saved) is None  # not asked: compared as given
    assert reused_sizes(on, {**saved, "auto_find_batch_size": False}) is None  # that run searched nothing
    assert reused_sizes(on, None) is None


def test_the_log_line_names_what_changed_and_the_kept_global_batch():
    given = replace(TrainingArguments(), per_device_train_batch_size=32, per_device_eval_batch_size=32)
    found = replace(given, per_device_train_batch_size=8, gradient_accumulation_steps=4)
    assert describe(given, found, 2) == ("per_device_train_batch_size 32 -> 8, gradient_accumulation_steps 1 -> 4, "
                                         "per_device_eval_batch_size 32 (global batch 64)")


def test_the_resumed_config_takes_the_reused_sizes_and_passes_the_resume_check(tmp_path):
    from scaletune.config import load_config
    from scaletune.preflight import run_config
    from scaletune.resume import Resume, check_resume_compatible
    from scaletune.state import TrainingState

    given = load_config({"train_file": "train.csv", "per_device_train_batch_size": 32, "auto_find_batch_size": True})
    sizes = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 4, "per_device_eval_batch_size": 8}
    saved = {**given.to_dict(), **sizes}
    resume = Resume(tmp_path / "checkpoint-2", TrainingState(world_size=1), saved, 1, 4, sizes)
    resumed = run_config(given, resume)
    assert {key: getattr(resumed.training, key) for key in sizes} == sizes
    assert given.training.per_device_train_batch_size == 32  # a new config: the given one is not rewritten
    check_resume_compatible(resume, resumed.to_dict())  # the same run: nothing refused


def test_trainers_training_arguments_field_is_carried_over():
    from transformers import TrainingArguments as TrainerArguments

    from scaletune.dropin import config_from_training_arguments

    args = TrainerArguments(output_dir="out", auto_find_batch_size=True)
    assert config_from_training_arguments(args)["auto_find_batch_size"] is True
