"""The task seam: what differs between sequence classification and masked-LM.

A task decides the model class, preprocessing, collator, metrics and the
prediction file. Everything else -- the loop, loss normalisation, checkpoints,
distribution, tracking -- is shared. Adding a task (causal LM, token
classification) is one new module in this package plus one line in
`tasks/__init__.py`.

Loss contract: a task names its loss through `loss(cfg)`, an `ItemLoss` from
`losses.py` that returns per-sample *sums* and item counts; the loop divides by
the number of items across the whole accumulation window and all ranks, and
evaluation uses the same object. A task puts `labels` in the batch, using -100
for positions that do not count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from ..errors import DataError

if TYPE_CHECKING:
    from ..losses import ItemLoss


@dataclass
class PreparedData:
    """Tokenized splits ready for the collator, plus what the model and outputs need to know."""

    train: Any = None
    """Tokenized train split (`datasets.Dataset`, or `IterableDataset` when streaming), or None."""
    validation: Any = None
    test: Any = None
    label_list: Optional[list] = None
    """Classification: label names in id order (saved as the model's id2label)."""
    test_ids: Optional[list] = None
    """Identifiers written next to each prediction (an `id`/`idx` column when present, else the row index)."""
    info: dict = field(default_factory=dict)
    """Free-form facts worth logging (e.g. number of blocks, dropped tokens)."""
    text_columns: tuple = ()
    """The data columns the model reads, as resolved (given, or detected): recorded in the output dir's
    config.yaml so that `scaletune.predict` reads the same ones from a new file. Empty for tokenized user data."""
    label_column: Optional[str] = None
    """The column the targets came from (token classification: the tags column it found)."""


def present_splits(raw) -> dict:
    """The train / validation / test splits the dataset has (others are ignored); at least one."""
    splits = {s: raw[s] for s in ("train", "validation", "test") if s in raw}
    if not splits:
        raise DataError("The dataset has no train, validation or test split.")
    return splits


class Task:
    """Base class; see ClassificationTask and MaskedLMTask."""

    name: str = ""
    predictions_file: str = "predictions.csv"
    """The file `write_predictions` writes in output_dir (token classification writes CoNLL)."""
    metric_names: tuple = ("loss",)
    """Evaluation metrics the task reports (without `eval_`), checked against metric_for_best_model up front."""

    def prepare_data(self, raw, tokenizer, cfg, main_process_first: Callable) -> PreparedData:
        """Tokenize the raw `DatasetDict` (splits train/validation/test, some may be missing).

        `main_process_first` is `accelerator.main_process_first`: tokenize on rank 0 first so the
        others read the `datasets` cache instead of repeating the work.
        """
        raise NotImplementedError

    def build_model(self, cfg, prepared: PreparedData, tokenizer):
        """Load the pretrained model with the right head (and label maps / resized embeddings)."""
        raise NotImplementedError

    def loss(self, cfg) -> ItemLoss:
        """The training and evaluation loss (default: cross-entropy over labels, -100 ignored, with the
        configured label smoothing)."""
        from ..losses import CrossEntropy  # torch: not imported by the config checks that read task names

        return CrossEntropy(label_smoothing=cfg.training.label_smoothing_factor)

    def collator(self, tokenizer, cfg, for_training: bool) -> Callable:
        """Batch collator (dynamic padding; MLM masking)."""
        raise NotImplementedError

    def preprocess_logits(self, logits, labels):
        """Shrink logits before they are gathered across ranks (Trainer's preprocess_logits_for_metrics)."""
        return logits

    def compute_metrics(self, predictions: np.ndarray, label_ids: np.ndarray) -> dict:
        """Metrics from the gathered outputs of `preprocess_logits` (without the `eval_` prefix)."""
        raise NotImplementedError

    def metrics_from_loss(self, eval_loss: float) -> dict:
        """Metrics that follow from the loss alone (MLM: perplexity)."""
        return {}

    def baseline(self, dataset) -> Optional[str]:
        """A trivial model's score on `dataset`, printed next to the final metrics for scale (or None)."""
        return None

    def write_predictions(self, path, predictions: np.ndarray, prepared: PreparedData, model_config) -> None:
        """Write the prediction file for the test split."""
        raise NotImplementedError
