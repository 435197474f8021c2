"""Training data windows and the optimizer update: the only code that touches accelerate's sync internals.

`TrainData` hands out accumulation windows of micro-batches from the state's data position, epoch after
epoch, and advances that position. `Stepper.update` turns one window into one optimizer update whose loss is
normalised by the items of the whole window on every rank (§17).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Protocol, runtime_checkable

import torch

from .distributed.backend import Backend
from .distributed.collectives import all_agree, clip_gradients
from .errors import DataError
from .fast_path import step_loss_function
from .losses import ItemLoss
from .state import TrainingState
from .throughput import ThroughputMeter

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader


@runtime_checkable
class EpochSeeded(Protocol):
    """A collator whose randomness is a function of the epoch (MLM masks), told the epoch before it starts."""

    def set_epoch(self, epoch: int) -> None: ...


@dataclass
class Window:
    batches: list
    epoch_ended: bool
    """This window consumed the last batch of an epoch."""


class TrainData:
    """The training dataloader as a stream of accumulation windows that resumes at an exact position (§16)."""

    def __init__(self, dataloader: DataLoader, accelerator: Accelerator, accumulation: int, meter: ThroughputMeter):
        self.dataloader = dataloader
        self.accelerator = accelerator
        self.accumulation = accumulation
        self.meter = meter
        try:
            self.batches_per_epoch: Optional[int] = len(dataloader)
        except TypeError:
            self.batches_per_epoch = None  # a stream (`streaming: true`): read until exhausted

    def epoch_batches(self, state: TrainingState) -> Iterator[dict]:
        """This epoch's batches from the current position: same order as an uninterrupted run."""
        dl = self.dataloader
        # The seedable sampler's order is a function of (data_seed, epoch): replaying it is exact.
        dl.set_epoch(state.epochs_completed)
        if isinstance(dl.collate_fn, EpochSeeded):  # MLM masks are a function of (seed, epoch, tokens)
            dl.collate_fn.set_epoch(state.epochs_completed)
        if state.batches_in_epoch:  # skipped at the batch-sampler level: no data is loaded or collated
            return without_rng_draw(iter(self.accelerator.skip_first_batches(dl, state.batches_in_epoch)))
        return iter(dl)

    def check_position(self, state: TrainingState) -> None:
        """A resumed data position must lie inside this run's epoch; a position past its end means the data or
        batch size changed since the checkpoint (and would never reach a window: a hang, not a resume)."""
        total = self.batches_per_epoch
        if total is not None and state.batches_in_epoch >= total:
            raise DataError(
                f"The checkpoint's data position ({state.batches_in_epoch} batches into epoch "
                f"{state.epochs_completed}) is past the end of this run's epoch ({total} batches per process): "
                f"the training data or batch size changed since it was saved. Resume with the original data "
                f"and per_device_train_batch_size, or start a new run.")

    def windows(self, state: TrainingState, max_steps: int) -> Iterator[Window]:
        """Windows until `max_steps` updates are done or the state says stop. The data position in `state` is
        advanced past each window before it is handed out, so a checkpoint taken after its update resumes at
        the next one."""
        total = self.batches_per_epoch
        while state.global_step < max_steps and not state.should_stop:
            epoch = state.epochs_completed
            batches = self.epoch_batches(state)
            while state.global_step < max_steps and not state.should_stop:
                remaining = math.inf if total is None else total - state.batches_in_epoch
                window = self._fetch(batches, int(min(self.accumulation, remaining)))
                if not window:  # a stream (or a loader shorter than its len()) is exhausted: the epoch is over
                    if state.batches_in_epoch == 0:
                        raise DataError("The training data yielded no batch in a whole epoch.")
                    state.epochs_completed += 1
                    state.batches_in_epoch = 0
                    break
                state.batches_in_epoch += len(window)
                ended = total is not None and state.batches_in_epoch == total
                state.epoch = epoch + (state.batches_in_epoch / total if total else 0.0)
                if ended:  # the position moves to the next epoch before anything is saved
                    state.epochs_completed += 1
                    state.batches_in_epoch = 0
                yield Window(window, ended)
                if ended:
                    break

    def _fetch(self, batches: Iterator[dict], size: int) -> list:
        """Up to `size` micro-batches; the time spent waiting for data is measured."""
        window = []
        for _ in range(size):
            start = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            self.meter.data_wait(time.perf_counter() - start)
            window.append(batch)
        return window


