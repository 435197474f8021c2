"""The training loop. Read it top to bottom: fetch a window of micro-batches, update, then
`if log`, `if evaluate`, `if save`, `if stop` -- each an explicit branch calling a small component.

The rules (when to evaluate, what is better, when to stop, what to delete) are pure functions in
`schedule.py`; the state that survives a restart is `state.TrainingState`; disk layout is `checkpoint.py`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import checkpoint, schedule
from .distributed import is_deepspeed
from .evaluation import evaluate, model_inputs
from .schedule import Plan
from .state import TrainingState


@dataclass
class Components:
    """What the loop works with, already passed through `accelerator.prepare`."""

    cfg: object
    accelerator: object
    model: object
    optimizer: object
    scheduler: object
    train_dataloader: object
    eval_dataloader: Optional[object]
    task: object
    tokenizer: object
    tracker: object
    meter: object
    watcher: object
    compute_metrics: Optional[Callable] = None


class MetricNotFound(KeyError):
    pass


def fit(c: Components, state: TrainingState, plan: Plan) -> str:
    """Train until max_steps, early stopping or preemption. Returns why it stopped."""
    t, acc = c.cfg.training, c.accelerator
    state.max_steps = plan.max_steps
    c.model.train()
    c.tracker.start(plan.max_steps, state.global_step)
    # Loss since the last log, kept on device so logging is the only host-device sync for it.
    loss_since_log = torch.zeros((), device=acc.device)
    steps_since_log = 0
    last_logged_loss = None

    if t.eval_on_start and state.global_step == 0 and c.eval_dataloader is not None:
        # As Trainer: a sanity check of the untrained model, not a candidate for the best model (it has no
        # checkpoint) and no early-stopping evaluation.
        evaluate_and_track_best(c, state, track_best=False)

    while state.global_step < plan.max_steps and not state.should_stop:
        epoch = state.epochs_completed
        batches = epoch_batches(c, state)
        batches_per_epoch = known_length(c.train_dataloader)  # None: a stream, read until exhausted
        remaining = math.inf if batches_per_epoch is None else batches_per_epoch - state.batches_in_epoch
        while remaining > 0 and state.global_step < plan.max_steps:
            window = fetch_window(batches, min(t.gradient_accumulation_steps, remaining), c.meter)
            if not window:  # a stream (or a loader shorter than its len()) is exhausted: the epoch is over
                if state.batches_in_epoch == 0:
                    raise ValueError("The training data yielded no batch in a whole epoch.")
                state.epochs_completed += 1
                state.batches_in_epoch = 0
                break
            remaining -= len(window)
            step_loss, grad_norm, learning_rate = update(c, window)
            loss_since_log += step_loss
            steps_since_log += 1
            state.global_step += 1
            state.batches_in_epoch += len(window)
            state.epoch = epoch + (state.batches_in_epoch / batches_per_epoch if batches_per_epoch else 0.0)
            c.meter.step_done()

            actions = schedule.step_actions(state.global_step, plan, t)
            if remaining == 0:  # the data position moves to the next epoch before anything is saved
                state.epochs_completed += 1
                state.batches_in_epoch = 0
                actions = schedule.merge(actions, schedule.epoch_end_actions(state.epochs_completed, t))
            elif state.global_step >= plan.max_steps:
                # As Trainer (its on_epoch_end also runs when max_steps ends an epoch early): epoch-mode
                # evaluation and saving happen at the last step of a partial last epoch too.
                actions = schedule.merge(actions, schedule.epoch_end_actions(state.epoch, t))

            if actions.log and steps_since_log:
                # Host-device sync point: one all-reduce of the summed loss and the grad norm.
                total = acc.reduce(loss_since_log.detach().clone(), reduction="sum").item()
                logs = {"loss": total / steps_since_log}
                if grad_norm is not None:
                    logs["grad_norm"] = float(grad_norm)
                logs["learning_rate"] = learning_rate
                logs.update(c.meter.interval_metrics())
                logs["epoch"] = state.epoch
                record(c, state, logs)
                last_logged_loss = logs["loss"]
                loss_since_log.zero_()
                steps_since_log = 0

            new_best = False
            if actions.evaluate and c.eval_dataloader is not None:
                new_best = evaluate_and_track_best(c, state)
            stop_early = bool(t.early_stopping_patience) and state.patience_counter >= t.early_stopping_patience
            if stop_early and remaining > 0:
                # As Trainer (its on_epoch_end also runs when early stopping ends an epoch early): epoch-mode
                # saving happens at the stopping step.
                actions = schedule.merge(actions, schedule.StepActions(save=t.save_strategy == "epoch"))

            # Ours (§10): a new best is always saved, so the checkpoint reloaded at the end really is the best.
            saved = actions.save or (new_best and t.save_strategy != "no")
            if saved:
                save_and_rotate(c, state)

            if stop_early:
                state.should_stop = True
                save_state_only_if_saved(c, state)
                c.tracker.progress(state.global_step, last_logged_loss, learning_rate)
                return "early_stopping"

            c.tracker.progress(state.global_step, last_logged_loss, learning_rate)

            if c.watcher.should_stop(acc):  # collective: every rank stops after the same update
                if not saved:
                    save_and_rotate(c, state)
                return "preempted"
    return "early_stopping" if state.should_stop else "max_steps"


def known_length(dataloader) -> Optional[int]:
    """Batches per epoch, or None for a stream (`streaming: true`: an IterableDataset has no length)."""
    try:
        return len(dataloader)
    except TypeError:
        return None


def epoch_batches(c: Components, state: TrainingState):
    """This epoch's batches from the current position: same order as an uninterrupted run (§16)."""
    dl = c.train_dataloader
    # The seedable sampler's order is a function of (data_seed, epoch): replaying it is exact.
    dl.set_epoch(state.epochs_completed)
    collate = getattr(dl, "collate_fn", None)
    if hasattr(collate, "set_epoch"):  # MLM masks are a function of (seed, epoch, tokens): re-drawn per epoch
        collate.set_epoch(state.epochs_completed)
    if state.batches_in_epoch:  # skipped at the batch-sampler level: no data is loaded or collated
        return without_rng_draw(iter(c.accelerator.skip_first_batches(dl, state.batches_in_epoch)))
    return iter(dl)


