"""Cadence and decisions on a real (tiny) model, driven by a scripted metric sequence via compute_metrics.

Each case states by hand what must happen: which steps evaluate, which checkpoints stay on disk, which
checkpoint is best and reloaded, and when training stops.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from scaletune.train import run


def scripted(values, name="score"):
    """compute_metrics returning the next scripted value at each evaluation (the last one repeats)."""
    calls = []

    def compute_metrics(predictions, label_ids):
        v = values[min(len(calls), len(values) - 1)]
        calls.append(v)
        return {name: v}

    return compute_metrics


CASES = {
    # save_steps = 2 x eval_steps, limit 2: best at 4 protected; every new best is saved (ours, §10).
    "save_twice_eval_limit2": dict(
        cfg=dict(max_steps=10, eval_steps=2, save_steps=4, save_total_limit=2, metric_for_best_model="score",
                 load_best_model_at_end=True),
        seq=[0.1, 0.5, 0.3, 0.2, 0.4], evals=[2, 4, 6, 8, 10], left=[4, 10], best=4, stop=10),
    # Trainer's bug case: best at step 6 falls between saves. Trainer reloads checkpoint-4; we saved 6.
    "best_between_saves": dict(
        cfg=dict(max_steps=10, eval_steps=2, save_steps=4, metric_for_best_model="score",
                 load_best_model_at_end=True),
        seq=[0.1, 0.2, 0.9, 0.3, 0.3], evals=[2, 4, 6, 8, 10], left=[2, 4, 6, 8, 10], best=6, stop=10),
    # limit 1: best (2) and latest kept during training, only the best at the end.
    "limit1": dict(
        cfg=dict(max_steps=6, eval_steps=2, save_steps=2, save_total_limit=1, metric_for_best_model="score",
                 load_best_model_at_end=True),
        seq=[0.5, 0.3, 0.4], evals=[2, 4, 6], left=[2], best=2, stop=6),
    # ties keep the earlier best; patience 2 stops after two non-improving evaluations.
    "ties_patience": dict(
        cfg=dict(max_steps=12, eval_steps=2, save_steps=2, metric_for_best_model="score",
                 early_stopping_patience=2),
        seq=[0.5, 0.5, 0.5, 0.9], evals=[2, 4, 6], left=[2, 4, 6], best=2, stop=6),
    # threshold: improvements of <= 0.1 count as no improvement; lower is better for a *loss name.
    "threshold_loss_metric": dict(
        cfg=dict(max_steps=14, eval_steps=2, save_steps=2, metric_for_best_model="myloss",
                 early_stopping_patience=2, early_stopping_threshold=0.1),
        seq=[1.0, 0.95, 0.5, 0.45, 0.44, 0.1], name="myloss", evals=[2, 4, 6, 8, 10], left=[2, 4, 6, 8, 10],
        best=10, stop=10),
    # max_steps off the interval: one more evaluation and save at the last step.
    "max_steps_off_interval": dict(
        cfg=dict(max_steps=7, eval_steps=3, save_steps=3), seq=[0.1], evals=[3, 6, 7], left=[3, 6, 7],
        best=None, stop=7),
    # epoch strategy: 96 rows / batch 16 = 6 updates per epoch.
    "epoch_strategy": dict(
        cfg=dict(num_train_epochs=2, eval_strategy="epoch", save_strategy="epoch", metric_for_best_model="score",
                 greater_is_better=False, load_best_model_at_end=True, save_total_limit=1),
        seq=[0.2, 0.3], evals=[6, 12], left=[6], best=6, stop=12),
}


@pytest.mark.parametrize("name", list(CASES))
def test_decisions(name, tiny_bert, sentiment_files, tmp_path):
    case = CASES[name]
    out = tmp_path / "out"
    cfg = {"model_name_or_path": tiny_bert, **sentiment_files, "output_dir": str(out),
           "per_device_train_batch_size": 16, "per_device_eval_batch_size": 64, "logging_steps": 1,
           "eval_strategy": "steps", "do_predict": False, "disable_tqdm": True, **case["cfg"]}
    result = run(cfg, compute_metrics=scripted(case["seq"], case.get("name", "score")))

    eval_steps = [e["step"] for e in result.log_history if any(k.startswith("eval_") for k in e)]
    assert eval_steps == case["evals"]
    assert result.global_step == case["stop"]
    left = sorted(int(Path(p).name.split("-")[1]) for p in result.checkpoints)
    assert left == case["left"]
    if case["best"] is None:
        assert result.best_model_checkpoint is None
        return
    assert result.best_global_step == case["best"]
    assert result.best_model_checkpoint == str(out / f"checkpoint-{case['best']}")
    if case["cfg"].get("load_best_model_at_end"):
        # The exported model is the best checkpoint's weights, bit for bit.
        final = load_file(out / "model.safetensors")
        best = load_file(out / f"checkpoint-{case['best']}" / "model.safetensors")
        assert final.keys() == best.keys()
        assert all((final[k] == best[k]).all() for k in final)
