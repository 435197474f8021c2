"""What the classification-family tasks write and score: probabilities, metrics, prediction files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def classification_metrics(logits: np.ndarray, label_ids: np.ndarray) -> dict:
    """accuracy, precision, recall, F1 (binary for 2 classes, macro otherwise) and Matthews correlation: the
    values of sklearn's accuracy_score, precision_recall_fscore_support(zero_division=0) and matthews_corrcoef,
    to the bit (tests/unit/test_scores.py), from one confusion matrix. Not sklearn itself: importing
    sklearn.metrics costs ~1.5 s of CPU, paid by every process that evaluates (a sweep's trial, a test's run)."""
    preds = logits.argmax(-1) if logits.ndim > 1 else logits
    mask = label_ids != -100
    preds, label_ids = preds[mask], label_ids[mask]
    if not len(label_ids):  # nothing counted: no score (sklearn raises here)
        return dict.fromkeys(("accuracy", "precision", "recall", "f1", "matthews_correlation"), float("nan"))
    num_classes = logits.shape[-1] if logits.ndim > 1 else int(max(preds.max(), label_ids.max())) + 1
    # The classes seen in either array, as sklearn's unique_labels: macro averages over these only.
    classes, codes = np.unique(np.concatenate([label_ids, preds]), return_inverse=True)
    k = len(classes)
    confusion = np.bincount(codes[:len(label_ids)] * k + codes[len(label_ids):], minlength=k * k).reshape(k, k)
    tp, predicted, true = np.diag(confusion), confusion.sum(axis=0), confusion.sum(axis=1)
    if num_classes == 2:  # sklearn's average="binary": the scores of class 1 alone
        one = classes == 1
        tp, predicted, true = tp[one].sum(keepdims=True), predicted[one].sum(keepdims=True), true[one].sum(keepdims=True)
    p, r, f1 = precision_recall_f1(tp, predicted, true)
    return {
        "accuracy": float(np.average(label_ids == preds)),
        "precision": p,
        "recall": r,
        "f1": f1,
        "matthews_correlation": _matthews(confusion),
    }


def precision_recall_f1(tp: np.ndarray, predicted: np.ndarray, true: np.ndarray) -> tuple[float, float, float]:
    """Precision, recall and F1 from per-label counts, averaged over the labels (macro; one label: its own), a
    zero denominator scoring 0: sklearn's formulas and order of operations (F1 = 2tp / (true + predicted))."""
    precision = _divide(tp, predicted)
    recall = _divide(tp, true)
    f1 = _divide(2.0 * tp.astype(np.float64), 1.0 * true.astype(np.float64) + predicted.astype(np.float64))
    return float(np.mean(precision)), float(np.mean(recall)), float(np.mean(f1))


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    zero = denominator == 0
    denominator = np.asarray(denominator, dtype=np.float64).copy()
    denominator[zero] = 1
    result = np.asarray(numerator, dtype=np.float64) / denominator
    result[zero] = 0.0
    return result


def _matthews(confusion: np.ndarray) -> float:
    t_sum = confusion.sum(axis=1, dtype=np.float64)
    p_sum = confusion.sum(axis=0, dtype=np.float64)
    n_correct = np.trace(confusion, dtype=np.float64)
    n_samples = p_sum.sum()
    cov_ytyp = n_correct * n_samples - np.dot(t_sum, p_sum)
    cov_ypyp = n_samples**2 - np.dot(p_sum, p_sum)
    cov_ytyt = n_samples**2 - np.dot(t_sum, t_sum)
    product = cov_ypyp * cov_ytyt
    return 0.0 if product == 0 else float(cov_ytyp / np.sqrt(product))


def atomic_csv(path, header: list, rows) -> None:
    """Write a CSV through a temporary file, so a crash never leaves half a prediction file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    tmp.replace(path)


def label_names(id2label: dict, n: int) -> list[str]:
    # id2label keys are ints in memory and strings after a config.json round trip.
    return [id2label[i] if i in id2label else id2label[str(i)] for i in range(n)]


def write_prediction_file(path, logits: np.ndarray, ids, id2label: dict) -> None:
    """CSV: id, predicted label, and one probability column per label (as the tutorial's predict step)."""
    probs = softmax(logits.astype(np.float64))
    names = label_names(id2label, probs.shape[1])
    atomic_csv(path, ["id", "prediction"] + [f"prob_{n}" for n in names],
               ([i, names[int(row.argmax())]] + [f"{p:.6f}" for p in row] for i, row in zip(ids, probs)))
