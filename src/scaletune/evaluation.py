"""Distributed evaluation and prediction over exactly the dataset.

Each rank runs its shard; outputs are gathered with `gather_for_metrics`, which
drops the samples accelerate duplicates to even out the last batch (§22), so
metrics equal a one-process evaluation. The loss is gathered per sample for the
same reason.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F


def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed cross-entropy and number of counted labels (-100 ignored).

    Works for classification (logits B×C, labels B) and token tasks (B×T×V, B×T).
    """
    flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100, reduction="none")
    per_sample = flat.view(labels.shape[0], -1).sum(dim=1)
    items = (labels != -100).view(labels.shape[0], -1).sum(dim=1)
    return per_sample, items


def model_inputs(batch: dict) -> dict:
    # The loop computes the loss itself (normalised over the accumulation window), so the model must not.
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def run_inference(model, dataloader, task, accelerator):
    """Gathered (predictions, labels or None, loss sum, loss items) over the whole dataset."""
    model.eval()
    preds, labels_all = [], []
    loss_sum = 0.0
    items = 0
    has_labels = None
    for batch in dataloader:
        labels = batch.get("labels")
        has_labels = labels is not None
        with accelerator.autocast():
            logits = model(**model_inputs(batch)).logits
        out = task.preprocess_logits(logits, labels)
        if labels is not None:
            per_sample, n_items = token_loss_sums(logits, labels)
            per_sample, n_items = accelerator.gather_for_metrics((per_sample, n_items))
            loss_sum += per_sample.sum().item()  # host-device sync per batch (cheap next to the forward pass)
            items += int(n_items.sum().item())
        if out.dim() > 1 and labels is not None and labels.dim() > 1:
            # Token-level outputs: sequence lengths differ across ranks; pad before gathering.
            out = accelerator.pad_across_processes(out, dim=1, pad_index=-100)
            labels = accelerator.pad_across_processes(labels, dim=1, pad_index=-100)
        out = accelerator.gather_for_metrics(out)
        preds.append(out.cpu().numpy())
        if labels is not None:
            labels_all.append(accelerator.gather_for_metrics(labels).cpu().numpy())
    model.train()
    if not preds:
        raise ValueError("The evaluation set yielded no batch.")
    if preds[0].ndim > 1 and has_labels and labels_all[0].ndim > 1:
        # Token level: keep counted positions only, so batches of different lengths concatenate.
        keep = [lab != -100 for lab in labels_all]
        predictions = np.concatenate([p[k] for p, k in zip(preds, keep)])
        label_ids = np.concatenate([lab[k] for lab, k in zip(labels_all, keep)])
    else:
        predictions = np.concatenate(preds)
        label_ids = np.concatenate(labels_all) if has_labels else None
    return predictions, label_ids, loss_sum, items


def evaluate(model, dataloader, task, accelerator, prefix: str = "eval",
             compute_metrics: Optional[Callable] = None) -> tuple[dict, np.ndarray]:
    """Metrics with Trainer's names (`eval_loss`, `eval_accuracy`, ...) and the gathered predictions."""
    predictions, label_ids, loss_sum, items = run_inference(model, dataloader, task, accelerator)
    metrics: dict = {}
    if label_ids is not None and items > 0:
        loss = loss_sum / items
        metrics["loss"] = loss
        metrics.update(task.metrics_from_loss(loss))
        fn = compute_metrics or task.compute_metrics
        metrics.update(fn(predictions, label_ids))
    metrics = {f"{prefix}_{k}": _to_float(v) for k, v in metrics.items()}
    # Every rank computed the same numbers from the same gathered arrays; broadcasting rank 0's copy makes
    # the decisions taken from them (best model, early stop) agreed by construction.
    from accelerate.utils import broadcast_object_list

    metrics = broadcast_object_list([metrics])[0] if accelerator.num_processes > 1 else metrics
    return metrics, predictions


def _to_float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v  # user compute_metrics may return non-numeric values; pass them through
