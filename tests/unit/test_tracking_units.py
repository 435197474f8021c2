"""Tracking and throughput: FLOPs and peak tables, the meter, JSONL/W&B/TensorBoard read-back, curves PNG.

The W&B runs are real offline runs (WANDB_MODE=offline), read back with wandb's own protobuf definitions
(tests/support/wandb_reader.py); TensorBoard files are read with tensorboard's EventAccumulator. The training
runs that log through all of it are in tests/e2e/test_tracking_runs.py.
"""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from scaletune import throughput as tp
from scaletune import tracking as tr
from support.trackers import assert_trackers_match_jsonl, jsonl_series, read_tensorboard
from support.wandb_reader import find_runs, read_run

# --------------------------------------------------------------------------- helpers


def make_cfg(tmp_path, **overrides):
    from scaletune.config import load_config

    values = {"train_file": str(tmp_path / "unused.csv"), "output_dir": str(tmp_path / "out"),
              "run_name": "unit-run", "report_to": "none"}
    values.update(overrides)
    return load_config(values)


# --------------------------------------------------------------------------- FLOPs and peak table


def test_flops_per_token_matches_hand_computation_for_bert_base():
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

    with torch.device("meta"):  # shapes only: no 440 MB allocation
        clf = BertForSequenceClassification(BertConfig())
        mlm = BertForMaskedLM(BertConfig())

    d, ff, layers, vocab = 768, 3072, 12, 30522
    layer = 4 * (d * d + d) + (d * ff + ff) + (ff * d + d) + 2 * (2 * d)  # QKVO, FFN, two LayerNorms
    assert layer == 7_087_872
    body = layers * layer + 2 * d  # + embedding LayerNorm; word/position/type embeddings are lookups: 0 FLOPs
    pooler_and_head = (d * d + d) + (d * 2 + 2)
    assert tp.count_matmul_params(clf) == body + pooler_and_head == 85_648_130
    # MLM head: transform + LayerNorm + decoder; the decoder weight is the tied word embedding -> a real matmul.
    assert tp.count_matmul_params(mlm) == body + (d * d + d) + 2 * d + vocab * d + vocab == 109_119_546

    n, n_layers, d_model = tp.model_dims(clf)
    assert (n_layers, d_model) == (12, 768)
    seq = 128
    # 6N for the matmuls, 12·L·d·T for QK^T and AV (forward 4·T·d per layer, backward twice that).
    assert tp.flops_per_token(n, n_layers, d_model, seq) == 6 * 85_648_130 + 12 * 12 * 768 * 128 == 528_044_556


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", 989.5e12),
    ("NVIDIA H100 PCIe", 756.5e12),
    ("NVIDIA H100 NVL", 835.5e12),
    ("NVIDIA H200", 989.5e12),
    ("NVIDIA H200 NVL", 835.5e12),
    ("NVIDIA GH200 480GB", 989.5e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA A10G", 125e12),
    ("NVIDIA A10", 125e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362.05e12),
    ("NVIDIA L40", 181.05e12),
    ("Tesla V100-SXM2-16GB", 125e12),
    ("Tesla V100-PCIE-32GB", 112e12),
    ("Tesla T4", 65e12),
    ("NVIDIA GeForce RTX 4090", 165.2e12),
    ("NVIDIA GeForce GTX 1080 Ti", None),
    ("NVIDIA A1000 6GB Laptop GPU", None),  # \b keeps "A100" from matching other model numbers
])
def test_peak_flops_table_lookup(name, expected):
    assert tp.peak_flops(name) == expected


def test_no_peak_flops_on_cpu():
    assert tp.device_peak_flops(torch.device("cpu")) is None


