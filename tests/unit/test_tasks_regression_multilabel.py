"""Regression and multi-label tasks, and classification's label rules: parsing, the label set, unlabelled
rows, autodetection, multi-hot targets, metrics checked by hand, prediction files, and the packaged data.

Data goes through real files and `scaletune.data.load_raw_datasets` (so an empty CSV cell is what pandas
makes of it), with the real MiniLM tokenizer; the training runs are in tests/e2e/test_task_runs.py.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from scaletune import assets
from scaletune.config import ConfigError, load_config
from scaletune.data import load_raw_datasets
from scaletune.errors import DataError
from scaletune.losses import BinaryCrossEntropy, CrossEntropy, MeanSquaredError
from scaletune.tasks import get_task, task_for_problem_type
from scaletune.tasks.multilabel import multilabel_metrics, parse_label_set, write_multilabel_predictions
from scaletune.tasks.regression import regression_metrics, write_regression_predictions

TASK_LOGGER = "scaletune.tasks.classification"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.model_path("packaged:minilm"))


def write_csv(path: Path, rows: list[dict]) -> str:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def prepare(tokenizer, splits: dict, **options):
    """Load the split files as a run would and prepare them with the configured task: (task, prepared)."""
    cfg = load_config({**{f"{s}_file": p for s, p in splits.items()}, "max_seq_length": 32, **options})
    task = get_task(cfg.data.task)
    return task, task.prepare_data(load_raw_datasets(cfg), tokenizer, cfg, contextlib.nullcontext), cfg


# --------------------------------------------------------------------------- classification label rules


def test_integer_labels_one_to_five_are_five_classes(tokenizer, tmp_path):
    rows = [{"text": f"review number {i}", "label": i % 5 + 1} for i in range(20)]
    task, p, _ = prepare(tokenizer, {"train": write_csv(tmp_path / "t.csv", rows),
                                     "validation": write_csv(tmp_path / "v.csv", rows[:5])})
    assert p.label_list == [1, 2, 3, 4, 5]  # no phantom class 0
    assert list(p.train["labels"])[:5] == [0, 1, 2, 3, 4]  # label 1 is id 0, label 5 is id 4
    kwargs = task.model_config_kwargs(p)
    assert kwargs["num_labels"] == 5 and kwargs["id2label"] == {0: "1", 1: "2", 2: "3", 3: "4", 4: "5"}


def test_sparse_integer_labels_keep_their_sorted_order(tokenizer, tmp_path):
    rows = [{"text": f"t {i}", "label": [10, 2, 7][i % 3]} for i in range(9)]
    _, p, _ = prepare(tokenizer, {"train": write_csv(tmp_path / "t.csv", rows),
                                  "validation": write_csv(tmp_path / "v.csv", rows[:3])})
    assert p.label_list == [2, 7, 10]  # numeric order, not "10" < "2"
    assert list(p.validation["labels"]) == [2, 0, 1]


def test_unlabelled_rows_are_an_error_naming_count_and_rows(tokenizer, tmp_path):
    rows = [{"id": f"r{i}", "text": f"t {i}", "label": "" if i in (3, 8) else i % 2} for i in range(10)]
    files = {"train": write_csv(tmp_path / "t.csv", rows), "validation": write_csv(tmp_path / "v.csv", rows[:2])}
    with pytest.raises(DataError) as e:
        prepare(tokenizer, files)
    msg = str(e.value)
    assert "2 of 10 rows" in msg and "id r3, r8" in msg and "drop_unlabelled_rows" in msg
    assert "\n" not in msg


def test_drop_unlabelled_rows_drops_and_logs_the_count(tokenizer, tmp_path, caplog):
    # An integer CSV column with blank cells reads as floats 0.0/1.0: still class labels, not regression.
    rows = [{"text": f"t {i}", "label": "" if i in (3, 8) else i % 2} for i in range(10)]
    files = {"train": write_csv(tmp_path / "t.csv", rows), "validation": write_csv(tmp_path / "v.csv", rows[:2])}
    with caplog.at_level(logging.WARNING, logger=TASK_LOGGER):
        task, p, _ = prepare(tokenizer, files, drop_unlabelled_rows=True)
    assert task.name == "classification" and p.label_list == [0, 1]
    assert len(p.train) == 8 and list(p.train["labels"]) == [0, 1, 0, 0, 1, 0, 1, 1]
    assert any("Dropped 2 of 10 train rows" in r.getMessage() for r in caplog.records)
    assert any("whole-number floats" in r.getMessage() for r in caplog.records)


def test_glue_style_minus_one_test_labels_are_predicted_without_metrics(tokenizer, tmp_path):
    rows = [{"idx": i, "sentence": f"s {i}", "label": i % 2} for i in range(8)]
    files = {"train": write_csv(tmp_path / "t.csv", rows), "validation": write_csv(tmp_path / "v.csv", rows[:2]),
             "test": write_csv(tmp_path / "x.csv", [dict(r, label=-1) for r in rows[:3]])}
    task, p, _ = prepare(tokenizer, files)
    assert p.label_list == [0, 1] and "labels" not in p.test.column_names and p.test_ids == [0, 1, 2]


def test_fractional_floats_under_classification_are_regression(tokenizer, tmp_path, caplog):
    rows = [{"sentence1": f"a {i}", "sentence2": f"b {i}", "label": i / 8} for i in range(8)]
    files = {"train": write_csv(tmp_path / "t.csv", rows), "validation": write_csv(tmp_path / "v.csv", rows[:3])}
    with caplog.at_level(logging.WARNING, logger=TASK_LOGGER):
        task, p, cfg = prepare(tokenizer, files)
    assert [r.getMessage() for r in caplog.records if "regression task" in r.getMessage()] == [
        "task: classification -- the label column 'label' holds fractional numbers, so this is a regression "
        "task (set task: regression to choose it explicitly)."]
    # Every part of the run now speaks regression: targets, loss, head, metric names.
    assert task.name == "regression" and isinstance(task.loss(cfg), MeanSquaredError)
    assert list(p.validation["labels"]) == [0.0, 0.125, 0.25]
    assert task.model_config_kwargs(p) == {"num_labels": 1, "problem_type": "regression"}
    assert "pearson" in task.metric_names and "accuracy" not in task.metric_names
    # The pair is encoded as a pair: two token types.
    assert set(p.train[0]["token_type_ids"]) == {0, 1}


def test_numbers_mixed_with_text_are_an_error_naming_the_column(tokenizer, tmp_path):
    rows = [{"text": f"t {i}", "score": ["0.5", "0.75", "high"][i % 3]} for i in range(6)]
    files = {"train": write_csv(tmp_path / "t.csv", rows), "validation": write_csv(tmp_path / "v.csv", rows[:3])}
    with pytest.raises(DataError, match=r"label column 'score' mixes numbers \(0\.5, 0\.75\) with text \('high'\)"):
        prepare(tokenizer, files, label_column_name="score")


def test_regression_rejects_a_text_label_column(tokenizer, tmp_path):
    rows = [{"text": f"t {i}", "label": ["low", "high"][i % 2]} for i in range(4)]
    files = {"train": write_csv(tmp_path / "t.csv", rows), "validation": write_csv(tmp_path / "v.csv", rows)}
    with pytest.raises(DataError, match="Regression needs numbers, but the label column 'label' of the train"):
        prepare(tokenizer, files, task="regression")


def test_regression_accepts_integer_targets_as_floats(tokenizer, tmp_path):
    rows = [{"text": f"t {i}", "label": i % 5 + 1} for i in range(10)]
    files = {"train": write_csv(tmp_path / "t.csv", rows), "validation": write_csv(tmp_path / "v.csv", rows[:4])}
    task, p, _ = prepare(tokenizer, files, task="regression")
    assert list(p.validation["labels"]) == [1.0, 2.0, 3.0, 4.0] and p.label_list is None
    # Mean predictor: the train mean (3.0) on the validation labels 1..4 -> mse (4+1+0+1)/4 = 1.5.
    assert task.baseline(p.validation) == "mean predictor (3) mse 1.5, rmse 1.225"


# --------------------------------------------------------------------------- multi-label parsing


def test_parse_label_set_lists_and_delimited_strings():
    assert parse_label_set(["b", "a", "b"], None) == ("a", "b")  # a set: duplicates collapse
    assert parse_label_set([], None) == ()  # no label applies: a valid row
    assert parse_label_set("sports | politics|", "|") == ("politics", "sports")
    assert parse_label_set("", "|") == ()
    assert parse_label_set(None, "|") is None  # unlabelled, not empty
    with pytest.raises(ValueError, match="neither a list"):
        parse_label_set("sports", None)
    with pytest.raises(ValueError, match="empty label inside"):
        parse_label_set(["a", ""], None)


def test_list_column_is_multilabel_with_multi_hot_targets(tokenizer, tmp_path, caplog):
    sets = [["sport"], ["politics", "sport"], [], ["tech"]]
    rows = [{"id": i, "text": f"news {i}", "label": sets[i % 4]} for i in range(8)]
    files = {"train": write_jsonl(tmp_path / "t.jsonl", rows),
             "validation": write_jsonl(tmp_path / "v.jsonl", rows[:4])}
    with caplog.at_level(logging.WARNING, logger=TASK_LOGGER):
        task, p, cfg = prepare(tokenizer, files)
    assert any("holds lists of labels, so this is a multilabel task" in r.getMessage() for r in caplog.records)
    assert task.name == "multilabel" and isinstance(task.loss(cfg), BinaryCrossEntropy)
    assert p.label_list == ["politics", "sport", "tech"]  # sorted distinct labels of train
    assert [list(v) for v in p.validation["labels"]] == [[0, 1, 0], [1, 1, 0], [0, 0, 0], [0, 0, 1]]
    kwargs = task.model_config_kwargs(p)
    assert kwargs["problem_type"] == "multi_label_classification" and kwargs["id2label"] == {
        0: "politics", 1: "sport", 2: "tech"}
    # The collator hands the loss float multi-hot rows.
    batch = task.collator(tokenizer, cfg, False)([{k: p.validation[i][k] for k in p.validation.column_names}
                                                  for i in range(2)])
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [[0, 1, 0], [1, 1, 0]]


def test_hub_sequence_of_classlabel_keeps_its_names(tokenizer, tmp_path):
    """go_emotions-style columns: rows hold ClassLabel ids; the names (all of them, in id order) are the labels."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "labels": datasets.Sequence(datasets.ClassLabel(names=["joy", "anger", "fear"]))})
    rows = {"text": ["yay", "grr", "eek and yay", "meh"], "labels": [[0], [1], [2, 0], []]}
    folder = str(tmp_path / "hub")
    datasets.DatasetDict({s: datasets.Dataset.from_dict(rows, features=features)
                          for s in ("train", "validation")}).save_to_disk(folder)
    cfg = load_config({"dataset_name": folder, "label_column_name": "labels", "max_seq_length": 16})
    task = get_task("classification")
    p = task.prepare_data(load_raw_datasets(cfg), tokenizer, cfg, contextlib.nullcontext)
    assert task.name == "multilabel" and p.label_list == ["joy", "anger", "fear"]
    assert [list(v) for v in p.validation["labels"]] == [[1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 0, 0]]


