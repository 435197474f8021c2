"""Regression on one or two text columns (STS-B style similarity scores, ratings), as run_glue.py's
`is_regression` path: a one-output `AutoModelForSequenceClassification` with `problem_type="regression"`,
trained on the squared error.

Text columns, unlabelled rows and tokenization are classification's (this task subclasses it); only the
target (a float), the head, the loss, the metrics and the prediction file differ.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from ..errors import DataError
from ..losses import ItemLoss, MeanSquaredError
from .base import PreparedData
from .classification import ClassificationTask
from .labels import check_no_label_smoothing, is_missing, is_numeric_feature, label_source, labelled_splits
from .outputs import atomic_csv


class RegressionTask(ClassificationTask):
    name = "regression"
    metric_names = ("loss", "mse", "rmse", "pearson", "spearmanr")
    problem_type = "regression"
    detects_label_kind = False

    def __init__(self):
        super().__init__()
        self._train_mean: Optional[float] = None

    def label_list(self, raw, cfg) -> None:
        """No label set: the target is the number itself. Checks every labelled split holds numbers."""
        check_no_label_smoothing(cfg, self.name)
        col = cfg.data.label_column_name
        for split, ds in labelled_splits(raw, col):
            feature = ds.features[col]
            if not is_numeric_feature(feature):
                sample = next((v for v in ds[col] if not is_missing(v)), None)
                raise DataError(f"Regression needs numbers, but the label column {col!r} of the {split} split "
                                f"holds {getattr(feature, 'dtype', feature)} values (e.g. {sample!r}); convert it "
                                f"to numbers or set task: classification.")
        values = [float(v) for v in label_source(raw)[col]]
        if not values:
            raise DataError(f"The label column {col!r} of the train split holds no labels.")
        self._train_mean = float(np.mean(values))
        return None

    def label_encoder(self, raw, cfg, labels) -> Callable:
        return _to_float

    def model_config_kwargs(self, prepared: PreparedData) -> dict:
        return {"num_labels": 1, "problem_type": self.problem_type}

    def loss(self, cfg) -> ItemLoss:
        return MeanSquaredError()

    def preprocess_logits(self, logits, labels):
        return logits.float().squeeze(-1)  # one output per sample: gather (B,) rather than (B, 1)

    def compute_metrics(self, predictions: np.ndarray, label_ids: np.ndarray) -> dict:
        return regression_metrics(predictions, label_ids)

    def baseline(self, dataset):
        if dataset is None or "labels" not in dataset.column_names or len(dataset) == 0:
            return None
        y = np.asarray(dataset["labels"], dtype=np.float64)
        # The train mean is what a model that ignores the text would predict; the validation mean would peek.
        mean = self._train_mean if self._train_mean is not None else float(y.mean())
        mse = float(np.mean((y - mean) ** 2))
        return f"mean predictor ({mean:.4g}) mse {mse:.4g}, rmse {math.sqrt(mse):.4g}"

    def write_predictions(self, path, predictions: np.ndarray, prepared: PreparedData, model_config) -> None:
        write_regression_predictions(path, predictions, prepared.test_ids)


def _to_float(value) -> float:
    return float("nan") if is_missing(value) else float(value)


def regression_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict:
    """mse, rmse, Pearson and Spearman correlations (NaN with fewer than two samples or a constant side)."""
    from scipy.stats import pearsonr, spearmanr

    p = np.asarray(predictions, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    mse = float(np.mean((p - y) ** 2))
    # A constant prediction has no correlation: report NaN (scipy's answer) rather than a made-up 0.
    varied = len(p) >= 2 and np.ptp(p) > 0 and np.ptp(y) > 0
    return {
        "mse": mse,
        "rmse": math.sqrt(mse),
        "pearson": float(pearsonr(p, y)[0]) if varied else float("nan"),
        "spearmanr": float(spearmanr(p, y)[0]) if varied else float("nan"),
    }


def write_regression_predictions(path, predictions: np.ndarray, ids) -> None:
    """CSV: id, predicted value."""
    values = np.asarray(predictions, dtype=np.float64).reshape(len(ids), -1)[:, 0]
    atomic_csv(path, ["id", "prediction"], ([i, f"{v:.6g}"] for i, v in zip(ids, values)))