def test_interval_metrics_by_hand():
    dims = (1_000_000, 2, 64)
    out = tp.interval_metrics_from_totals(
        samples=64, tokens=6400, steps=4, busy_seconds=2.0, busy_seconds_sum=3.9, data_wait_seconds_sum=0.39,
        num_processes=2, dims=dims, peak_flops_sum=2e12,
    )
    fpt = 6 * 1_000_000 + 12 * 2 * 64 * 100  # mean length 6400 / 64 = 100 tokens
    assert out["samples_per_second"] == 32
    assert out["tokens_per_second"] == 3200
    assert out["step_time"] == 0.5
    assert out["data_wait_fraction"] == pytest.approx(0.1)
    assert out["tflops_per_device"] == pytest.approx(fpt * 3200 / 2 / 1e12)
    assert out["mfu"] == pytest.approx(fpt * 3200 / 2e12)
    unknown = tp.interval_metrics_from_totals(
        samples=64, tokens=6400, steps=4, busy_seconds=2.0, busy_seconds_sum=3.9, data_wait_seconds_sum=0.39,
        num_processes=2, dims=dims, peak_flops_sum=None,
    )
    assert "mfu" not in unknown and "tflops_per_device" in unknown
    assert tp.interval_metrics_from_totals(samples=0, tokens=0, steps=0, busy_seconds=0.0, busy_seconds_sum=0.0,
                                           data_wait_seconds_sum=0.0, num_processes=1, dims=dims,
                                           peak_flops_sum=None) == {}


def test_meter_counts_only_time_inside_steps(accelerator):
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=64, vocab_size=100))
    meter = tp.ThroughputMeter(accelerator.prepare(model), accelerator)
    for i in range(2):
        time.sleep(0.02)
        meter.data_wait(0.02)
        if i == 0:
            meter.add_batch(4, 37)
        else:  # as the loop passes them: attention_mask.sum() stays a device tensor (no sync per batch)
            meter.add_batch(torch.tensor(4), torch.ones(4, 10, dtype=torch.long).sum() - 3)
        time.sleep(0.05)
        meter.step_done()
        time.sleep(0.5)  # "evaluation and saving" between updates: must not count as step time
    m = meter.interval_metrics()
    assert 0.07 <= m["step_time"] < 0.2  # counting the pause would give >= (2 * 0.07 + 0.5) / 2 = 0.32
    assert m["samples_per_second"] == pytest.approx(8 / (2 * m["step_time"]))
    assert m["tokens_per_second"] == pytest.approx(74 / (2 * m["step_time"]))
    assert 0.08 < m["data_wait_fraction"] <= 0.29  # 0.02 s reported of >= 0.07 s per step
    assert "mfu" not in m and m["tflops_per_device"] > 0
    assert 0.01 < m["peak_rss_gib"] < 64  # CPU: peak RSS of this process
    assert meter.interval_metrics() == {}  # the interval was reset


# --------------------------------------------------------------------------- pure tracking decisions


def test_tracker_keys_follow_transformers_rewrite_logs():
    assert tr.tracker_metrics({"loss": 1.0, "eval_loss": 2.0, "test_accuracy": 0.5, "epoch": 1, "flag": True,
                               "note": "x"}) == {"train/loss": 1.0, "eval/loss": 2.0, "test/accuracy": 0.5,
                                                 "train/epoch": 1}


def test_wandb_init_kwargs_config_then_env_then_defaults(tmp_path):
    env = {"WANDB_PROJECT": "env-proj", "WANDB_ENTITY": "env-team", "WANDB_RUN_GROUP": "env-group",
           "WANDB_TAGS": "a, b", "WANDB_DIR": str(tmp_path / "wb")}
    cfg = make_cfg(tmp_path)
    kw = tr.wandb_init_kwargs(cfg.training, {"x": 1}, "abc", env)
    assert (kw["project"], kw["entity"], kw["group"], kw["tags"]) == ("env-proj", "env-team", "env-group", ["a", "b"])
    assert (kw["id"], kw["resume"], kw["dir"], kw["name"], kw["config"]) == ("abc", "allow", env["WANDB_DIR"],
                                                                           "unit-run", {"x": 1})
    cfg = make_cfg(tmp_path, wandb_project="p", wandb_entity="e", wandb_group="g", wandb_tags="t1,t2", run_name=None)
    kw = tr.wandb_init_kwargs(cfg.training, {}, "abc", env)
    assert (kw["project"], kw["entity"], kw["group"], kw["tags"]) == ("p", "e", "g", ["t1", "t2"])
    assert kw["name"] == "out"  # output_dir's name
    kw = tr.wandb_init_kwargs(make_cfg(tmp_path).training, {}, "abc", {})
    assert (kw["project"], kw["entity"], kw["group"], kw["tags"], kw["dir"]) == (
        "scaletune", None, None, None, str(tmp_path / "out"))


