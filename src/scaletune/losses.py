"""The loss seam: every task's loss as (sum of per-item losses, number of items), never a mean.

Why sums: the loop divides the window's summed loss by the number of items counted over the *whole
accumulation window on every rank* (docs/semantics.md §17), so N micro-batches of b train exactly like one
batch of N·b. A loss that averaged per micro-batch (as `model(**batch).loss` does) cannot be re-weighted
correctly afterwards -- that is transformers issue 47688.

A loss answers two questions:

* `count(labels)` -- how many items this micro-batch contributes, known *before* the forward pass (the
  global count is all-reduced once per window, before the first backward);
* `per_sample(logits, labels)` -- per sample, the summed item losses and the items counted. Training sums
  both over the batch; evaluation gathers them per sample across ranks (so padding duplicates added by
  distributed sampling are dropped) and divides at the end. One function serves both: evaluation has no
  second copy of the loss.

Items are labelled classes (classification), unmasked tokens (MLM, token classification, causal LM), output
values (regression) or label slots (multi-label). With class weights an item counts with its class's
weight, as `torch.nn.functional.cross_entropy(weight=...)` normalises a weighted mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    import torch

# torch is imported inside the methods: the task modules import their loss at the top, and the config checks
# that run before torch is imported (train.preflight reads task.metric_names) import the task modules.

IGNORE_INDEX = -100
"""Label value that does not count (padding, special tokens, unlabelled rows), as transformers uses."""


def model_inputs(batch: dict) -> dict:
    """A batch as the model's forward arguments: everything but the labels. The loss is computed here, on the
    seam (normalised over the accumulation window), so the model must not compute its own."""
    return {k: v for k, v in batch.items() if k != "labels"}


class ItemLoss:
    """A loss on the seam. Subclasses implement `count` and `per_sample`; a loss that needs the whole model
    outputs (Trainer's `compute_loss_func`) overrides `batch_sum` and `per_sample_outputs` instead."""

    def count(self, labels: torch.Tensor) -> torch.Tensor:
        """Items counted in this micro-batch: a 0-d tensor (float: class weights may count fractionally)."""
        raise NotImplementedError

    def per_sample(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed item losses per sample, items per sample), both of shape (batch,), float32."""
        raise NotImplementedError

    def batch_sum(self, outputs, labels: torch.Tensor, window_items: torch.Tensor) -> torch.Tensor:
        """Training: this micro-batch's summed item losses (the loop divides by `window_items`, the count of
        the whole window on every rank)."""
        return self.per_sample(outputs.logits, labels)[0].sum()

    def per_sample_outputs(self, outputs, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation: `per_sample` from the model outputs."""
        return self.per_sample(outputs.logits, labels)


UPCAST_CHUNK_ELEMENTS = 1 << 26
"""Half-precision logits are upcast to fp32 this many elements (256 MB) at a time."""


