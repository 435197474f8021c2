"""Multi-label classification: each text carries a set of labels (topics, tags, entity types), possibly empty.

Labels come as a list column (JSON/JSONL/parquet/hub `Sequence`) or as one string per row split on
`label_delimiter` (`"sports|politics"`). The label set is the sorted distinct labels of the train split;
each row becomes a multi-hot float vector, trained with a sigmoid per label slot (binary cross-entropy
normalised over label slots, as transformers' `problem_type="multi_label_classification"`). A label is
predicted when its probability is at least `multilabel_threshold` (default 0.5).

An empty list is a valid row (no label applies). A missing value (JSON null, an empty CSV cell) is an
unlabelled row, handled as classification handles them (error, or `drop_unlabelled_rows`).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Optional

import numpy as np

from ..errors import DataError
from ..losses import BinaryCrossEntropy, ItemLoss
from .base import PreparedData
from .classification import ClassificationTask
from .labels import (check_no_label_smoothing, is_list_feature, is_missing, is_string_feature, label_source,
                     labelled_splits, row_names)
from .outputs import atomic_csv, label_names, precision_recall_f1

DEFAULT_DELIMITER = "|"
"""Joins a predicted label set in the predictions file when no label_delimiter is configured."""


def parse_label_set(value, delimiter: Optional[str], names: Optional[list] = None) -> Optional[tuple[str, ...]]:
    """One row's labels as a sorted tuple of distinct names; None when the row has no label value at all.

    Duplicates within a row collapse (a set); an empty list or empty string is the empty set. `names` are the
    ClassLabel names of a hub `Sequence(ClassLabel)` column (go_emotions), whose rows hold label ids.
    """
    if is_missing(value):
        return None
    if isinstance(value, (list, tuple)):
        if names is not None:
            bad = [v for v in value if is_missing(v) or not 0 <= v < len(names)]
            if bad:
                raise ValueError(f"label id {bad[0]} outside the {len(names)} ClassLabel names")
            value = [names[v] for v in value]
        parts = ["" if is_missing(v) else str(v).strip() for v in value]
        if any(p == "" for p in parts):
            raise ValueError("an empty label inside the list")
    elif isinstance(value, str) and delimiter:
        parts = [p.strip() for p in value.split(delimiter)]
        # "a||b" or a trailing delimiter leaves an empty part: formatting noise, not a label.
        parts = [p for p in parts if p]
    else:
        raise ValueError(f"{value!r} is neither a list nor a label_delimiter string")
    return tuple(sorted(set(parts)))


def _sort_key(name: str):
    # Integer label names sort numerically (2 before 10), as the classification label set does.
    try:
        return (0, int(name), "")
    except ValueError:
        return (1, 0, name)


def multi_hot(label_set, label_to_id: dict) -> list[float]:
    vec = [0.0] * len(label_to_id)
    for lab in label_set:
        vec[label_to_id[lab]] = 1.0
    return vec


def _sigmoid(x: np.ndarray) -> np.ndarray:
    from scipy.special import expit

    return expit(np.asarray(x, dtype=np.float64))


class MultiLabelTask(ClassificationTask):
    name = "multilabel"
    metric_names = ("loss", "f1_micro", "f1_macro", "precision_micro", "precision_macro", "recall_micro",
                    "recall_macro", "exact_match")
    problem_type = "multi_label_classification"
    detects_label_kind = False

    def __init__(self):
        super().__init__()
        self.threshold = 0.5
        self.delimiter: Optional[str] = None
        self._labels: list[str] = []
        self._majority_set: Optional[tuple] = None
        self._label_frequency: list[float] = []
        self._train_rows = 0
        self._names: Optional[list] = None

    # ------------------------------------------------------------------ data
    def _parsed(self, ds, col: str, split: str) -> list:
        out = []
        for i, v in enumerate(ds[col]):
            try:
                out.append(parse_label_set(v, self.delimiter, self._names))
            except ValueError as e:
                raise DataError(f"The {split} split's label column {col!r} at {row_names(ds, [i])} holds {e}; "
                                f"multi-label needs a list of labels per row, or strings with label_delimiter "
                                f"set (e.g. label_delimiter: '|').") from None
        return out

    def label_list(self, raw, cfg) -> list[str]:
        """Sorted distinct labels of the train split; checks the column's type in every split first."""
        check_no_label_smoothing(cfg, self.name)
        self.threshold = cfg.data.multilabel_threshold  # checked to lie in (0, 1) by the config
        self.delimiter = cfg.data.label_delimiter
        col = cfg.data.label_column_name
        for split, ds in labelled_splits(raw, col):
            feature = ds.features[col]
            if not (is_list_feature(feature) or (self.delimiter and is_string_feature(feature))):
                fix = ("set label_delimiter (e.g. '|') to split its strings" if is_string_feature(feature)
                       else "give each row a list of labels (a list column in JSON/JSONL/parquet)")
                raise DataError(f"Multi-label needs a set of labels per row, but the label column {col!r} of the "
                                f"{split} split holds single {getattr(feature, 'dtype', feature)} values; {fix}.")
        source = label_source(raw)
        inner = getattr(source.features[col], "feature", None)
        self._names = list(inner.names) if hasattr(inner, "names") else None
        sets = [s for s in self._parsed(source, col, source.split or "train") if s is not None]
        # A ClassLabel feature keeps all its names in id order, as a ClassLabel column does for classification.
        labels = self._names or sorted({lab for s in sets for lab in s}, key=_sort_key)
        if not labels:
            raise DataError(f"No row of the train split's label column {col!r} holds a label; multi-label needs "
                            f"at least one label to learn.")
        self._majority_set = Counter(sets).most_common(1)[0][0]
        self._labels = labels
        counts = Counter(lab for s in sets for lab in s)
        self._label_frequency = [counts[lab] / len(sets) for lab in labels]
        self._train_rows = len(sets)
        return labels

    def _test_unlabelled(self, value, classlabel, labels) -> bool:
        return is_missing(value)

    def label_encoder(self, raw, cfg, labels) -> Callable:
        col = cfg.data.label_column_name
        label_to_id = {lab: i for i, lab in enumerate(labels)}
        known = set(labels)
        self._labels = list(labels)  # the encoding's label order: flattened outputs are reshaped by it
        for split, ds in raw.items():
            if col not in ds.column_names or split == "train":
                continue
            unknown = sorted({lab for s in self._parsed(ds, col, split) if s for lab in s} - known, key=_sort_key)
            if unknown:
                raise DataError(f"The {split} split has labels {unknown[:5]} that are not among the {len(labels)} "
                                f"training labels {labels[:10]}; fix the data or train on a split that contains "
                                f"every label.")
        return _MultiHot(label_to_id, self.delimiter, self._names)

    def loss(self, cfg) -> ItemLoss:
        return BinaryCrossEntropy()

    def build_model(self, cfg, prepared: PreparedData, tokenizer):
        model = super().build_model(cfg, prepared, tokenizer)
        init_head_bias_to_prior(model, self.new_parameters, self._label_frequency, self._train_rows)
        return model

    # ------------------------------------------------------------------ outputs
    def _as_matrix(self, predictions: np.ndarray) -> np.ndarray:
        # Evaluation may hand back label-slot outputs flattened (it keeps "token-level" positions when both
        # logits and labels are 2-D); every slot is counted, so the rows are restored by reshaping.
        if predictions.ndim == 1 and self._labels:
            return predictions.reshape(-1, len(self._labels))
        return predictions

    def compute_metrics(self, predictions: np.ndarray, label_ids: np.ndarray) -> dict:
        return multilabel_metrics(self._as_matrix(predictions), self._as_matrix(label_ids), self.threshold)

    def baseline(self, dataset):
        if dataset is None or "labels" not in dataset.column_names or len(dataset) == 0:
            return None
        if self._majority_set is None:
            return None
        truth = np.asarray(dataset["labels"], dtype=np.float64) >= 0.5
        guess = np.zeros_like(truth)
        guess[:, [self._labels.index(lab) for lab in self._majority_set]] = True
        scores = set_scores(guess, truth)
        shown = "{" + ", ".join(self._majority_set) + "}"
        return (f"majority label set {shown} exact_match {scores['exact_match']:.4g}, "
                f"f1_micro {scores['f1_micro']:.4g}")

    def write_predictions(self, path, predictions: np.ndarray, prepared: PreparedData, model_config) -> None:
        logits = self._as_matrix(predictions)
        write_multilabel_predictions(path, logits, prepared.test_ids, model_config.id2label, self.threshold,
                                     self.delimiter or DEFAULT_DELIMITER)


