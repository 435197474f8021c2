"""`scaletune.predict` on a model trained by `scaletune.train`, for every task with a prediction file: the same
predictions and the same test metrics as the run's own test pass, with nothing repeated on the command line (the
run's config.yaml in the model folder supplies task, columns, length and label settings).

Tiny models and a few updates: the point is that predict reproduces the run, not that the model is good.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from scaletune import assets
from scaletune.conll_format import read_conll
from scaletune.predict import run_prediction
from scaletune.train import run
from support.inprocess import main_in_process
from support.ner_clm import make_tiny_token_bert, ner_files

pytestmark = pytest.mark.slow  # every test here launches a training run or a process

QUICK = {"max_steps": 2, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 7, "save_strategy": "no",
         "disable_tqdm": True, "report_to": "none", "learning_rate": 1e-3}
METRIC_TOL = dict(rel=1e-5, abs=1e-6)


def rows(path) -> list[dict]:
    return list(csv.DictReader(open(path)))


def same_metrics(predicted: dict, in_run: dict, loose: tuple = ()):
    """`loose`: correlations of a 2-step regression model, whose outputs spread over ~1e-4 only, so float32
    rounding (~1e-8) moves them by ~1e-4 while every prediction agrees to 6 digits."""
    test = {k: v for k, v in in_run.items() if k.startswith("test_")}
    assert set(predicted) == set(test)
    for k, v in test.items():
        assert predicted[k] == pytest.approx(v, **({"abs": 1e-3} if k in loose else METRIC_TOL)), k


def test_classification(tiny_bert, sentiment_files, tmp_path):
    out = tmp_path / "run"
    r = run({"model_name_or_path": tiny_bert, **sentiment_files, "output_dir": str(out), **QUICK})
    # The CLI: only the model folder and the file; the output folder does not exist yet.
    target = tmp_path / "new" / "deeper" / "preds.csv"
    proc = main_in_process([str(out), "--test_file", sentiment_files["test_file"], "--output_file", str(target)],
                           module="scaletune.predict")  # the CLI in this process (its own process: below)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test_accuracy=" in proc.stdout and f"Predictions written to {target}" in proc.stdout
    ours, theirs = rows(target), rows(r.predictions_file)
    assert [p["id"] for p in ours] == [p["id"] for p in theirs] and len(ours) == 21
    assert [p["prediction"] for p in ours] == [p["prediction"] for p in theirs]
    for a, b in zip(ours, theirs):
        assert float(a["prob_pos"]) == pytest.approx(float(b["prob_pos"]), abs=1e-5)
    same_metrics(run_prediction(str(out), sentiment_files["test_file"], str(tmp_path / "p.csv")).metrics, r.metrics)


def test_regression(tiny_bert, tmp_path):
    out = tmp_path / "run"
    r = run({"model_name_or_path": tiny_bert, "dataset_name": "packaged:lee_similarity", "task": "regression",
             "max_train_samples": 32, "max_eval_samples": 8, "max_predict_samples": 12, "max_seq_length": 48,
             "ignore_mismatched_sizes": True, "output_dir": str(out), **QUICK})
    test_file = tmp_path / "test.csv"  # the run's test rows (max_predict_samples = the first 12)
    with open(assets.dataset_files("packaged:lee_similarity")["test"], newline="") as f:
        reader = csv.DictReader(f)
        kept = [row for _, row in zip(range(12), reader)]
    with open(test_file, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(kept[0]))
        w.writeheader()
        w.writerows(kept)
    p = run_prediction(str(out), str(test_file), str(tmp_path / "preds.csv"))
    ours, theirs = rows(p.output_file), rows(r.predictions_file)
    assert [a["id"] for a in ours] == [b["id"] for b in theirs]
    for a, b in zip(ours, theirs):
        assert float(a["prediction"]) == pytest.approx(float(b["prediction"]), rel=1e-5)
    same_metrics(p.metrics, r.metrics, loose=("test_pearson", "test_spearmanr"))


def test_multilabel(tiny_bert, tmp_path):
    out = tmp_path / "run"
    r = run({"model_name_or_path": tiny_bert, "dataset_name": "packaged:tweet_entity_types", "task": "multilabel",
             "label_delimiter": ";", "max_eval_samples": 8, "max_seq_length": 48, "ignore_mismatched_sizes": True,
             "output_dir": str(out), **QUICK})
    test_file = assets.dataset_files("packaged:tweet_entity_types")["test"]
    p = run_prediction(str(out), test_file, str(tmp_path / "preds.csv"))
    ours, theirs = rows(p.output_file), rows(r.predictions_file)
    assert len(ours) == len(theirs) == 240
    assert [a["prediction"] for a in ours] == [b["prediction"] for b in theirs]  # ";"-joined, from config.yaml
    same_metrics(p.metrics, r.metrics)


def test_token_classification_conll_in_conll_out(tmp_path):
    model = make_tiny_token_bert(tmp_path / "model")
    files = ner_files(tmp_path / "data", 24, 7, 9)
    out = tmp_path / "run"
    r = run({"task": "token_classification", "model_name_or_path": model, **files, "max_seq_length": 40,
             "return_entity_level_metrics": True, "output_dir": str(out), **QUICK})
    p = run_prediction(str(out), files["test_file"])
    assert p.output_file == str(out / "predictions_new.conll")
    assert open(p.output_file).read() == open(r.predictions_file).read()  # the same tags, word for word
    assert "test_PER_f1" in p.metrics
    same_metrics(p.metrics, r.metrics)
    # A file of words without tags (what one has to tag): predicted, no metrics.
    words, _ = read_conll(files["test_file"])
    untagged = tmp_path / "words.conll"
    untagged.write_text("".join("".join(f"{w}\n" for w in s) + "\n" for s in words))
    q = run_prediction(str(out), str(untagged), str(tmp_path / "tagged.conll"))
    assert q.metrics == {} and open(q.output_file).read() == open(r.predictions_file).read()


def test_language_models_say_they_have_no_prediction_file(tmp_path):
    folder = tmp_path / "lm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    proc = subprocess.run([sys.executable, "-m", "scaletune.predict", str(folder), "--test_file", "x.txt"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "causal-LM model has no prediction file" in lines[0] and "text-generation" in lines[0]