def without_rng_draw(batches: Iterator[dict]) -> Iterator[dict]:
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


@dataclass
class Update:
    loss: torch.Tensor
    """This rank's share of the window's mean loss (on device: summing over ranks gives the window's loss)."""
    grad_norm: Optional[torch.Tensor]
    learning_rate: float
    finite: Optional[bool]
    """on_nonfinite=skip: False when the loss or gradient norm was NaN/inf on some rank (agreed), and the update
    was then not applied. None otherwise: the flag stays on the device (`Stepper.nonfinite`) until the loop's
    next read point, so that an update reads nothing from the device."""
    tokens: torch.Tensor
    """Non-padding input tokens of this rank's window (on device: counting costs no sync)."""


def examples_in(batch: dict):
    """Examples in a collated batch: its rows, or for a padding-free one (one row of examples end to end:
    position ids, no attention mask) the positions where an example starts -- where the position id is the
    row's first, whatever a model numbers from -- counted on the device."""
    if "position_ids" in batch and "attention_mask" not in batch:
        positions = batch["position_ids"]
        return (positions == positions[:, :1]).sum()
    return batch["labels"].shape[0]


class Stepper:
    """One optimizer update per accumulation window."""

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, loss: ItemLoss, meter: ThroughputMeter,
                 max_grad_norm: float, schedule_metric: Optional[str] = None, skip_nonfinite: bool = False,
                 step_loss: Optional[Callable] = None):
        """`schedule_metric`: the evaluation metric a metric-driven schedule (reduce_lr_on_plateau) steps on,
        at each evaluation instead of once per update. `skip_nonfinite` (on_nonfinite=skip): decide on the host,
        once per update, whether to apply it; otherwise a non-finite update is noted on the device and the loop
        stops at its next read point (`NonFiniteWatch`)."""
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss = loss
        self.meter = meter
        self.max_grad_norm = max_grad_norm
        self.schedule_metric = schedule_metric
        self.skip_nonfinite = skip_nonfinite
        self.nonfinite = NonFiniteWatch(accelerator.device)
        # (batch, window items) -> the micro-batch's loss sum: forward + loss, compiled on the fast path.
        self.step_loss = step_loss or step_loss_function(model, loss)
        self.backend = Backend.of(accelerator)
        # fp16 overflow shows as an infinite grad norm and is the grad scaler's business (it skips the step).
        self.overflow_is_expected = accelerator.mixed_precision == "fp16"

    def update(self, window: list) -> Update:
        """The loss is normalised by the items counted in the *whole window across all ranks* (§17), so N
        micro-batches of b give exactly the update of one batch of N·b -- unlike Trainer 5.x for BERT
        (transformers issue 47688)."""
        acc, model = self.accelerator, self.model
        local_items = sum(self.loss.count(b["labels"]) for b in window)
        # A collective (not a host read): the window's item count over ranks, before the first backward.
        global_items = acc.reduce(local_items.detach().clone().to(acc.device), reduction="sum").clamp(min=1)
        # DDP averages gradients over ranks and accelerate/DeepSpeed divide the loss by the accumulation
        # steps; undo both so the gradient is d(sum of losses)/d(theta) / global_items.
        scale = acc.num_processes * acc.gradient_accumulation_steps / global_items
        step_loss = torch.zeros((), device=acc.device)
        tokens = torch.zeros((), dtype=torch.int64, device=acc.device)
        for i, batch in enumerate(window):
            last = i == len(window) - 1
            acc.gradient_state._set_sync_gradients(last)  # as Trainer does: we own the window, not accelerate
            # DeepSpeed syncs at the boundary it is told about (sync_gradients above); DDP needs no_sync.
            no_sync = not last and not self.backend.accumulates_in_engine
            with acc.no_sync(model) if no_sync else contextlib.nullcontext():
                # A host int for a padding-free row (torch.tensor(n, device=cuda) would be a blocking copy).
                batch_tokens = (batch["attention_mask"].sum() if "attention_mask" in batch
                                else batch["input_ids"].numel())
                tokens += batch_tokens
                self.meter.add_batch(examples_in(batch), batch_tokens)
                loss_sum = self.step_loss(batch, global_items)
                acc.backward(loss_sum * scale)
            step_loss += loss_sum.detach() / global_items
        # The norm before clipping; with clipping off it is still measured and logged, as Trainer does.
        grad_norm = clip_gradients(acc, model.parameters(),
                                   self.max_grad_norm if self.max_grad_norm > 0 else float("inf"))
        learning_rate = self.scheduler.get_last_lr()[0]  # the rate this update uses (Trainer logs it so)
        bad = self._nonfinite(step_loss, grad_norm)
        finite = None
        if self.skip_nonfinite:
            # Host-device sync point (on_nonfinite=skip only): applying the update or not is decided on the host.
            finite = not all_agree(self.accelerator, bool(bad.item()))
        else:
            self.nonfinite.note(bad)
        if finite is not False:
            self.optimizer.step()
            # An fp16 overflow skipped the update: keep the schedule (§18).
            if not acc.optimizer_step_was_skipped and self.schedule_metric is None:
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.meter.step_done()
        return Update(step_loss, grad_norm, learning_rate, finite, tokens)

    def after_evaluation(self, metrics: dict) -> None:
        """A metric-driven schedule steps on the evaluation (as Trainer's evaluate() does)."""
        if self.schedule_metric is not None:
            self.scheduler.step(metrics[self.schedule_metric])

    def _nonfinite(self, loss: torch.Tensor, grad_norm: Optional[torch.Tensor]) -> torch.Tensor:
        """This rank's flag, on the device: the loss (or, outside fp16, the gradient norm) is NaN or infinite."""
        bad = ~torch.isfinite(loss)
        if grad_norm is not None and not self.overflow_is_expected:
            bad = bad | ~torch.isfinite(torch.as_tensor(grad_norm, device=loss.device))
        return bad