def init_head_bias_to_prior(model, new_parameters: set[str], frequency: list[float], num_rows: int) -> bool:
    """Start a newly initialised head's bias at each label's log-odds in train (the prior), as detection heads
    are initialised (RetinaNet). With rare labels a zero bias predicts 0.5 for every slot, and the first epoch
    of updates goes into learning how rare each label is -- large, uniform gradients that also pull the
    encoder -- before any into which texts carry which label. A head loaded from the checkpoint is left alone.
    Returns whether a bias was set."""
    import torch

    width = len(frequency)
    for name, module in reversed(list(model.named_modules())):
        if isinstance(module, torch.nn.Linear) and module.out_features == width and module.bias is not None:
            if f"{name}.bias" not in new_parameters:
                return False
            # Clamped half a row away from 0 and 1: a label in every (or no) train row gets a finite log-odds.
            eps = 0.5 / max(num_rows, 1)
            p = torch.tensor(frequency, dtype=torch.float64).clamp(eps, 1 - eps)
            with torch.no_grad():
                module.bias.copy_(torch.log(p / (1 - p)).to(module.bias.dtype))
            return True
    return False


class _MultiHot:
    """value -> multi-hot float vector. A class (not a closure) so the `datasets` cache key is the label map."""

    def __init__(self, label_to_id: dict, delimiter: Optional[str], names: Optional[list]):
        self.label_to_id = label_to_id
        self.delimiter = delimiter
        self.names = names

    def __call__(self, value):
        label_set = parse_label_set(value, self.delimiter, self.names)
        if label_set is None:  # only in a test split, whose labels are dropped when any row lacks them
            return [-100.0] * len(self.label_to_id)
        return multi_hot(label_set, self.label_to_id)