def test_delimited_strings_need_label_delimiter(tokenizer, tmp_path):
    rows = [{"text": f"t {i}", "label": ["a|b", "b", "c|a"][i % 3]} for i in range(6)]
    files = {"train": write_csv(tmp_path / "t.csv", rows), "validation": write_csv(tmp_path / "v.csv", rows[:3])}
    with pytest.raises(DataError, match="set label_delimiter"):
        prepare(tokenizer, files, task="multilabel")
    task, p, _ = prepare(tokenizer, files, label_delimiter="|")  # chosen from the delimiter
    assert task.name == "multilabel" and p.label_list == ["a", "b", "c"]
    assert [list(v) for v in p.validation["labels"]] == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_multilabel_validation_label_missing_from_train_is_an_error(tokenizer, tmp_path):
    train = [{"text": f"t {i}", "label": [["a"], ["b"]][i % 2]} for i in range(4)]
    val = [{"text": "v", "label": ["a", "zz"]}]
    files = {"train": write_jsonl(tmp_path / "t.jsonl", train), "validation": write_jsonl(tmp_path / "v.jsonl", val)}
    with pytest.raises(DataError, match=r"validation split has labels \['zz'\] that are not among the 2"):
        prepare(tokenizer, files, task="multilabel")


def test_multilabel_null_row_is_unlabelled_but_empty_list_is_not(tokenizer, tmp_path):
    train = [{"text": f"t {i}", "label": [["a"], [], None][i % 3]} for i in range(6)]
    files = {"train": write_jsonl(tmp_path / "t.jsonl", train),
             "validation": write_jsonl(tmp_path / "v.jsonl", train[:2])}
    with pytest.raises(DataError, match=r"2 of 6 rows with no 'label' label \(0-based rows 2, 5\).*empty list \[\]"):
        prepare(tokenizer, files, task="multilabel")
    _, p, _ = prepare(tokenizer, files, task="multilabel", drop_unlabelled_rows=True)
    assert [list(v) for v in p.train["labels"]] == [[1], [0], [1], [0]]