def without_rng_draw(batches):
    """A resumed epoch's batches, started without advancing the global RNG.

    Starting a DataLoader iterator (at its first batch) draws a seed from the global RNG, as in Trainer, whose
    dropout stream we reproduce. The uninterrupted run drew it at the epoch start, before the RNG state that a
    mid-epoch resume restores was saved; drawing it again would shift every later dropout mask.
    """
    with torch.random.fork_rng(devices=[]):
        first = next(batches, None)
    if first is not None:
        yield first
    yield from batches


def fetch_window(batches, size: int, meter) -> list:
    """Up to `size` micro-batches; the time spent waiting for data is measured."""
    window = []
    for _ in range(size):
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            break
        meter.data_wait(time.perf_counter() - start)
        window.append(batch)
    return window


def update(c: Components, window: list):
    """One optimizer update over an accumulation window.

    The loss is normalised by the number of counted labels in the *whole window across all ranks*
    (§17), so N micro-batches of b give exactly the update of one batch of N·b -- unlike Trainer 5.x
    for BERT (transformers issue 47688). Returns (step loss on this rank, grad norm, learning rate).
    """
    acc, model, t = c.accelerator, c.model, c.cfg.training
    local_items = sum((b["labels"] != -100).sum() for b in window)
    # Host-device sync point: the window's label count must be known before the first backward.
    global_items = acc.reduce(local_items.detach().clone().to(acc.device), reduction="sum").clamp(min=1)
    # DDP averages gradients over ranks and accelerate/DeepSpeed divide the loss by the accumulation
    # steps; undo both so the gradient is d(sum of losses)/d(theta) / global_items.
    scale = acc.num_processes * acc.gradient_accumulation_steps / global_items
    step_loss = torch.zeros((), device=acc.device)
    for i, batch in enumerate(window):
        last = i == len(window) - 1
        acc.gradient_state._set_sync_gradients(last)  # as Trainer does: we own the window, not accelerate
        # DeepSpeed syncs at the boundary it is told about (sync_gradients above); DDP needs no_sync.
        no_sync = not last and not is_deepspeed(acc)
        with acc.no_sync(model) if no_sync else contextlib.nullcontext():
            c.meter.add_batch(batch["labels"].shape[0], batch["attention_mask"].sum()
                              if "attention_mask" in batch else batch["input_ids"].numel())
            logits = model(**model_inputs(batch)).logits
            labels = batch["labels"]
            loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=-100, reduction="sum")
            acc.backward(loss_sum * scale)
        step_loss += loss_sum.detach() / global_items
    # The norm before clipping; with clipping off it is still measured and logged, as Trainer does.
    grad_norm = acc.clip_grad_norm_(model.parameters(), t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
    c.optimizer.step()
    learning_rate = c.scheduler.get_last_lr()[0]  # the rate this update used (Trainer logs it so)
    if not acc.optimizer_step_was_skipped:  # an fp16 overflow skipped the update: keep the schedule (§18)
        c.scheduler.step()
    c.optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm, learning_rate


def record(c: Components, state: TrainingState, logs: dict) -> None:
    entry = {**logs, "step": state.global_step}
    state.log_history.append(entry)
    c.tracker.log(logs, state.global_step)


def evaluate_and_track_best(c: Components, state: TrainingState, track_best: bool = True) -> bool:
    """Evaluate; update the early-stopping counter (against the previous best, §12) and the best metric.

    Returns whether this evaluation is a new best.
    """
    t = c.cfg.training
    metrics, _ = evaluate(c.model, c.eval_dataloader, c.task, c.accelerator, "eval", c.compute_metrics)
    record(c, state, {**metrics, "epoch": state.epoch})
    if t.metric_for_best_model is None:
        return False
    key = schedule.metric_key(t.metric_for_best_model)
    if key not in metrics:
        raise MetricNotFound(f"metric_for_best_model={t.metric_for_best_model!r} is not among the evaluation "
                             f"metrics: {', '.join(sorted(metrics))}.")
    value = metrics[key]
    if not track_best:
        return False
    if t.early_stopping_patience:
        state.patience_counter = schedule.next_patience(state.patience_counter, value, state.best_metric,
                                                        t.greater_is_better, t.early_stopping_threshold)
    if schedule.is_better(value, state.best_metric, t.greater_is_better):
        state.best_metric = value
        state.best_global_step = state.global_step
        return True
    return False


def save_and_rotate(c: Components, state: TrainingState) -> None:
    t = c.cfg.training
    path = checkpoint.checkpoint_path(t.output_dir, state.global_step)
    if state.best_global_step == state.global_step:
        state.best_model_checkpoint = str(path)
    state.tracker_run_id = c.tracker.run_id
    checkpoint.save_checkpoint(c.accelerator, t.output_dir, state, c.model, c.tokenizer)
    steps = list(checkpoint.list_checkpoints(t.output_dir))
    delete = schedule.checkpoints_to_delete(steps, t.save_total_limit, best_checkpoint_step(state),
                                            state.global_step)
    checkpoint.delete_checkpoints(c.accelerator, t.output_dir, delete)
    c.accelerator.wait_for_everyone()


def save_state_only_if_saved(c: Components, state: TrainingState) -> None:
    """Early stop decided after this step's save: record it in that checkpoint so a resume does not train on."""
    t = c.cfg.training
    path = checkpoint.checkpoint_path(t.output_dir, state.global_step)
    if c.accelerator.is_main_process and (path / "trainer_state.json").exists():
        state.save(path)
    c.accelerator.wait_for_everyone()


def best_checkpoint_step(state: TrainingState) -> Optional[int]:
    if not state.best_model_checkpoint:
        return None
    name = state.best_model_checkpoint.rstrip("/").rsplit("checkpoint-", 1)[-1]
    return int(name) if name.isdigit() else None
