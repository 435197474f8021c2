"""Bad input fails before training starts, with a message naming the problem and the fix, and nothing
already written is touched."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from scaletune.config import ConfigError, load_config
from scaletune.train import run
from support.faults import tree_digest


def write_csv(path: Path, rows: list[dict]) -> str:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return str(path)


def bad_cases(tmp: Path, files: dict) -> dict:
    val_out_of_range = write_csv(tmp / "val_bad.csv", [{"text": "good film", "label": "pos"},
                                                       {"text": "meh", "label": "neutral"}])
    empty = write_csv(tmp / "empty.csv", [])
    a_file = tmp / "a_file"
    a_file.write_text("x")
    return {
        "unknown key": ({"learnig_rate": 1e-4}, "Unknown config key 'learnig_rate'. Did you mean 'learning_rate'?"),
        "wrong text column": ({"text_column_names": "review_body"}, "text column 'review_body'"),
        "wrong label column": ({"label_column_name": "sentiment"}, "label column 'sentiment'"),
        "label out of range": ({"validation_file": val_out_of_range}, "labels ['neutral']"),
        "empty split": ({"validation_file": empty}, "validation split is empty"),
        "mismatched intervals": ({"eval_strategy": "steps", "eval_steps": 3, "save_steps": 4,
                                  "load_best_model_at_end": True}, "save_steps to be a multiple of eval_steps"),
        "unwritable output dir": ({"output_dir": str(a_file / "out")}, "is not writable"),
        "missing file": ({"train_file": str(tmp / "nope.csv")}, "does not exist"),
        "metric typo": ({"eval_strategy": "steps", "eval_steps": 1, "metric_for_best_model": "acuracy",
                         "load_best_model_at_end": True, "save_steps": 1}, "eval_accuracy"),
        "bad value": ({"per_device_train_batch_size": "eight"}, "not a valid int"),
    }


@pytest.mark.slow
def test_bad_inputs_fail_early_and_touch_nothing(finished_run, tiny_bert, sentiment_files, tmp_path):
    before = tree_digest(finished_run, ignore=())
    for name, (override, message) in bad_cases(tmp_path, sentiment_files).items():
        cfg = {"model_name_or_path": tiny_bert, **sentiment_files, "output_dir": str(finished_run),
               "resume_from_checkpoint": "latest", "max_steps": 4, "save_steps": 1, "disable_tqdm": True,
               **override}
        with pytest.raises(Exception) as err:
            run(cfg)
        assert message in str(err.value), f"{name}: {err.value}"
        # nothing trained, nothing written, nothing deleted
        assert tree_digest(finished_run, ignore=()) == before, name


@pytest.mark.slow
def test_fresh_run_into_existing_checkpoints_is_refused(finished_run, tiny_bert, sentiment_files):
    before = tree_digest(finished_run, ignore=())
    with pytest.raises(Exception, match="already holds checkpoints.*--resume_from_checkpoint latest"):
        run({"model_name_or_path": tiny_bert, **sentiment_files, "output_dir": str(finished_run)})
    assert tree_digest(finished_run, ignore=()) == before


@pytest.mark.slow
def test_incomplete_checkpoint_path_is_refused(tiny_bert, sentiment_files, tmp_path):
    torn = tmp_path / "checkpoint-9"
    torn.mkdir()
    with pytest.raises(Exception, match="not a complete checkpoint"):
        run({"model_name_or_path": tiny_bert, **sentiment_files, "output_dir": str(tmp_path / "o"),
             "resume_from_checkpoint": str(torn)})


@pytest.mark.slow
def test_cli_error_is_one_line_and_fast(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scaletune.train", "--train_file", "x.csv", "--lerning_rate", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("scaletune: error: Unknown config key 'lerning_rate'. "
                                   "Did you mean 'learning_rate'?")


def test_config_sources_agree(tmp_path):
    """CLI flags, a YAML file, a JSON file, a dict, and a file plus CLI overrides give the same config."""
    (tmp_path / "c.yaml").write_text("train_file: t.csv\nlearning_rate: 3.0e-5\nfp16: true\neval_steps: 0.5\n")
    (tmp_path / "c.json").write_text('{"train_file": "t.csv", "learning_rate": 3e-5, "fp16": true, "eval_steps": 0.5}')
    grouped = tmp_path / "g.yaml"
    grouped.write_text("data:\n  train_file: t.csv\ntraining:\n  learning_rate: 3.0e-5\n  fp16: true\n  eval_steps: 0.5\n")
    configs = [
        load_config(["--train_file", "t.csv", "--learning_rate", "3e-5", "--fp16", "--eval_steps", "0.5"]),
        load_config(["--train_file=t.csv", "--learning_rate=3e-5", "--fp16=true", "--eval_steps=0.5"]),
        load_config(str(tmp_path / "c.yaml")),
        load_config(str(tmp_path / "c.json")),
        load_config(str(grouped)),
        load_config({"train_file": "t.csv", "learning_rate": 3e-5, "fp16": True, "eval_steps": 0.5}),
        load_config([str(tmp_path / "c.yaml"), "--learning_rate", "3e-5"]),
    ]
    assert all(c.to_dict() == configs[0].to_dict() for c in configs)
    override = load_config([str(tmp_path / "c.yaml"), "--learning_rate", "1e-3", "--fp16", "false"])
    assert override.training.learning_rate == 1e-3 and override.training.fp16 is False
    assert override.data.train_file == "t.csv"
    # Old TrainingArguments names people still type
    assert load_config({"train_file": "t", "evaluation_strategy": "epoch"}).training.eval_strategy == "epoch"
    # greater_is_better follows the metric's name, as Trainer
    assert load_config({"train_file": "t", "metric_for_best_model": "f1"}).training.greater_is_better is True
    assert load_config({"train_file": "t", "metric_for_best_model": "eval_loss"}).training.greater_is_better is False
    with pytest.raises(ConfigError, match="eval_strategy='sometimes' is not one of no, steps, epoch"):
        load_config({"train_file": "t", "eval_strategy": "sometimes"})
    with pytest.raises(ConfigError, match="Did you mean 'per_device_train_batch_size'"):
        load_config({"train_file": "t", "per_device_train_batchsize": 4})


@pytest.mark.slow
def test_effective_config_is_written(tiny_bert, sentiment_files, tmp_path):
    out = tmp_path / "o"
    run({"model_name_or_path": tiny_bert, **sentiment_files, "output_dir": str(out), "max_steps": 1,
         "do_predict": False, "learning_rate": 7e-4, "disable_tqdm": True})
    written = load_config(str(out / "config.yaml"))
    assert written.training.learning_rate == 7e-4 and written.model.model_name_or_path == tiny_bert
    assert written.training.per_device_train_batch_size == 8  # defaults spelled out
