"""What a run tells the user is what ran (issue #26), with real tiny runs: the output dir's config.yaml records
the columns, task and precision the run resolved, `scaletune.predict` holds a new file to those columns, and
--fp16 where there is no fp16 autocast (CPU) is refused instead of training in fp32 under an fp16 label."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from scaletune.config import ConfigError
from scaletune.errors import DataError
from scaletune.predict import run_prediction
from scaletune.train import run
from support.inprocess import main_in_process

pytestmark = pytest.mark.slow  # every test here launches a training run or a process

QUICK = {"max_steps": 1, "per_device_train_batch_size": 8, "save_strategy": "no", "do_predict": False,
         "disable_tqdm": True, "report_to": "none"}
QUIET_ENV = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture
def fresh_precision():
    """accelerate keeps one mixed precision per process: an earlier in-process run's must not answer."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def resolved(out: Path) -> dict:
    return yaml.safe_load((out / "config.yaml").read_text())["resolved"]


def test_predict_refuses_a_file_without_the_text_columns_the_run_trained_on(tiny_bert, tmp_path, capsys):
    # Item 1: a sentence-pair regression model given a file whose columns would be auto-detected as one `text`
    # column used to predict from that column, exit 0, no warning.
    out = tmp_path / "pair"
    run({"model_name_or_path": tiny_bert, "dataset_name": "packaged:lee_similarity", "task": "regression",
         "max_train_samples": 8, "max_eval_samples": 4, "max_seq_length": 32, "ignore_mismatched_sizes": True,
         "output_dir": str(out), **QUICK})
    assert "text columns sentence1, sentence2" in capsys.readouterr().out  # said once, at the start
    record = resolved(out)
    assert (record["task"], record["text_columns"], record["label_column"]) == (
        "regression", ["sentence1", "sentence2"], "label")
    lacking = tmp_path / "lacking.csv"
    lacking.write_text("id,text,sentence1\n1,a short text,a sentence\n")
    target = tmp_path / "preds.csv"
    proc = main_in_process([str(out), "--test_file", str(lacking), "--output_file", str(target)],
                           env={**os.environ, **QUIET_ENV}, module="scaletune.predict")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("scaletune.predict: error: ") and "sentence2" in lines[0], lines
    assert not target.exists()


def test_predict_refuses_another_text_column_than_a_classifier_trained_on(finished_run, tmp_path):
    # Item 1, one column: a classifier trained on `text` used a file's `review` column the same way.
    review = tmp_path / "review.csv"
    review.write_text("id,review,label\n1,good good film,pos\n")
    with pytest.raises(DataError, match="'text'"):
        run_prediction(str(finished_run), str(review), str(tmp_path / "p.csv"))
    assert resolved(finished_run)["text_columns"] == ["text"]
    # The record is not part of the config: the run's config.yaml still loads as a config.
    from scaletune.config import load_config

    assert load_config(str(finished_run / "config.yaml")).data.text_column_names is None


def test_a_resume_from_the_runs_own_config_yaml_is_accepted_unchanged(tiny_bert, sentiment_files, tmp_path,
                                                                       capsys):
    # Item 1: the record must not make a resume differ: the config above it (text_column_names: null) is what
    # checkpoints hold and what a resume compares, and the file loads as a config with the record skipped.
    out = tmp_path / "resumed"
    run({"model_name_or_path": tiny_bert, **sentiment_files, "output_dir": str(out), **QUICK, "save_strategy": "steps",
         "save_steps": 1})
    assert resolved(out)["text_columns"] == ["text"]
    capsys.readouterr()
    r = run(str(out / "config.yaml"), overrides={"max_steps": 2, "resume_from_checkpoint": "latest"})
    assert r.global_step == 2
    said = capsys.readouterr().err
    assert "resuming checkpoint-1 with changed settings: max_steps: 1 -> 2." in said  # that, and nothing else
    assert "text_column" not in said and "resolved" not in said


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast exists on this machine's GPU")
def test_fp16_without_fp16_autocast_is_refused_before_the_model_loads(tiny_bert, sentiment_files, tmp_path,
                                                                      fresh_precision):
    # Item 2: --fp16 on CPU trained in fp32 while config.yaml and the model card said fp16.
    out = tmp_path / "fp16"
    with pytest.raises(ConfigError, match="fp16.*bf16"):
        run({"model_name_or_path": tiny_bert, **sentiment_files, "output_dir": str(out), "fp16": True, **QUICK})
    assert not (out / "config.yaml").exists() and not (out / "model.safetensors").exists()


def test_the_card_and_the_record_state_the_precision_that_ran(tiny_bert, sentiment_files, tmp_path, monkeypatch,
                                                              fresh_precision):
    # Item 2: bf16 from the Accelerate config (the launcher's ACCELERATE_MIXED_PRECISION), not from --bf16, runs
    # bf16 autocast (also on CPU); the card said nothing about it.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    out = tmp_path / "bf16"
    run({"model_name_or_path": tiny_bert, **sentiment_files, "output_dir": str(out), **QUICK})
    assert "mixed_precision_training: bf16" in (out / "README.md").read_text()
    assert resolved(out)["mixed_precision"] == "bf16"