def test_missing_tracker_package_is_a_clear_config_error(monkeypatch):
    from scaletune.config import ConfigError

    monkeypatch.setitem(tr.TRACKER_PACKAGES, "wandb", ("wandb_not_installed_here", "wandb"))
    with pytest.raises(ConfigError, match="pip install wandb"):
        tr.check_report_to(["wandb"])


def test_summary_screen_names_best_and_paths():
    text = tr.format_summary(
        {"global_step": 40, "best_metric": 0.875, "best_global_step": 30, "best_model_checkpoint": "o/checkpoint-30",
         "eval_accuracy": 0.85, "test_accuracy": 0.8, "output_dir": "o", "model_dir": "o/final",
         "predictions_file": "o/predict_results.csv"},
        "accuracy", {"metrics log": "o/metrics.jsonl", "curves": "o/curves.png"}, "demo (run id x)", 75)
    for piece in ("eval_accuracy = 0.875 at step 30", "o/checkpoint-30", "o/final", "o/predict_results.csv",
                  "o/metrics.jsonl", "o/curves.png", "0:01:15"):
        assert piece in text
    assert re.search(r"final eval +accuracy 0.85\n", text) and re.search(r"final test +accuracy 0.8\n", text)
    assert len(text.splitlines()) < 25  # one screen


# --------------------------------------------------------------------------- curves PNG


def _records(start, stop, seed=0.0):
    recs = []
    for s in range(start, stop + 1):
        recs.append({"step": s, "loss": 2.0 / s + seed, "grad_norm": 1.0 + 0.1 * s, "learning_rate": 1e-3 * (1 - s / 40),
                     "epoch": s / 10, "tokens_per_second": 1000.0 + s, "data_wait_fraction": 0.05})
        if s % 5 == 0:
            recs.append({"step": s, "eval_loss": 1.5 / s, "eval_accuracy": 0.5 + s / 100, "eval_runtime": 0.3})
    return recs


