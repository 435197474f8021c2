"""Distributed evaluation and prediction over exactly the dataset.

Each rank runs its shard; outputs are gathered with `gather_for_metrics`, which
drops the samples accelerate duplicates to even out the last batch (§22), so
metrics equal a one-process evaluation. The loss is gathered per sample for the
same reason, from the task's own `ItemLoss` (the seam training uses: no second copy).

`Evaluator` runs an evaluation and keeps the best metric and the early-stopping counter (§8-§13).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional, Union

import numpy as np
import torch

from . import schedule
from .errors import DataError
from .losses import ItemLoss, model_inputs
from .metric_names import check_metric_for_best_model, eval_set_prefix, metric_key
from .state import TrainingState

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from .config import TrainingArguments
    from .tasks import Task


class SingleProcess:
    """What `run_inference` asks of an accelerator, for one process that has none (`scaletune.predict`): no
    autocast (the model runs in its own dtype), nothing to gather or pad across processes."""

    num_processes = 1

    @staticmethod
    def autocast():
        return contextlib.nullcontext()

    @staticmethod
    def gather_for_metrics(data):
        return data

    @staticmethod
    def pad_across_processes(tensor, dim: int = 0, pad_index: int = 0):
        return tensor


@torch.no_grad()
def run_inference(model, dataloader, preprocess: Callable, loss: ItemLoss, accelerator, to_cpu_every: int = 1):
    """Gathered (predictions, labels or None, loss sum, loss items) over the whole dataset. Gathered outputs
    move to the CPU every `to_cpu_every` batches (eval_accumulation_steps), so device memory stays bounded."""
    model.eval()
    preds, labels_all, pending = [], [], []
    loss_sum = 0.0
    items = 0
    has_labels = None

    def to_cpu():
        for out, labels in pending:
            preds.append(out.cpu().numpy())
            if labels is not None:
                labels_all.append(labels.cpu().numpy())
        pending.clear()

    for batch in dataloader:
        labels = batch.get("labels")
        has_labels = labels is not None
        with accelerator.autocast():
            outputs = model(**model_inputs(batch))
        out = preprocess(outputs.logits, labels)
        if labels is not None:
            per_sample, n_items = loss.per_sample_outputs(outputs, labels)
            per_sample, n_items = accelerator.gather_for_metrics((per_sample, n_items))
            loss_sum += per_sample.sum().item()  # host-device sync per batch (cheap next to the forward pass)
            items += n_items.sum().item()
        if out.dim() > 1 and labels is not None and labels.dim() > 1:
            # Token-level outputs: sequence lengths differ across ranks; pad before gathering.
            out = accelerator.pad_across_processes(out, dim=1, pad_index=-100)
            labels = accelerator.pad_across_processes(labels, dim=1, pad_index=-100)
        pending.append((accelerator.gather_for_metrics(out),
                        accelerator.gather_for_metrics(labels) if labels is not None else None))
        if len(pending) >= to_cpu_every:
            to_cpu()
    to_cpu()
    model.train()
    if not preds:
        raise DataError("The evaluation set yielded no batch; check the validation/test data.")
    if preds[0].ndim > 1 and has_labels and labels_all[0].ndim > 1:
        # Token level: keep counted positions only, so batches of different lengths concatenate.
        keep = [lab != -100 for lab in labels_all]
        predictions = np.concatenate([p[k] for p, k in zip(preds, keep)])
        label_ids = np.concatenate([lab[k] for lab, k in zip(labels_all, keep)])
    else:
        predictions = np.concatenate(preds)
        label_ids = np.concatenate(labels_all) if has_labels else None
    return predictions, label_ids, loss_sum, items


class PredictionOutput(NamedTuple):
    """Trainer's `PredictionOutput`: what `trainer.predict(dataset)` returns (also `RunResult.predictions`)."""

    predictions: np.ndarray
    label_ids: Optional[np.ndarray]
    metrics: dict


def evaluate(model, dataloader, task, loss: ItemLoss, accelerator, prefix: str = "eval",
             compute_metrics: Optional[Callable] = None,
             preprocess_logits: Optional[Callable] = None, to_cpu_every: int = 1,
             with_metrics: bool = True) -> PredictionOutput:
    """Metrics with Trainer's names (`eval_loss`, `eval_accuracy`, ...) and the gathered predictions.
    `compute_metrics(predictions, label_ids)` and `preprocess_logits(logits, labels)` replace the task's.
    `with_metrics=False`: predictions only, for inputs whose labels are placeholders (an untagged file)."""
    predictions, label_ids, loss_sum, items = run_inference(model, dataloader,
                                                            preprocess_logits or task.preprocess_logits, loss,
                                                            accelerator, to_cpu_every)
    metrics: dict = {}
    if with_metrics and label_ids is not None and items > 0:
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
    return PredictionOutput(predictions, label_ids, metrics)


def _to_float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v  # user compute_metrics may return non-numeric values; pass them through


@dataclass
class Evaluator:
    """Evaluates the model on the validation set (or each of several: `dataloader` a {name: loader}) and tracks the
    best metric and the patience counter."""

    accelerator: Accelerator
    model: torch.nn.Module
    dataloader: Union[None, DataLoader, dict[str, DataLoader]]
    task: Task
    loss: ItemLoss
    args: TrainingArguments
    compute_metrics: Optional[Callable] = None
    preprocess_logits: Optional[Callable] = None

    def evaluate(self, dataloader: Optional[DataLoader] = None, prefix: str = "eval") -> PredictionOutput:
        # `is None`, not `or`: the truth value of a DataLoader is its length, which a stream does not have.
        loader = dataloader if dataloader is not None else self.dataloader
        if isinstance(loader, dict):
            # Several sets (validation_files, a dict eval_dataset): each evaluated alone, under Trainer's
            # metric_key_prefix=f"eval_{name}"; predictions and labels per set.
            outputs = {name: self.evaluate(one, eval_set_prefix(name)) for name, one in loader.items()}
            return PredictionOutput({n: o.predictions for n, o in outputs.items()},
                                    {n: o.label_ids for n, o in outputs.items()},
                                    {k: v for o in outputs.values() for k, v in o.metrics.items()})
        return evaluate(self.model, loader, self.task, self.loss, self.accelerator, prefix, self.compute_metrics,
                        self.preprocess_logits, self.args.eval_accumulation_steps or 1)

    def track(self, state: TrainingState, metrics: dict) -> bool:
        """Update the early-stopping counter (against the previous best, §12) and the best metric (§9).
        Every rank holds the same metrics (broadcast in `evaluate`), so every rank decides the same.
        Returns whether this evaluation is a new best."""
        t = self.args
        if t.metric_for_best_model is None:
            return False
        check_metric_for_best_model(t.metric_for_best_model, sorted(metrics))
        value = metrics[metric_key(t.metric_for_best_model)]
        if t.early_stopping_patience:
            state.patience_counter = schedule.next_patience(state.patience_counter, value, state.best_metric,
                                                            t.greater_is_better, t.early_stopping_threshold)
        if schedule.is_better(value, state.best_metric, t.greater_is_better):
            state.best_metric = value
            state.best_global_step = state.global_step
            return True
        return False
