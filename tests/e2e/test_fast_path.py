"""The fast path (GPU issue, item 5): `torch_compile` compiles the training step's forward and loss, and its
per-step losses are the eager path's (CPU, bf16 autocast; inductor runs on the CPU too)."""

from __future__ import annotations

import pytest

from scaletune.train import run

pytestmark = pytest.mark.slow  # every test here launches a training run or a process

LINE = "scaletune: torch_compile:"


def step_losses(result) -> dict:
    return {e["step"]: e["loss"] for e in result.log_history
            if "loss" in e and "eval_loss" not in e and "train_loss" not in e}


def test_compiled_step_has_the_eager_losses_and_reports_graph_breaks_once(tiny_bert_no_dropout, sentiment_files,
                                                                          tmp_path, capsys, fresh_accelerate_state):
    # No dropout: inductor draws its own random masks, so dropout would differ by construction.
    from torch._dynamo.utils import counters

    base = {"model_name_or_path": tiny_bert_no_dropout, "train_file": sentiment_files["train_file"],
            "max_steps": 26, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1,
            "bf16": True, "eval_strategy": "no", "save_strategy": "no", "do_predict": False,
            "disable_tqdm": True, "report_to": "none"}
    eager = step_losses(run({**base, "output_dir": str(tmp_path / "eager")}))
    capsys.readouterr()
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = step_losses(run({**base, "output_dir": str(tmp_path / "compiled"), "torch_compile": True}))
    out = capsys.readouterr().out

    assert sorted(eager) == sorted(compiled) == list(range(1, 27))
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-3), step
    # The step compiled, reported once -- not per step -- and not recompiled for each batch length: one graph
    # with a symbolic sequence length, one more for the epoch's last, shorter batch.
    assert out.count(LINE) == 1, out
    graphs = counters["stats"]["unique_graphs"] - graphs_before
    assert 1 <= graphs <= 2, graphs