def test_new_multilabel_head_starts_at_the_label_prior(tokenizer, tmp_path):
    """A fresh head predicts each label's train frequency (not 0.5); a head the checkpoint provides is kept."""
    from support.tiny import make_tiny_bert

    from scaletune.tasks.multilabel import init_head_bias_to_prior

    sets = [["a"], [], [], ["a", "b"]]  # a in 2 of 4 rows, b in 1 of 4
    rows = [{"text": f"t {i}", "label": s} for i, s in enumerate(sets)]
    files = {"train_file": write_jsonl(tmp_path / "t.jsonl", rows),
             "validation_file": write_jsonl(tmp_path / "v.jsonl", rows), "task": "multilabel"}

    def build(model_name_or_path):
        cfg = load_config({**files, "model_name_or_path": model_name_or_path})
        task = get_task("multilabel")
        prepared = task.prepare_data(load_raw_datasets(cfg), tokenizer, cfg, contextlib.nullcontext)
        return task, task.build_model(cfg, prepared, tokenizer)

    task, model = build("packaged:minilm")  # the pretrained encoder has no classification head
    assert "classifier.bias" in task.new_parameters
    assert torch.sigmoid(model.classifier.bias).tolist() == pytest.approx([0.5, 0.25])
    task, model = build(str(make_tiny_bert(tmp_path / "tiny", num_labels=2)))  # a head of the same shape
    assert "classifier.bias" not in task.new_parameters
    assert torch.sigmoid(model.classifier.bias).tolist() == pytest.approx([0.5, 0.5])  # as saved (zero bias)
    # A label in every (or no) train row gets a finite log-odds, half a row from certainty.
    head = torch.nn.Linear(4, 2)
    assert init_head_bias_to_prior(torch.nn.Sequential(torch.nn.Linear(4, 4), head), {"1.bias"}, [1.0, 0.0], 4)
    assert torch.sigmoid(head.bias).tolist() == pytest.approx([7 / 8, 1 / 8])


