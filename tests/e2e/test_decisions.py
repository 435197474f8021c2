"""Decisions on a real (tiny) model, driven by a scripted metric sequence via compute_metrics: what the fakes of
tests/unit/test_fit_decisions.py cannot show. One real run whose checkpoints are rotated on disk during training
and at the end (limit 1), whose compute_metrics reaches the loop through run(), and whose exported model is the
best checkpoint's weights, bit for bit. Every other cadence and decision case runs against the real `fit` there.
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


pytestmark = pytest.mark.slow

CASES = {
    # limit 1: best (2) and latest kept during training, only the best at the end.
    "limit1": dict(
        cfg=dict(max_steps=6, eval_steps=2, save_steps=2, save_total_limit=1, metric_for_best_model="score",
                 load_best_model_at_end=True),
        seq=[0.5, 0.3, 0.4], evals=[2, 4, 6], left=[2], best=2, stop=6),
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
