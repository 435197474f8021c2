"""Data paths: every local format, two text columns, int and string labels, hub-style DatasetDicts taken
from a local path (the code path of `dataset_name: imdb` / `glue`+`cola`), validation carving."""

from __future__ import annotations

import csv
import json

import pytest

from scaletune.config import load_config
from scaletune.data import load_raw_datasets
from scaletune.train import run

ROWS = [{"id": i, "premise": f"the film was {w}", "hypothesis": f"it is {w2}", "label": i % 3}
        for i, (w, w2) in enumerate([("good", "great"), ("bad", "fine"), ("long", "slow")] * 10)]


def write(path, fmt, rows):
    if fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif fmt == "tsv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
            w.writeheader()
            w.writerows(rows)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path)
    return str(path)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_local_formats_with_two_text_columns_and_int_labels(fmt, tmp_path):
    train = write(tmp_path / f"train.{fmt}", fmt, ROWS)
    cfg = load_config({"train_file": train, "text_column_names": "premise,hypothesis",
                       "validation_split_percentage": 20})
    raw = load_raw_datasets(cfg)
    assert set(raw) == {"train", "validation"}
    assert len(raw["train"]) + len(raw["validation"]) == len(ROWS) and len(raw["validation"]) == 6
    assert raw["train"][0]["premise"].startswith("the film was")


@pytest.mark.slow
def test_sentence_pairs_and_int_labels_train_end_to_end(tiny_bert, tmp_path):
    """Two text columns are encoded as a pair ([SEP] between, token types 0/1); integer labels are ids."""
    from transformers import AutoConfig

    train = write(tmp_path / "train.jsonl", "jsonl", ROWS)
    r = run({"model_name_or_path": tiny_bert, "train_file": train, "text_column_names": "premise,hypothesis",
             "validation_split_percentage": 20, "output_dir": str(tmp_path / "o"), "max_steps": 2,
             "save_strategy": "no", "do_predict": False, "disable_tqdm": True, "ignore_mismatched_sizes": True})
    assert r.metrics["eval_loss"] > 0
    config = AutoConfig.from_pretrained(tmp_path / "o")
    assert config.num_labels == 3 and config.id2label == {0: "0", 1: "1", 2: "2"}


@pytest.mark.slow
def test_hub_style_dataset_from_a_local_path(tiny_bert, tmp_path):
    """What `dataset_name: imdb` loads from the hub -- a DatasetDict with a ClassLabel feature and train/test
    splits only -- read from a local path: validation is carved out, label names come from the ClassLabel,
    and test predictions are written."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    rows = {"text": [f"{'great lovely' if i % 2 else 'awful dull'} movie number {i}" for i in range(40)],
            "label": [i % 2 for i in range(40)]}
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features),
                               "test": datasets.Dataset.from_dict(rows, features=features).select(range(10))})
    dd.save_to_disk(tmp_path / "imdb_like")
    r = run({"model_name_or_path": tiny_bert, "dataset_name": str(tmp_path / "imdb_like"),
             "validation_split_percentage": 25, "output_dir": str(tmp_path / "o"), "max_steps": 2,
             "save_strategy": "no", "disable_tqdm": True})
    assert {"eval_accuracy", "test_accuracy"} <= set(r.metrics)
    preds = list(csv.DictReader(open(r.predictions_file)))
    assert len(preds) == 10 and set(preds[0]) == {"id", "prediction", "prob_neg", "prob_pos"}


@pytest.mark.slow
def test_glue_style_unlabelled_test_split(tiny_bert, tmp_path):
    """GLUE test splits carry label -1: predictions are written, no test metrics are invented."""
    rows = [{"idx": i, "sentence": f"sentence {i} is {'fine' if i % 2 else 'wrong'}", "label": i % 2}
            for i in range(30)]
    test = [dict(r, label=-1) for r in rows[:7]]
    r = run({"model_name_or_path": tiny_bert, "train_file": write(tmp_path / "train.csv", "csv", rows),
             "test_file": write(tmp_path / "test.csv", "csv", test), "output_dir": str(tmp_path / "o"),
             "max_steps": 1, "save_strategy": "no", "disable_tqdm": True})
    assert not any(k.startswith("test_") for k in r.metrics)
    preds = list(csv.DictReader(open(r.predictions_file)))
    assert [p["id"] for p in preds] == [str(i) for i in range(7)]  # the idx column names the rows