def test_multilabel_threshold_is_checked_by_the_config():
    with pytest.raises(ConfigError, match="multilabel_threshold=1.5 must be in"):
        load_config({"train_file": "x.jsonl", "task": "multilabel", "multilabel_threshold": 1.5})


# --------------------------------------------------------------------------- metrics by hand


def test_regression_metrics_by_hand():
    p = np.array([1.0, 2.0, 3.0, 5.0])
    y = np.array([1.5, 2.0, 2.5, 4.0])
    m = regression_metrics(p, y)
    assert m["mse"] == pytest.approx((0.25 + 0 + 0.25 + 1) / 4)
    assert m["rmse"] == pytest.approx(math.sqrt(1.5 / 4))
    dp, dy = p - p.mean(), y - y.mean()
    assert m["pearson"] == pytest.approx((dp * dy).sum() / math.sqrt((dp ** 2).sum() * (dy ** 2).sum()))
    assert m["spearmanr"] == pytest.approx(1.0)  # same order
    assert regression_metrics(np.array([1.0, 4.0, 2.0]), np.array([3.0, 2.0, 1.0]))["spearmanr"] == pytest.approx(-0.5)
    assert math.isnan(regression_metrics(np.array([2.0, 2.0]), y[:2])["pearson"])  # no correlation to report


