"""Pure decisions of the training loop: no torch, no files.

Everything here is a function of numbers, so the Trainer-parity grid tests it
directly. The loop asks these functions *whether* to log, evaluate, save, stop,
or which checkpoints to delete; it never re-derives the rules inline.
Rules follow `docs/semantics.md` (cited as §N).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .errors import ConfigError, DataError
# Re-exported until build.py / preflight.py import them from their owner, metric_names.


@dataclass(frozen=True)
class Plan:
    """The resolved step budget and intervals of one run (§1-3)."""

    max_steps: int
    updates_per_epoch: Optional[int]  # None for streams of unknown length
    num_epochs: int
    logging_steps: int
    eval_steps: int
    save_steps: int
    warmup_steps: int
    accumulation: int = 1
    """Micro-batches per update: the run's gradient_accumulation_steps (rescaled on a resume on another process
    count, preflight.run_config)."""


def _interval(value: float, max_steps: int) -> int:
    # §3: below 1 means a fraction of max_steps, rounded up.
    return max(1, math.ceil(value * max_steps)) if value < 1 else int(value)


def resolve_plan(args, batches_per_epoch: Optional[int]) -> Plan:
    """Turn epochs/max_steps and (fractional) intervals into concrete step counts.

    `batches_per_epoch` is the per-rank number of micro-batches in one epoch.
    """
    ga = args.gradient_accumulation_steps
    if batches_per_epoch is None:
        if args.max_steps <= 0:
            raise ConfigError("A streamed dataset has no length, so num_train_epochs cannot be turned into steps: "
                              "set max_steps > 0.")
        updates_per_epoch = None
    else:
        if batches_per_epoch == 0:
            raise DataError("The training set yields no batch on this rank: use a smaller per_device_train_batch_size "
                            "(or dataloader_drop_last false), more data, or fewer processes.")
        updates_per_epoch = math.ceil(batches_per_epoch / ga)  # §1: a short last window still updates
    if args.max_steps > 0:
        max_steps = args.max_steps
    else:
        max_steps = math.ceil(args.num_train_epochs * updates_per_epoch)  # §2
    num_epochs = math.ceil(max_steps / updates_per_epoch) if updates_per_epoch else 1
    eval_steps_raw = args.eval_steps if args.eval_steps is not None else args.logging_steps
    return Plan(
        max_steps=max_steps,
        updates_per_epoch=updates_per_epoch,
        num_epochs=num_epochs,
        logging_steps=_interval(args.logging_steps, max_steps),
        eval_steps=_interval(eval_steps_raw, max_steps),
        save_steps=_interval(args.save_steps, max_steps),
        warmup_steps=warmup_steps(args.warmup_steps, max_steps),
        accumulation=ga,
    )


def warmup_steps(value: float, max_steps: int) -> int:
    """§19: an integer >= 1 is steps, a float < 1 a fraction of max_steps (rounded up, as Trainer)."""
    return int(value) if value >= 1 else math.ceil(value * max_steps)


def check_best_model_cadence(args, plan: Plan) -> None:
    """§7, checked again after fractional intervals are resolved against max_steps."""
    if args.load_best_model_at_end and args.eval_strategy == "steps" and plan.save_steps % plan.eval_steps:
        raise ConfigError(
            f"load_best_model_at_end needs save_steps to be a multiple of eval_steps; they resolve to "
            f"save_steps={plan.save_steps} and eval_steps={plan.eval_steps}: set save_steps={plan.eval_steps}."
        )


@dataclass(frozen=True)
class StepActions:
    log: bool = False
    evaluate: bool = False
    save: bool = False


def step_actions(step: int, plan: Plan, args) -> StepActions:
    """What happens after optimizer update number `step` (1-based), ignoring epoch ends (§4, DefaultFlowCallback)."""
    log = (step == 1 and args.logging_first_step) or (args.logging_strategy == "steps"
                                                       and step % plan.logging_steps == 0)
    evaluate = args.eval_strategy == "steps" and step % plan.eval_steps == 0 and step >= args.eval_delay
    save = args.save_strategy == "steps" and step % plan.save_steps == 0
    if step >= plan.max_steps:  # the last step: evaluate once more if off the interval, always save by steps
        evaluate = evaluate or (args.eval_strategy == "steps" and step >= args.eval_delay)
        save = save or args.save_strategy == "steps"
    return StepActions(log=log, evaluate=evaluate, save=save)


def epoch_end_actions(epochs_done: float, args) -> StepActions:
    """What happens at the end of an epoch (§6)."""
    return StepActions(
        log=args.logging_strategy == "epoch",
        evaluate=args.eval_strategy == "epoch" and epochs_done >= args.eval_delay,
        save=args.save_strategy == "epoch",
    )


def merge(a: StepActions, b: StepActions) -> StepActions:
    return StepActions(log=a.log or b.log, evaluate=a.evaluate or b.evaluate, save=a.save or b.save)


def planned_actions(step: int, plan: Plan, args, epoch_ended: bool, epochs_done: float) -> StepActions:
    """Everything planned after update `step` before evaluation results are known (§4, §6).

    `epoch_ended`: this update consumed the last batch of an epoch. As Trainer (its on_epoch_end also runs
    when max_steps ends an epoch early), epoch-mode evaluation and saving also happen at the last step of a
    partial last epoch.
    """
    actions = step_actions(step, plan, args)
    if epoch_ended or step >= plan.max_steps:
        actions = merge(actions, epoch_end_actions(epochs_done, args))
    return actions


def should_stop_early(patience_counter: int, patience: Optional[int]) -> bool:
    """§12: stop once the counter reaches the patience."""
    return bool(patience) and patience_counter >= patience


@dataclass(frozen=True)
class StepOutcome:
    """What the loop does after the evaluation of a step: save a checkpoint, and why it stops (or None)."""

    save: bool
    stop: Optional[str] = None


def step_outcome(actions: StepActions, args, *, new_best: bool, stop_early: bool, epoch_ended: bool,
                 preempted: bool, pruned: bool = False) -> StepOutcome:
    """Pure: the save and stop decisions of one step, all taken before anything is written.

    Ours (§10): a new best is always saved, so the checkpoint reloaded at the end really is the best.
    As Trainer (its on_epoch_end also runs when early stopping ends an epoch early), epoch-mode saving
    happens at the stopping step. A preemption always checkpoints (§25), and so does a pruned search trial (it
    ends as a finished run, its last state kept).
    """
    save = actions.save or (new_best and args.save_strategy != "no")
    if stop_early and not epoch_ended:
        save = save or args.save_strategy == "epoch"
    stop = "early_stopping" if stop_early else "pruned" if pruned else "preempted" if preempted else None
    return StepOutcome(save=save or preempted or (pruned and args.save_strategy != "no"), stop=stop)


def is_better(value: float, best: Optional[float], greater_is_better: bool) -> bool:
    """§9: strictly better; a tie keeps the earlier one. A NaN or infinite value is never better (a diverged
    model must not become the best for ever: nothing compares better than NaN)."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if greater_is_better else value < best


def next_patience(counter: int, value: float, previous_best: Optional[float], greater_is_better: bool,
                  threshold: float) -> int:
    """§12: EarlyStoppingCallback's counter, judged against the best *before* this evaluation."""
    if previous_best is None or (is_better(value, previous_best, greater_is_better)
                                 and abs(value - previous_best) > threshold):
        return 0
    return counter + 1


def checkpoints_to_delete(steps: list[int], limit: Optional[int], best_step: Optional[int],
                          latest_step: Optional[int]) -> list[int]:
    """§11: keep the newest `limit` checkpoints by step; the best and the latest always survive."""
    if limit is None:
        return []
    steps = sorted(set(steps))
    keep = {s for s in (best_step, latest_step) if s in steps}
    for s in reversed(steps):
        if len(keep) >= max(limit, 1):
            break
        keep.add(s)
    return [s for s in steps if s not in keep]


def final_checkpoints_to_delete(steps: list[int], limit: Optional[int], best_step: Optional[int]) -> list[int]:
    """§11: after the best model is reloaded at the end, limit=1 keeps only the best."""
    if limit == 1 and best_step in steps:
        return [s for s in sorted(steps) if s != best_step]
    return []
