"""Pure decision functions (no model): cadence, best metric, early stopping, rotation."""


import pytest

from scaletune import schedule
from scaletune.config import TrainingArguments


def args(**kw):
    return TrainingArguments(**kw)


def events(a, batches_per_epoch):
    plan = schedule.resolve_plan(a, batches_per_epoch)
    out = {"log": [], "eval": [], "save": []}
    for step in range(1, plan.max_steps + 1):
        act = schedule.step_actions(step, plan, a)
        if step % plan.updates_per_epoch == 0:
            act = schedule.merge(act, schedule.epoch_end_actions(step // plan.updates_per_epoch, a))
        for k, v in (("log", act.log), ("eval", act.evaluate), ("save", act.save)):
            if v:
                out[k].append(step)
    return plan, out


def test_trainer_example_interval_off_max_steps():
    # §4's example: max_steps=10, interval 4 -> evaluations at 4, 8, 10 and checkpoint-10 saved.
    plan, ev = events(args(max_steps=10, eval_strategy="steps", eval_steps=4, save_steps=4, logging_steps=4), 100)
    assert ev["eval"] == [4, 8, 10]
    assert ev["save"] == [4, 8, 10]
    assert ev["log"] == [4, 8]  # Trainer does not force a log at the last step


def test_fractional_intervals_are_ceil_of_max_steps():
    plan = schedule.resolve_plan(args(max_steps=10, eval_strategy="steps", eval_steps=0.25, save_steps=0.5,
                                      logging_steps=0.1, warmup_steps=0.15), 100)
    assert (plan.eval_steps, plan.save_steps, plan.logging_steps, plan.warmup_steps) == (3, 5, 1, 2)


def test_updates_per_epoch_counts_short_last_window():
    plan = schedule.resolve_plan(args(num_train_epochs=2, gradient_accumulation_steps=4), 10)
    assert plan.updates_per_epoch == 3 and plan.max_steps == 6 and plan.num_epochs == 2
    plan = schedule.resolve_plan(args(num_train_epochs=1.5, gradient_accumulation_steps=1), 10)
    assert plan.max_steps == 15 and plan.num_epochs == 2


def test_eval_delay_and_epoch_strategy():
    a = args(num_train_epochs=3, eval_strategy="epoch", save_strategy="epoch", eval_delay=2)
    assert not schedule.epoch_end_actions(1, a).evaluate
    assert schedule.epoch_end_actions(2, a).evaluate and schedule.epoch_end_actions(1, a).save


def test_better_is_strict_and_direction_aware():
    assert schedule.is_better(0.5, None, True)
    assert not schedule.is_better(0.5, 0.5, True)  # a tie keeps the earlier checkpoint
    assert schedule.is_better(0.4, 0.5, False) and not schedule.is_better(0.6, 0.5, False)


def test_patience_counter_against_previous_best_with_threshold():
    seq, best, counter, counters = [1.0, 0.95, 0.5, 0.45, 0.44], None, 0, []
    for v in seq:
        counter = schedule.next_patience(counter, v, best, greater_is_better=False, threshold=0.1)
        best = v if schedule.is_better(v, best, False) else best
        counters.append(counter)
    assert counters == [0, 1, 0, 1, 2]


@pytest.mark.parametrize("steps,limit,best,latest,deleted", [
    ([2, 4, 6], None, 2, 6, []),
    ([2, 4, 6], 1, 2, 6, [4]),          # limit 1 with best != latest keeps two
    ([2, 4, 6], 1, 6, 6, [2, 4]),
    ([2, 4, 6, 8], 2, 4, 8, [2, 6]),
    ([2, 4, 6, 8], 3, 2, 8, [4]),       # best, latest, then the newest others
    ([10, 2, 100], 1, None, 100, [2, 10]),  # ordered by step, not by name
])
def test_rotation_protects_best_and_latest(steps, limit, best, latest, deleted):
    assert schedule.checkpoints_to_delete(steps, limit, best, latest) == deleted


def test_final_rotation_limit_one_keeps_only_best():
    assert schedule.final_checkpoints_to_delete([2, 4, 6], 1, 4) == [2, 6]
    assert schedule.final_checkpoints_to_delete([2, 4, 6], 2, 4) == []


def test_best_model_cadence_checked_after_fractions_resolve():
    a = args(max_steps=10, eval_strategy="steps", eval_steps=0.3, save_steps=0.5, load_best_model_at_end=True)
    with pytest.raises(ValueError, match="save_steps=3"):
        schedule.check_best_model_cadence(a, schedule.resolve_plan(a, 100))


def test_every_bad_value_schedule_finds_is_a_one_line_scaletune_error():
    """main prints a ScaletuneError as one line; schedule's plain ValueErrors reached the user as tracebacks."""
    from types import SimpleNamespace

    from scaletune.errors import ScaletuneError

    args = SimpleNamespace(gradient_accumulation_steps=1, max_steps=0, num_train_epochs=1, eval_steps=None,
                           logging_steps=1, save_steps=4, warmup_steps=0, load_best_model_at_end=True,
                           eval_strategy="steps")
    with pytest.raises(ScaletuneError, match="set max_steps > 0"):
        schedule.resolve_plan(args, None)
    with pytest.raises(ScaletuneError, match="yields no batch"):
        schedule.resolve_plan(args, 0)
    plan = schedule.resolve_plan(SimpleNamespace(**{**vars(args), "max_steps": 10, "eval_steps": 0.3}), 10)
    with pytest.raises(ScaletuneError, match="save_steps=3"):
        schedule.check_best_model_cadence(args, plan)