def test_multilabel_metrics_by_hand():
    # Rows x labels. Logits > 0 <=> probability > 0.5.
    logits = np.array([[3.0, -2.0, 1.0], [-1.0, -1.0, -1.0], [2.0, 2.0, -3.0], [-2.0, 0.5, -2.0]])
    truth = np.array([[1, 0, 1], [0, 0, 0], [1, 0, 0], [0, 1, 1]], dtype=np.float32)
    m = multilabel_metrics(logits, truth)
    # Predicted sets: {0,2}, {}, {0,1}, {1}. tp=4 (r0:2, r2:1, r3:1), fp=1 (r2 label 1), fn=1 (r3 label 2).
    assert m["precision_micro"] == pytest.approx(4 / 5) and m["recall_micro"] == pytest.approx(4 / 5)
    assert m["f1_micro"] == pytest.approx(4 / 5)
    # Per label: 0: p=1 r=1 f=1; 1: tp1 fp1 fn0 -> p=.5 r=1 f=2/3; 2: tp1 fp0 fn1 -> p=1 r=.5 f=2/3.
    assert m["precision_macro"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["recall_macro"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["f1_macro"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert m["exact_match"] == pytest.approx(2 / 4)  # rows 0 and 1
    # A stricter threshold drops row 3's label 1 (p = sigmoid(0.5) = 0.62).
    assert multilabel_metrics(logits, truth, threshold=0.7)["exact_match"] == pytest.approx(2 / 4)
    assert multilabel_metrics(logits, truth, threshold=0.7)["recall_micro"] == pytest.approx(3 / 5)


def test_multilabel_baseline_is_the_majority_label_set(tokenizer, tmp_path):
    sets = [[], [], ["a"], ["a", "b"], []]
    rows = [{"text": f"t {i}", "label": s} for i, s in enumerate(sets)]
    files = {"train": write_jsonl(tmp_path / "t.jsonl", rows),
             "validation": write_jsonl(tmp_path / "v.jsonl", [{"text": "v", "label": s} for s in ([], ["a"], [])])}
    task, p, _ = prepare(tokenizer, files, task="multilabel")
    assert task.baseline(p.validation) == "majority label set {} exact_match 0.6667, f1_micro 0"


def test_losses_match_torch_reductions():
    # The seam's sum / count equals the mean reductions transformers uses for these heads.
    logits = torch.tensor([[0.3, -1.2, 2.0], [1.0, 0.0, -0.5]])
    multi_hot = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    bce = BinaryCrossEntropy()
    sums, items = bce.per_sample(logits, multi_hot)
    assert items.tolist() == [3.0, 3.0] and bce.count(multi_hot).item() == 6.0
    assert (sums.sum() / items.sum()).item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(logits, multi_hot).item(), abs=1e-6)
    mse = MeanSquaredError()
    pred, y = torch.tensor([[0.5], [1.5], [-1.0]]), torch.tensor([1.0, 1.0, 1.0])
    sums, items = mse.per_sample(pred, y)
    assert (sums.sum() / mse.count(y)).item() == pytest.approx(
        torch.nn.functional.mse_loss(pred.squeeze(-1), y).item())
    cfg = load_config({"train_file": "x.csv", "label_smoothing_factor": 0.1})
    assert get_task("classification").loss(cfg) == CrossEntropy(label_smoothing=0.1)


def test_label_smoothing_is_refused_for_regression_and_multilabel(tokenizer, tmp_path):
    rows = [{"text": f"t {i}", "label": i / 4} for i in range(4)]
    files = {"train": write_csv(tmp_path / "t.csv", rows), "validation": write_csv(tmp_path / "v.csv", rows)}
    with pytest.raises(ConfigError, match="label_smoothing_factor=0.1 applies to classification only"):
        prepare(tokenizer, files, label_smoothing_factor=0.1)  # autodetected regression


# --------------------------------------------------------------------------- prediction files


def test_prediction_files(tmp_path):
    write_regression_predictions(tmp_path / "r.csv", np.array([0.25, 1.5]), ["a", "b"])
    assert list(csv.reader(open(tmp_path / "r.csv"))) == [["id", "prediction"], ["a", "0.25"], ["b", "1.5"]]
    logits = np.array([[2.0, -2.0, 0.0], [-3.0, -3.0, -3.0]])
    write_multilabel_predictions(tmp_path / "m.csv", logits, [7, 8], {"0": "person", "1": "place", "2": "org"},
                                 threshold=0.5, delimiter="|")
    rows = list(csv.reader(open(tmp_path / "m.csv")))
    assert rows[0] == ["id", "prediction", "prob_person", "prob_place", "prob_org"]
    assert rows[1][:2] == ["7", "person|org"] and rows[2][:2] == ["8", ""]  # sigmoid(0) = 0.5 passes
    assert float(rows[1][2]) == pytest.approx(1 / (1 + math.exp(-2)), abs=1e-6)


def test_problem_type_names_the_task():
    assert [task_for_problem_type(p) for p in (None, "regression", "multi_label_classification")] == [
        "classification", "regression", "multilabel"]
    with pytest.raises(ConfigError):
        task_for_problem_type("ranking")


# --------------------------------------------------------------------------- packaged real data


def test_packaged_lee_similarity(monkeypatch, tmp_path):
    rows = assets.lee_similarity_rows()
    assert len(rows) == 50 * 49 // 2 == 1225
    labels = [r["label"] for r in rows]
    assert min(labels) == pytest.approx(0.2) and max(labels) == pytest.approx(1.0)
    assert np.mean(labels) == pytest.approx(0.3265, abs=1e-4)
    assert all(r["sentence1"] and r["sentence2"] and r["sentence1"] != r["sentence2"] for r in rows)
    assert any("£3,000" in r["sentence1"] + r["sentence2"] for r in rows)  # the corpus is Latin-1
    monkeypatch.setenv("SCALETUNE_CACHE", str(tmp_path))
    files = assets.dataset_files("packaged:lee_similarity")
    counts = {s: sum(1 for _ in csv.DictReader(open(p))) for s, p in files.items()}
    assert counts == {"train": 980, "validation": 122, "test": 123}


def test_packaged_tweet_entity_types(monkeypatch, tmp_path):
    rows = assets.tweet_entity_type_rows()
    assert len(rows) == 2394
    types = sorted({t for r in rows for t in r["label"]})
    assert types == ["company", "facility", "geo-loc", "movie", "musicartist", "other", "person", "product",
                     "sportsteam", "tvshow"]
    assert sum(1 for r in rows if r["label"] == []) == 1476  # tweets naming no entity stay, with no label
    assert all(r["label"] == sorted(set(r["label"])) for r in rows)
    assert rows[0]["text"].startswith("@paulwalk It 's the view from where I 'm living")
    assert rows[0]["label"] == ["facility"]  # "Empire State Building", "ESB"
    monkeypatch.setenv("SCALETUNE_CACHE", str(tmp_path))
    files = assets.dataset_files("packaged:tweet_entity_types")
    loaded = {s: [json.loads(line) for line in open(p)] for s, p in files.items()}
    assert {s: len(v) for s, v in loaded.items()} == {"train": 1915, "validation": 239, "test": 240}
    assert all(isinstance(r["label"], list) for v in loaded.values() for r in v)