def multilabel_metrics(logits: np.ndarray, label_ids: np.ndarray, threshold: float = 0.5) -> dict:
    """Micro/macro precision, recall, F1 over label slots and subset accuracy (`exact_match`).

    Macro averages over every label of the label set; a label never true nor predicted scores 0 (sklearn's
    zero_division=0, as transformers' examples use).
    """
    predicted = _sigmoid(logits) >= threshold
    counted = (label_ids != -100).all(axis=1)  # a row with uncounted slots has no ground truth
    return set_scores(predicted[counted], label_ids[counted] >= 0.5)


def set_scores(predicted: np.ndarray, truth: np.ndarray) -> dict:
    """The multi-label metrics of boolean prediction and truth matrices (rows x label slots): sklearn's
    precision_recall_fscore_support(average="micro"/"macro", zero_division=0), to the bit."""
    tp, guessed, true = (predicted & truth).sum(axis=0), predicted.sum(axis=0), truth.sum(axis=0)
    out = {}
    for average, counts in (("micro", (tp.sum(keepdims=True), guessed.sum(keepdims=True), true.sum(keepdims=True))),
                            ("macro", (tp, guessed, true))):
        p, r, f1 = precision_recall_f1(*counts)
        out.update({f"precision_{average}": p, f"recall_{average}": r, f"f1_{average}": f1})
    out["exact_match"] = float((predicted == truth).all(axis=1).mean())
    return out


def write_multilabel_predictions(path, logits: np.ndarray, ids, id2label: dict, threshold: float,
                                 delimiter: str) -> None:
    """CSV: id, the predicted label set joined by `delimiter` (empty when no label passes), one probability
    column per label."""
    probs = _sigmoid(logits)
    names = label_names(id2label, probs.shape[1])
    atomic_csv(path, ["id", "prediction"] + [f"prob_{n}" for n in names],
               ([i, delimiter.join(n for n, p in zip(names, row) if p >= threshold)] + [f"{p:.6f}" for p in row]
                for i, row in zip(ids, probs)))