def row_cross_entropy(scores: torch.Tensor, targets: torch.Tensor, weight: Optional[torch.Tensor] = None,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """`F.cross_entropy(scores.float(), targets, reduction="none")` for N x V scores (-100 ignored): the loss of
    each row, in fp32 for the softmax.

    fp32 scores go straight in. Half-precision ones (logits under autocast) are upcast a chunk of rows at a
    time, and when they need a gradient each chunk runs under activation checkpointing, which keeps only the
    half-precision input for the backward and upcasts again there: so no fp32 copy of all N x V logits exists,
    neither for the forward's peak nor saved for the backward (the log-softmax output autograd would keep is
    twice the logits' own size). Rows are independent, so chunking changes no value."""
    import torch
    import torch.nn.functional as F

    def rows(chunk, chunk_targets):
        return F.cross_entropy(chunk.float(), chunk_targets, weight=weight, ignore_index=IGNORE_INDEX,
                               reduction="none", label_smoothing=label_smoothing)

    if scores.dtype == torch.float32:
        return rows(scores, targets)
    step = max(1, UPCAST_CHUNK_ELEMENTS // max(1, scores.shape[-1]))
    out = []
    for start in range(0, scores.shape[0], step):
        chunk, chunk_targets = scores[start:start + step], targets[start:start + step]
        if chunk.requires_grad:
            from torch.utils.checkpoint import checkpoint

            # No RNG in a cross-entropy: nothing to stash (reading a GPU generator would wait on the device).
            out.append(checkpoint(rows, chunk, chunk_targets, use_reentrant=False, preserve_rng_state=False))
        else:
            out.append(rows(chunk, chunk_targets))
    return torch.cat(out)


@dataclass(frozen=True)
class CrossEntropy(ItemLoss):
    """Softmax cross-entropy over classes (B×C logits, B labels) or tokens (B×T×V, B×T); -100 ignored."""

    label_smoothing: float = 0.0
    class_weights: Optional[tuple[float, ...]] = None

    def _weights(self, device) -> Optional[torch.Tensor]:
        import torch

        return None if self.class_weights is None else torch.tensor(self.class_weights, device=device)

    def count(self, labels: torch.Tensor) -> torch.Tensor:
        counted = labels != IGNORE_INDEX
        if self.class_weights is None:
            return counted.sum().float()
        weights = self._weights(labels.device)
        return weights[labels[counted]].sum()

    def per_sample(self, logits, labels):
        batch = labels.shape[0]
        flat = row_cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                 self._weights(logits.device), self.label_smoothing)
        losses = flat.view(batch, -1).sum(dim=1)
        counted = labels.reshape(batch, -1) != IGNORE_INDEX
        if self.class_weights is None:
            items = counted.sum(dim=1).float()
        else:
            safe = labels.reshape(batch, -1).clamp(min=0)
            items = (self._weights(logits.device)[safe] * counted).sum(dim=1)
        return losses, items


@dataclass(frozen=True)
class MeanSquaredError(ItemLoss):
    """Regression: squared error per output value; every value of every sample is an item."""

    def count(self, labels: torch.Tensor) -> torch.Tensor:
        import torch

        # torch.full, not torch.tensor(n, device=...): the latter is a blocking host-to-device copy on a GPU.
        return torch.full((), float(labels.numel()), device=labels.device)

    def per_sample(self, logits, labels):
        import torch

        batch = labels.shape[0]
        diff = logits.float().reshape(batch, -1) - labels.float().reshape(batch, -1)
        return (diff * diff).sum(dim=1), torch.full((batch,), float(diff.shape[1]), device=logits.device)


@dataclass(frozen=True)
class BinaryCrossEntropy(ItemLoss):
    """Multi-label: a sigmoid per label slot (B×L logits, B×L labels in {0, 1}; -100 = slot not counted)."""

    def count(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels != IGNORE_INDEX).sum().float()

    def per_sample(self, logits, labels):
        import torch.nn.functional as F

        batch = labels.shape[0]
        labels = labels.float().reshape(batch, -1)
        counted = labels != IGNORE_INDEX
        losses = F.binary_cross_entropy_with_logits(logits.float().reshape(batch, -1), labels.clamp(min=0),
                                                    reduction="none")
        return (losses * counted).sum(dim=1), counted.sum(dim=1).float()


@dataclass(frozen=True)
class ComputeLossFunc(ItemLoss):
    """Trainer's `compute_loss_func(outputs, labels, num_items_in_batch) -> loss` on the loss seam.

    Trainer's contract: the function returns the loss *divided by* `num_items_in_batch`. Training passes the
    item count of the whole window on every rank, so `loss * count` is the window share of the summed loss
    and the loop's normalisation stays exact. Items are counted as Trainer does (labels != -100).
    """

    fn: Callable
    counter: ItemLoss = CrossEntropy()

    def count(self, labels: torch.Tensor) -> torch.Tensor:
        return self.counter.count(labels)

    def batch_sum(self, outputs, labels: torch.Tensor, window_items: torch.Tensor) -> torch.Tensor:
        return self.fn(outputs, labels, num_items_in_batch=window_items) * window_items

    def per_sample_outputs(self, outputs, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The user's function gives one number per batch: it is spread evenly over the batch's samples, so
        # distributed evaluation can still drop the duplicated padding samples (approximately, per sample).
        items = self.count(labels)
        total = self.fn(outputs, labels, num_items_in_batch=items.clamp(min=1)) * items
        batch = labels.shape[0]
        return total.float().expand(batch) / batch, items.float().expand(batch) / batch

    def per_sample(self, logits, labels):
        raise TypeError("ComputeLossFunc needs the model outputs: call per_sample_outputs.")


@dataclass(frozen=True)
class SparseTokenCrossEntropy(ItemLoss):
    """Token cross-entropy that also takes logits of the labelled positions only (MLM).

    Masked-LM labels ~15% of the tokens, yet a full head projects every position onto the vocabulary (30,522
    columns for BERT): most of the head's FLOPs and the largest activation of the step. `tasks/mlm.py` makes
    the head project, per row, only its labelled positions in column order (`labelled_first`), padded to the
    batch's K: B x K x V logits with K < T. This loss takes those (or full B x T x V logits, computed as
    `CrossEntropy` does) with the B x T labels and returns the same per-sample sums and counts, to float
    rounding. The targets are re-derived from the labels, so no index travels with the logits and nothing
    waits for the device to report how many positions there are.
    """

    label_smoothing: float = 0.0

    def count(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels != IGNORE_INDEX).sum().float()

    def per_sample(self, logits, labels):
        if logits.shape[:2] == labels.shape[:2]:  # full logits: a model without the sparse head
            return CrossEntropy(label_smoothing=self.label_smoothing).per_sample(logits, labels)
        batch, k = logits.shape[:2]
        # Padding slots of a row (beyond its labelled positions) pick unlabelled columns: target -100.
        targets = labels.gather(1, labelled_first(labels, k))
        flat = row_cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 label_smoothing=self.label_smoothing)
        return flat.view(batch, k).sum(dim=1), (labels != IGNORE_INDEX).sum(dim=1).float()


def labelled_first(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the columns of the labelled positions (label != -100) in order, then unlabelled columns:
    the first `k` of them (B x k). The one definition of the order that the sparse MLM head's gather and
    `SparseTokenCrossEntropy` share."""
    import torch

    return torch.argsort((labels == IGNORE_INDEX).to(torch.uint8), dim=1, stable=True)[:, :k]
