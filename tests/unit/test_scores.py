"""The classification and multi-label scores are sklearn's, to the bit, without importing sklearn in a run
(tasks/outputs.py says why): compared here with sklearn itself over random and degenerate cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, matthews_corrcoef, precision_recall_fscore_support

from scaletune.tasks.multilabel import set_scores
from scaletune.tasks.outputs import classification_metrics


def sklearn_classification(logits: np.ndarray, labels: np.ndarray) -> dict:
    preds = logits.argmax(-1)
    mask = labels != -100
    preds, labels = preds[mask], labels[mask]
    average = "binary" if logits.shape[-1] == 2 else "macro"
    p, r, f1, _ = precision_recall_fscore_support(labels, preds, average=average, zero_division=0)
    return {"accuracy": float(accuracy_score(labels, preds)), "precision": float(p), "recall": float(r),
            "f1": float(f1), "matthews_correlation": float(matthews_corrcoef(labels, preds))}


def cases(rng: np.random.Generator):
    for num_classes in (2, 3, 5, 11):
        for n in (1, 2, 7, 64, 257):
            logits = rng.normal(size=(n, num_classes))
            labels = rng.integers(0, num_classes, size=n)
            yield logits, labels
            yield logits, np.where(rng.random(n) < 0.3, -100, labels)  # ignored rows
            yield logits, np.full(n, num_classes - 1)  # one true class
            skewed = logits.copy()
            skewed[:, 0] += 5  # (almost) always predicts class 0
            yield skewed, labels
            yield skewed, np.zeros(n, dtype=int)  # a constant prediction equal to a constant truth: MCC 0


def test_classification_metrics_are_sklearns_to_the_bit():
    rng = np.random.default_rng(0)
    checked = 0
    for logits, labels in cases(rng):
        if not (labels != -100).any():
            continue
        assert classification_metrics(logits, labels) == sklearn_classification(logits, labels), (logits, labels)
        checked += 1
    assert checked > 90


def test_nothing_counted_scores_nan():
    scores = classification_metrics(np.zeros((3, 2)), np.full(3, -100))
    assert all(np.isnan(v) for v in scores.values())


@pytest.mark.parametrize("labels", [3, 8])
def test_multilabel_scores_are_sklearns_to_the_bit(labels):
    rng = np.random.default_rng(labels)
    for rows in (1, 5, 40):
        for density in (0.0, 0.2, 0.6):
            truth = rng.random((rows, labels)) < density
            predicted = rng.random((rows, labels)) < 0.4
            predicted[:, 0] = False  # a label never predicted: its precision divides by zero
            got = set_scores(predicted, truth)
            for average in ("micro", "macro"):
                p, r, f1, _ = precision_recall_fscore_support(truth, predicted, average=average, zero_division=0)
                assert (got[f"precision_{average}"], got[f"recall_{average}"], got[f"f1_{average}"]) == \
                       (float(p), float(r), float(f1)), (truth, predicted, average)
            assert got["exact_match"] == float((predicted == truth).all(axis=1).mean())
