"""Regression and multi-label runs end to end on slices of the packaged real data (Lee document-pair
similarity, tweet entity types) with a tiny BERT: train, evaluate, export, predict.

`eval_loss` is recomputed by hand from the exported model over the validation rows -- the mean squared error,
the binary cross-entropy mean over label slots -- so it proves evaluation uses the task's loss (the seam),
not a cross-entropy of its own.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from scaletune import assets
from scaletune.train import run

pytestmark = pytest.mark.slow  # every test here launches a training run or a process

COMMON = {"max_steps": 4, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8,
          "max_seq_length": 64, "save_strategy": "no", "disable_tqdm": True, "learning_rate": 1e-3,
          "ignore_mismatched_sizes": True}  # the tiny model was saved with a 2-class head


def validation_rows(dataset: str, limit: int) -> list[dict]:
    path = assets.dataset_files(dataset)["validation"]
    if path.endswith(".jsonl"):
        rows = [json.loads(line) for line in open(path)]
    else:
        rows = list(csv.DictReader(open(path)))
    return rows[:limit]


@torch.no_grad()
def exported_logits(model_dir: str, texts: list[tuple]) -> torch.Tensor:
    """The exported model's logits, one example at a time (no padding in play)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = [model(**tok(*t, truncation=True, max_length=COMMON["max_seq_length"], return_tensors="pt")).logits[0]
           for t in texts]
    return torch.stack(out).double()


def test_regression_trains_evaluates_exports_and_predicts(tiny_bert, tmp_path):
    out = str(tmp_path / "reg")
    r = run({"model_name_or_path": tiny_bert, "dataset_name": "packaged:lee_similarity", "task": "regression",
             "max_train_samples": 48, "max_eval_samples": 20, "max_predict_samples": 9, "output_dir": out,
             **COMMON})
    assert r.global_step == 4
    m = r.metrics
    assert {"eval_loss", "eval_mse", "eval_rmse", "eval_pearson", "eval_spearmanr"} <= set(m)
    rows = validation_rows("packaged:lee_similarity", 20)
    logits = exported_logits(out, [(row["sentence1"], row["sentence2"]) for row in rows])
    assert logits.shape == (20, 1)
    y = torch.tensor([float(row["label"]) for row in rows], dtype=torch.float64)
    hand_mse = ((logits[:, 0] - y) ** 2).mean().item()
    assert m["eval_loss"] == pytest.approx(hand_mse, abs=1e-5)
    assert m["eval_mse"] == pytest.approx(hand_mse, abs=1e-5)  # the metric and the loss agree
    preds = list(csv.DictReader(open(r.predictions_file)))
    assert len(preds) == 9 and list(preds[0]) == ["id", "prediction"]
    assert all("-" in p["id"] for p in preds)  # ids name the document pair, e.g. "3-17"
    float(preds[0]["prediction"])


def test_multilabel_trains_evaluates_exports_and_predicts(tiny_bert, tmp_path):
    out = str(tmp_path / "ml")
    r = run({"model_name_or_path": tiny_bert, "dataset_name": "packaged:tweet_entity_types", "task": "multilabel",
             "max_eval_samples": 24, "max_predict_samples": 10, "output_dir": out,
             "label_delimiter": ";", **COMMON})
    assert r.global_step == 4
    m = r.metrics
    assert {"eval_loss", "eval_f1_micro", "eval_f1_macro", "eval_precision_micro", "eval_recall_macro",
            "eval_exact_match"} <= set(m)
    config = json.loads(Path(out, "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    assert labels == sorted(labels) and len(labels) >= 5  # sorted distinct entity types of the train slice
    rows = validation_rows("packaged:tweet_entity_types", 24)
    logits = exported_logits(out, [(row["text"],) for row in rows])
    target = torch.tensor([[1.0 if lab in row["label"] else 0.0 for lab in labels] for row in rows],
                          dtype=torch.float64)
    hand_bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target).item()  # mean over slots
    assert m["eval_loss"] == pytest.approx(hand_bce, abs=1e-5)
    # Subset accuracy by hand, at the default threshold 0.5 (logit >= 0).
    assert m["eval_exact_match"] == pytest.approx(((logits >= 0) == (target > 0)).all(dim=1).double().mean().item())
    preds = list(csv.DictReader(open(r.predictions_file)))
    assert len(preds) == 10 and list(preds[0]) == ["id", "prediction"] + [f"prob_{lab}" for lab in labels]
    for p in preds:  # the predicted set is exactly the labels whose probability passes the threshold
        assert p["prediction"] == ";".join(lab for lab in labels if float(p[f"prob_{lab}"]) >= 0.5)


def test_autodetected_regression_saves_problem_type(tiny_bert, tmp_path):
    """`task: classification` on a float label column trains a regression head, and the exported config says so
    (transformers' pipelines and `scaletune.predict` read problem_type to decode the outputs)."""
    from transformers import AutoConfig

    out = str(tmp_path / "auto")
    r = run({"model_name_or_path": tiny_bert, "dataset_name": "packaged:lee_similarity",
             "max_train_samples": 16, "max_eval_samples": 8, "max_predict_samples": 4, "output_dir": out,
             **{**COMMON, "max_steps": 1}})
    assert "eval_pearson" in r.metrics and "eval_accuracy" not in r.metrics
    config = AutoConfig.from_pretrained(out)
    assert config.problem_type == "regression" and config.num_labels == 1
