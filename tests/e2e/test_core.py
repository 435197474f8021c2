"""The core loop end to end: accumulation, exact resume, export, fine-tuning a real model."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scaletune.train import run
from support.inprocess import main_in_process

pytestmark = pytest.mark.slow  # every test here launches a training run or a process

BASE = {"per_device_eval_batch_size": 16, "do_predict": False, "disable_tqdm": True, "logging_steps": 1}


def weights(path) -> dict:
    return load_file(Path(path) / "model.safetensors")


def max_weight_diff(a, b) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def train_logs(result):
    return [e for e in result.log_history if "loss" in e]


def test_accumulation_matches_large_batch(tiny_bert_no_dropout, sentiment_files, tmp_path):
    """4 micro-batches of 2 = 1 batch of 8: same loss, grad norm and weights (sequence lengths differ per
    micro-batch, so this also checks that padding does not leak into the loss)."""
    common = {"model_name_or_path": tiny_bert_no_dropout, **sentiment_files, **BASE, "max_steps": 5,
              "save_strategy": "no", "eval_strategy": "no", "learning_rate": 1e-3, "max_grad_norm": 1.0}
    big = run({**common, "output_dir": str(tmp_path / "big"), "per_device_train_batch_size": 8})
    acc = run({**common, "output_dir": str(tmp_path / "acc"), "per_device_train_batch_size": 2,
               "gradient_accumulation_steps": 4})
    for a, b in zip(train_logs(big), train_logs(acc), strict=True):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["learning_rate"] == b["learning_rate"]
    assert max_weight_diff(tmp_path / "big", tmp_path / "acc") < 1e-5


def test_resume_mid_epoch_matches_uninterrupted(tiny_bert, sentiment_files, tmp_path):
    """A run killed mid-epoch and resumed from its latest checkpoint matches the uninterrupted run step for
    step -- with dropout on, so the RNG state must be restored too, and across an epoch boundary."""
    args = ["--model_name_or_path", tiny_bert, "--train_file", sentiment_files["train_file"],
            "--validation_file", sentiment_files["validation_file"], "--do_predict", "false",
            "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2", "--max_steps", "9",
            "--save_steps", "3", "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "3",
            "--learning_rate", "1e-3", "--disable_tqdm", "true"]
    full = run([*args, "--output_dir", str(tmp_path / "full")])
    assert full.global_step == 9

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "scaletune.train", *args, "--output_dir", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoint-3" / "trainer_state.json").exists():  # first checkpoint: mid-epoch
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # a crash, not a graceful stop
    proc.wait()
    resumed_from = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert resumed_from < 9

    resumed = run([*args, "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert resumed.global_step == 9
    full_logs = {e["step"]: e for e in train_logs(full)}
    for e in train_logs(resumed):
        if e["step"] > resumed_from:
            assert e["loss"] == pytest.approx(full_logs[e["step"]]["loss"], rel=1e-6)
            assert e["learning_rate"] == pytest.approx(full_logs[e["step"]]["learning_rate"], rel=1e-9)
    assert [e["step"] for e in train_logs(resumed)] == list(range(1, 10))  # history carried over
    assert max_weight_diff(tmp_path / "full", out) < 1e-6
    assert resumed.metrics["eval_loss"] == pytest.approx(full.metrics["eval_loss"], rel=1e-6)


# resume_from_checkpoint=latest without a checkpoint starts fresh: tests/parity/test_parity_decisions.py::
# test_resume_latest_without_checkpoint_starts_fresh_unlike_trainer (the same run, and Trainer's refusal).


def test_interrupted_save_is_never_resumed(tiny_bert, sentiment_files, tmp_path):
    out = tmp_path / "o"
    cfg = {"model_name_or_path": tiny_bert, **sentiment_files, **BASE, "output_dir": str(out), "max_steps": 4,
           "save_steps": 2}
    run(cfg)
    # Simulate a crash during the save of step 6: a partial folder, and a checkpoint folder without state.
    (out / ".checkpoint-6.partial").mkdir()
    torn = out / "checkpoint-8"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"torn")
    r = run({**cfg, "max_steps": 6, "resume_from_checkpoint": "latest"})
    first_new = [e for e in r.log_history if "loss" in e and e["step"] > 4]
    assert first_new[0]["step"] == 5  # resumed from checkpoint-4, not from the torn checkpoint-8
    assert "checkpoint-6" in [Path(p).name for p in r.checkpoints]


# Two processes: tests/parity/test_parity_eval.py (evaluation with an uneven last round equals Trainer's, and
# the test pass writes each row once) and tests/e2e/test_scale_out.py (DDP training, best reload and resume equal
# one process).


def test_exported_model_reloads_and_reproduces_eval(tiny_bert, sentiment_files, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "o"
    r = run({"model_name_or_path": tiny_bert, **sentiment_files, **BASE, "output_dir": str(out), "max_steps": 6,
             "eval_strategy": "steps", "eval_steps": 3, "save_steps": 3, "learning_rate": 1e-3,
             "do_predict": True})
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "neg", 1: "pos"}  # string labels: the label map travels with the model
    import csv

    rows = list(csv.DictReader(open(sentiment_files["validation_file"])))
    with torch.no_grad():
        enc = tok([row["text"] for row in rows], padding=True, truncation=True, max_length=128, return_tensors="pt")
        logits = model(**enc).logits
    labels = torch.tensor([model.config.label2id[row["label"]] for row in rows])
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    acc = (logits.argmax(-1) == labels).float().mean().item()
    assert loss == pytest.approx(r.metrics["eval_loss"], rel=1e-5)
    assert acc == pytest.approx(r.metrics["eval_accuracy"])
    # predictions.csv: id, label name, probabilities that sum to one
    preds = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(preds) == 21 and {p["prediction"] for p in preds} <= {"neg", "pos"}
    assert all(abs(float(p["prob_neg"]) + float(p["prob_pos"]) - 1) < 1e-4 for p in preds)
    # and the predict command writes the same predictions for new data
    new_out = tmp_path / "new.csv"
    predicted = main_in_process([str(out), "--test_file", sentiment_files["test_file"], "--output_file",
                                 str(new_out)], module="scaletune.predict")  # the CLI, without a process's imports
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    again = list(csv.DictReader(open(new_out)))
    assert [p["prediction"] for p in again] == [p["prediction"] for p in preds]
    assert np.allclose([float(p["prob_pos"]) for p in again], [float(p["prob_pos"]) for p in preds], atol=1e-4)


def test_finetunes_real_minilm_above_majority(tmp_path):
    """The packaged pretrained MiniLM on real Rotten Tomatoes reviews beats the majority class clearly: after 30
    updates of 16 it scores 0.70 on the first 200 validation reviews, where the majority class scores 0.52."""
    r = run({"model_name_or_path": "packaged:minilm", "dataset_name": "packaged:rotten_tomatoes",
             "max_train_samples": 480, "max_eval_samples": 200, "max_seq_length": 48,
             "output_dir": str(tmp_path / "o"), "num_train_epochs": 1, "per_device_train_batch_size": 16,
             "per_device_eval_batch_size": 100, "learning_rate": 2e-4, "warmup_steps": 0.1, "logging_steps": 10,
             "save_strategy": "no", "do_predict": False, "disable_tqdm": True})
    import csv
    from collections import Counter

    from scaletune.assets import dataset_files

    val = [row["label"] for row in csv.DictReader(open(dataset_files("packaged:rotten_tomatoes")["validation"]))][:200]
    majority = Counter(val).most_common(1)[0][1] / len(val)
    assert r.metrics["eval_accuracy"] > majority + 0.1, (r.metrics, majority)
    losses = [e["loss"] for e in train_logs(r)]
    assert losses[-1] < losses[0]
