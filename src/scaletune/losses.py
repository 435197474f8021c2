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
from typing import Optional, Protocol

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Label value that does not count (padding, special tokens, unlabelled rows), as transformers uses."""


class ItemLoss(Protocol):
    def count(self, labels: torch.Tensor) -> torch.Tensor:
        """Items counted in this micro-batch: a 0-d tensor (float: class weights may count fractionally)."""
        ...

    def per_sample(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed item losses per sample, items per sample), both of shape (batch,), float32."""
        ...


@dataclass(frozen=True)
class CrossEntropy:
    """Softmax cross-entropy over classes (B×C logits, B labels) or tokens (B×T×V, B×T); -100 ignored."""

    label_smoothing: float = 0.0
    class_weights: Optional[tuple[float, ...]] = None

    def _weights(self, device) -> Optional[torch.Tensor]:
        return None if self.class_weights is None else torch.tensor(self.class_weights, device=device)

    def count(self, labels: torch.Tensor) -> torch.Tensor:
        counted = labels != IGNORE_INDEX
        if self.class_weights is None:
            return counted.sum().float()
        weights = self._weights(labels.device)
        return weights[labels[counted]].sum()

    def per_sample(self, logits, labels):
        batch = labels.shape[0]
        # fp32 for the softmax: under autocast the logits may be half precision.
        flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               weight=self._weights(logits.device), ignore_index=IGNORE_INDEX, reduction="none",
                               label_smoothing=self.label_smoothing)
        losses = flat.view(batch, -1).sum(dim=1)
        counted = labels.reshape(batch, -1) != IGNORE_INDEX
        if self.class_weights is None:
            items = counted.sum(dim=1).float()
        else:
            safe = labels.reshape(batch, -1).clamp(min=0)
            items = (self._weights(logits.device)[safe] * counted).sum(dim=1)
        return losses, items


@dataclass(frozen=True)
class MeanSquaredError:
    """Regression: squared error per output value; every value of every sample is an item."""

    def count(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.tensor(float(labels.numel()), device=labels.device)

    def per_sample(self, logits, labels):
        batch = labels.shape[0]
        diff = logits.float().reshape(batch, -1) - labels.float().reshape(batch, -1)
        return (diff * diff).sum(dim=1), torch.full((batch,), float(diff.shape[1]), device=logits.device)


@dataclass(frozen=True)
class BinaryCrossEntropy:
    """Multi-label: a sigmoid per label slot (B×L logits, B×L labels in {0, 1}; -100 = slot not counted)."""

    def count(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels != IGNORE_INDEX).sum().float()

    def per_sample(self, logits, labels):
        batch = labels.shape[0]
        labels = labels.float().reshape(batch, -1)
        counted = labels != IGNORE_INDEX
        losses = F.binary_cross_entropy_with_logits(logits.float().reshape(batch, -1), labels.clamp(min=0),
                                                    reduction="none")
        return (losses * counted).sum(dim=1), counted.sum(dim=1).float()
