"""scaletune on a CUDA device, end to end (issue 21, item 7): fp16 and bf16 runs with evaluations, best reload,
export and predict while transformers' `kernelize` raises and the network is refused; the compiled path's
losses against eager; exact resume. tests/gpu/conftest.py skips all of it without CUDA."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from e2e import test_core as core  # its exact-resume test, run here on the GPU
from e2e.test_model_sources import make_hub_kernels_raise
from scaletune.train import run
from support.parity import rel


def train_losses(result) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in result.log_history if "loss" in h and "eval_loss" not in h
            and "train_loss" not in h}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_end_to_end_on_cuda_runs_no_hub_code(precision, tiny_bert, sentiment_files, tmp_path, monkeypatch,
                                             no_network):
    """On CUDA, kernelize would fetch kernels-community/... at the first evaluation (offline: a traceback)."""
    lookups = make_hub_kernels_raise(monkeypatch)
    out = tmp_path / precision
    result = run({"model_name_or_path": tiny_bert, **sentiment_files, "output_dir": str(out), precision: True,
                  "max_steps": 12, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1,
                  "eval_strategy": "steps", "eval_steps": 4, "save_steps": 4, "load_best_model_at_end": True,
                  "metric_for_best_model": "eval_loss", "disable_tqdm": True, "report_to": "none"})
    assert [h["step"] for h in result.log_history if "eval_loss" in h] == [4, 8, 12]
    assert result.global_step == 12 and all(math.isfinite(v) for v in train_losses(result).values())
    # The best checkpoint was reloaded: the final evaluation is the best one's.
    best = min(h["eval_loss"] for h in result.log_history if "eval_loss" in h)
    assert result.best_metric == pytest.approx(best) and result.best_model_checkpoint
    assert result.metrics["eval_loss"] == pytest.approx(best, rel=1e-3)
    # Export, and the predictions of the run and of the predict command on the exported model agree.
    assert (out / "model.safetensors").exists() and result.predictions_file
    again = tmp_path / "again.csv"
    subprocess.run([sys.executable, "-m", "scaletune.predict", str(out), "--test_file",
                    sentiment_files["test_file"], "--output_file", str(again)], check=True, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    first = [r["prediction"] for r in csv.DictReader(open(result.predictions_file))]
    assert [r["prediction"] for r in csv.DictReader(open(again))] == first and len(first) == 21
    assert "lookup" not in lookups and not no_network


def test_compiled_losses_match_eager_over_50_bf16_steps(tiny_bert_no_dropout, sentiment_files, tmp_path):
    """torch_compile runs the same training step: per-step loss within 1e-3 relative of eager (no dropout, so
    the two paths' random streams cannot differ)."""
    job = {"model_name_or_path": tiny_bert_no_dropout, "train_file": sentiment_files["train_file"], "bf16": True,
           "max_steps": 50, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1,
           "eval_strategy": "no", "save_strategy": "no", "do_eval": False, "do_predict": False,
           "disable_tqdm": True, "report_to": "none"}
    eager = train_losses(run({**job, "output_dir": str(tmp_path / "eager")}))
    compiled = train_losses(run({**job, "output_dir": str(tmp_path / "compiled"), "torch_compile": True}))
    assert sorted(eager) == sorted(compiled) == list(range(1, 51))
    worst = max(rel(compiled[s], eager[s]) for s in eager)
    assert worst <= 1e-3, {s: (eager[s], compiled[s]) for s in eager if rel(compiled[s], eager[s]) > 1e-3}


def test_exact_resume_on_cuda(tiny_bert, sentiment_files, tmp_path):
    """A run killed mid-epoch and resumed matches the uninterrupted one step for step (dropout on: the CUDA
    RNG state is restored too) -- tests/e2e/test_core.py's test, which runs on the GPU when there is one."""
    assert torch.cuda.is_available()
    core.test_resume_mid_epoch_matches_uninterrupted(tiny_bert, sentiment_files, tmp_path)


def test_runs_here_train_on_the_gpu(tiny_bert, sentiment_files, tmp_path):
    """The tier means something only if scaletune picks the GPU by itself: its meter logs GPU memory."""
    result = run({"model_name_or_path": tiny_bert, "train_file": sentiment_files["train_file"], "max_steps": 2,
                  "logging_steps": 1, "output_dir": str(tmp_path / "o"), "eval_strategy": "no",
                  "save_strategy": "no", "do_eval": False, "do_predict": False, "disable_tqdm": True,
                  "report_to": "none"})
    assert any("peak_memory_gib" in h for h in result.log_history), result.log_history
