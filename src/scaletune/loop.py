"""The training loop. Read it top to bottom: take a window of micro-batches, update, decide, then
`if log`, `if evaluate`, `if save`, `if stop` -- each an explicit branch calling a typed collaborator.

The rules (when to log/evaluate/save, what is better, when to stop, what to delete) are pure functions in
`schedule.py`; the state that survives a restart is `state.TrainingState`; the update is `stepper.Stepper`'s;
evaluation and best-metric tracking are `evaluation.Evaluator`'s; disk is `checkpointer.Checkpointer`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional

import torch

from . import schedule
from .checkpointer import Checkpointer
from .errors import NonFiniteError
from .evaluation import Evaluator
from .mixture import MixtureCounts
from .preemption import PreemptionWatcher
from .schedule import Plan
from .state import TrainingState
from .stepper import Stepper, TrainData, Update
from .throughput import ThroughputMeter
from .tracking import RunTracker
from .trial_pruning import Pruner

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .config import TrainingArguments

StopReason = Literal["max_steps", "early_stopping", "preempted", "pruned"]


@dataclass
class Loop:
    """The collaborators of one training run, each with a narrow job."""

    args: TrainingArguments
    data: TrainData
    stepper: Stepper
    evaluator: Optional[Evaluator]
    checkpointer: Checkpointer
    tracker: RunTracker
    meter: ThroughputMeter
    watcher: PreemptionWatcher
    mixture: Optional[MixtureCounts] = None
    """train_mixture: the samples trained on from each source, logged with the loss."""
    pruner: Optional[Pruner] = None
    """A trial of `python -m scaletune.search`: each evaluation reported to the study, which may stop the run."""


def fit(loop: Loop, state: TrainingState, plan: Plan) -> StopReason:
    """Train until max_steps, early stopping, pruning (a search trial) or preemption. Returns why it stopped."""
    t = loop.args
    loop.stepper.model.train()  # from_pretrained returns a model in eval mode: dropout off
    loop.tracker.start(plan.max_steps, state.global_step)
    log = LossLog(loop.stepper.accelerator.device)
    if t.eval_on_start and state.global_step == 0 and loop.evaluator is not None:
        # As Trainer: a sanity check of the untrained model, not a candidate for the best model.
        record(loop, state, {**loop.evaluator.evaluate().metrics, "epoch": state.epoch})

    for window in loop.data.windows(state, plan.max_steps):
        update = loop.stepper.update(window.batches)
        state.global_step += 1
        if update.finite is False:  # on_nonfinite=skip: decided on the host, this update
            handle_nonfinite(loop, state, state.global_step)
        else:
            log.add(update.loss)
        if t.include_num_input_tokens_seen:  # Host-device sync point (only when asked, as Trainer)
            state.num_input_tokens_seen += int(loop.stepper.accelerator.reduce(update.tokens, "sum").item())
        actions = schedule.planned_actions(state.global_step, plan, t, window.epoch_ended, state.epoch)
        if actions.log or actions.evaluate:
            check_finite(loop, state)  # collective read point: nothing logs or evaluates a non-finite update

        if actions.log and log.steps:
            seen = {"num_input_tokens_seen": state.num_input_tokens_seen} if t.include_num_input_tokens_seen else {}
            record(loop, state, {**log.flush(loop.stepper.accelerator, update), **loop.meter.interval_metrics(),
                                 **seen, **(loop.mixture.metrics(state) if loop.mixture else {}),
                                 "epoch": state.epoch})

        new_best = pruned = False
        if actions.evaluate and loop.evaluator is not None:
            metrics = loop.evaluator.evaluate().metrics
            record(loop, state, {**metrics, "epoch": state.epoch})
            new_best = loop.evaluator.track(state, metrics)
            loop.stepper.after_evaluation(metrics)
            pruned = loop.pruner is not None and loop.pruner.report(state.global_step, metrics)  # collective

        stop_early = schedule.should_stop_early(state.patience_counter, t.early_stopping_patience)
        preempted = loop.watcher.should_stop(loop.stepper.accelerator)  # collective: same update on every rank
        outcome = schedule.step_outcome(actions, t, new_best=new_best, stop_early=stop_early,
                                        epoch_ended=window.epoch_ended, preempted=preempted, pruned=pruned)
        state.should_stop = stop_early  # decided before the save, so the checkpoint records it
        if outcome.save or outcome.stop:
            check_finite(loop, state)  # collective read point: no checkpoint, and no end, after an unread one

        if outcome.save:
            loop.checkpointer.save(state)
        loop.tracker.progress(state.global_step, log.last, update.learning_rate)
        if outcome.stop:
            return outcome.stop
    check_finite(loop, state)
    return "early_stopping" if state.should_stop else "max_steps"


class LossLog:
    """Training loss since the last log, kept on the device so that logging is its only host-device sync."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), device=device)
        self.steps = 0
        self.last: Optional[float] = None

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss
        self.steps += 1

    def flush(self, accelerator: Accelerator, update: Update) -> dict:
        """Collective. Trainer's train log (§21): mean loss since the last log over ranks, grad norm, rate."""
        # Host-device sync point: one all-reduce of the summed loss, and the grad norm.
        total = accelerator.reduce(self.total.detach().clone(), reduction="sum").item()
        logs = {"loss": total / self.steps}
        if update.grad_norm is not None:
            logs["grad_norm"] = float(update.grad_norm)
        logs["learning_rate"] = update.learning_rate
        self.last = logs["loss"]
        self.total.zero_()
        self.steps = 0
        return logs


def record(loop: Loop, state: TrainingState, logs: dict) -> None:
    state.log_history.append({**logs, "step": state.global_step})
    loop.tracker.log(logs, state.global_step)


def check_finite(loop: Loop, state: TrainingState) -> None:
    """Collective. on_nonfinite=stop: a non-finite update since the last read point stops the run, naming it."""
    bad_step = loop.stepper.nonfinite.read(loop.stepper.accelerator, state.global_step)
    if bad_step is not None:
        handle_nonfinite(loop, state, bad_step)


def handle_nonfinite(loop: Loop, state: TrainingState, step: int) -> None:
    """on_nonfinite: `stop` (default) ends the run naming the (first) non-finite step, keeping every checkpoint
    as it is; `skip` drops the update (the Stepper did not apply it), counts it, and stops after
    max_skipped_updates."""
    t = loop.args
    state.skipped_updates += 1
    loop.checkpointer.flush()  # collective (every rank agreed on the flag): a save in flight is of a good step
    last_good = loop.checkpointer.latest_name()
    where = f"the last checkpoint ({last_good}) is kept" if last_good else "no checkpoint was written"
    if t.on_nonfinite == "skip" and state.skipped_updates <= t.max_skipped_updates:
        loop.stepper.accelerator.print(f"scaletune: non-finite loss or gradient norm at step {step}; "
                                       f"update skipped ({state.skipped_updates}/{t.max_skipped_updates}).")
        return
    why = ("more than max_skipped_updates non-finite updates" if t.on_nonfinite == "skip"
           else "the loss or gradient norm became NaN or infinite"
           + (f" at step {step} (read at this step's logging, evaluation or save)" if step != state.global_step
              else ""))
    raise NonFiniteError(f"Stopped at step {state.global_step}: {why}; {where}. Lower learning_rate, check the data "
                         f"or use bf16 instead of fp16; on_nonfinite=skip skips such updates.")

