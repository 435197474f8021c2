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
    """accuracy, precision, recall, F1 (binary for 2 classes, macro otherwise) and Matthews correlation."""
    from sklearn.metrics import accuracy_score, matthews_corrcoef, precision_recall_fscore_support

    preds = logits.argmax(-1) if logits.ndim > 1 else logits
    mask = label_ids != -100
    preds, label_ids = preds[mask], label_ids[mask]
    num_classes = logits.shape[-1] if logits.ndim > 1 else int(max(preds.max(), label_ids.max())) + 1
    average = "binary" if num_classes == 2 else "macro"
    p, r, f1, _ = precision_recall_fscore_support(label_ids, preds, average=average, zero_division=0)
    return {
        "accuracy": float(accuracy_score(label_ids, preds)),
        "precision": float(p),
        "recall": float(r),
        "f1": float(f1),
        "matthews_correlation": float(matthews_corrcoef(label_ids, preds)),
    }


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