def test_curves_png_is_a_real_plot_of_the_jsonl(tmp_path):
    import matplotlib.image as mpimg
    import numpy as np

    path = tmp_path / "metrics.jsonl"
    for rec in _records(1, 20, seed=9.0) + _records(15, 30):  # a resumed run re-logs steps 15..20
        tr.append_jsonl(path, rec)
    png = tmp_path / "curves.png"
    drawn = tr.plot_curves(tr.read_jsonl(path), png, title="t")

    expected = jsonl_series(json.loads(line) for line in path.read_text().splitlines())
    plotted = {key: dict(zip(*xy)) for panel in drawn.values() for key, xy in panel.items()}
    assert set(plotted) == {"loss", "eval_loss", "eval_accuracy", "learning_rate", "grad_norm", "tokens_per_second",
                            "data_wait_fraction"}  # eval_runtime and epoch are not curves worth a panel
    for key, xy in plotted.items():
        assert xy == expected[key], key  # same steps and values, the resumed attempt winning
    assert plotted["loss"][16] == pytest.approx(2.0 / 16)

    img = mpimg.imread(png)
    h, w = img.shape[:2]
    assert (w, h) == (1200, 640)  # 15x8 in at 80 dpi
    rgb = img[..., :3]
    ink = (rgb.min(axis=-1) < 0.9).mean()
    assert 0.02 < ink < 0.5  # axes, text and lines, not a blank or solid image
    colours = np.unique((rgb * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50  # anti-aliased coloured lines, not a flat placeholder
    blue = (rgb[..., 2] > 0.6) & (rgb[..., 0] < 0.3)  # matplotlib's first line colour (C0, #1f77b4)
    assert blue.sum() > 200


# --------------------------------------------------------------------------- RunTracker against real trackers


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
def test_tracker_writes_jsonl_wandb_tensorboard_and_resumes_the_same_run(tmp_path, monkeypatch, accelerator):
    wandb_dir = tmp_path / "wb"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_TAGS", "unit,offline")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    cfg = make_cfg(tmp_path, report_to="wandb,tensorboard", wandb_project="st-tests", wandb_group="g1",
                   disable_tqdm=True, metric_for_best_model="accuracy")
    big = "x" * 70_000  # spans W&B log blocks: exercises FIRST/MIDDLE/LAST chunk joining

    first = tr.RunTracker(cfg, accelerator)
    first.start(10, 0)
    for rec in _records(1, 6):
        first.log({k: v for k, v in rec.items() if k != "step"}, rec["step"])
    first.wandb_run.config.update({"big": big})
    first.finish({"global_step": 6, "best_metric": 0.55, "best_global_step": 5, "eval_accuracy": 0.55})

    second = tr.RunTracker(cfg, accelerator, run_id=first.run_id)  # requeued job: id read from the checkpoint
    assert second.run_id == first.run_id
    second.start(10, 5)
    for rec in _records(6, 10):
        second.log({k: v for k, v in rec.items() if k != "step"}, rec["step"])
    second.finish({"global_step": 10, "best_metric": 0.6, "best_global_step": 10,
                   "best_model_checkpoint": str(tmp_path / "out/checkpoint-10"), "eval_accuracy": 0.6})

    records = tr.read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert records[0]["step"] == 1 and records[-1]["step"] == 10  # appended, not truncated
    assert len(records) == len(_records(1, 6)) + len(_records(6, 10))

    runs = [read_run(p) for p in find_runs(wandb_dir)]
    assert len(runs) == 2 and {r.run_id for r in runs} == {first.run_id}
    steps = [row["_step"] for r in runs for row in r.history]
    assert steps == sorted(steps) and steps[0] == 1 and steps[-1] == 10
    assert runs[1].resumed
    assert (runs[0].project, runs[0].name, runs[0].group, runs[0].tags) == ("st-tests", "unit-run", "g1",
                                                                             ["unit", "offline"])
    assert runs[0].config["learning_rate"] == cfg.training.learning_rate
    assert runs[0].config["report_to"] == ["wandb", "tensorboard"]
    assert runs[0].config["big"] == big
    assert runs[1].summary["best_metric"] == 0.6 and runs[1].summary["best_global_step"] == 10
    assert runs[1].summary["eval/accuracy"] == 0.6
    assert runs[1].summary["best_model_checkpoint"].endswith("checkpoint-10")

    tb = read_tensorboard(tmp_path / "out" / "runs" / "unit-run")
    # Step 6 was logged by both attempts (as after a resume from checkpoint-5); the later values win everywhere.
    assert_trackers_match_jsonl(records, runs, tb)
    assert (tmp_path / "out" / "curves.png").stat().st_size > 10_000

    fresh = tr.RunTracker(make_cfg(tmp_path, disable_tqdm=True), accelerator)  # no checkpoint: starts over
    fresh.log({"loss": 3.0}, 1)
    assert tr.read_jsonl(tmp_path / "out" / "metrics.jsonl") == [{"step": 1, "loss": 3.0}]


def test_plot_curves_false_draws_nothing_and_the_summary_says_no_curves(tmp_path, accelerator, capsys):
    tracker = tr.RunTracker(make_cfg(tmp_path, disable_tqdm=True, plot_curves=False), accelerator)
    tracker.log({"loss": 1.5}, 1)
    tracker.finish({"global_step": 1})
    summary = capsys.readouterr().out
    assert not (tmp_path / "out" / "curves.png").exists()
    labels = [line.split()[0] for line in summary.splitlines() if line.startswith("  ") and line.split()]
    assert "metrics" in labels and "curves" not in labels, summary