class NonFiniteWatch:
    """Non-finite updates noted on the device and read at the loop's read points (logging, evaluation, a save,
    the end): on a GPU, reading the flag after every update would make the host wait for each update to finish
    before it can queue the next one.

    An update noted here was applied (on_nonfinite=stop): the run stops at the next read point, before anything
    evaluates, saves or exports the weights it made, so no checkpoint, best model or export ever holds them."""

    NONE = 2**62

    def __init__(self, device: torch.device):
        self.device = device
        self.first = torch.full((), self.NONE, dtype=torch.int64, device=device)
        """The index (since the last read) of the first non-finite update, or NONE."""
        self.index = torch.zeros((), dtype=torch.int64, device=device)
        self.noted = 0
        """Updates noted since the last read (the host's count of `index`)."""

    def note(self, bad: torch.Tensor) -> None:
        self.first = torch.where(bad & (self.first == self.NONE), self.index, self.first)
        self.index += 1
        self.noted += 1

    def read(self, accelerator: Accelerator, step: int) -> Optional[int]:
        """Collective. The global step of the first non-finite update on any rank since the last read (`step`
        is the current one), or None."""
        if not self.noted:
            return None
        # Host-device sync point: once per read point (min over ranks = -max of the negated indices).
        first = int(-accelerator.reduce(-self.first, reduction="max").item())
        self.first.fill_(self.NONE)
        self.index.zero_()
        bad_step = step - self.noted + first + 1 if first != self.NONE else None
        self.noted = 0
        return bad_step
