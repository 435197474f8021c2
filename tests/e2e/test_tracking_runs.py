"""Tracking end to end: real training runs (one process in-process, two with `accelerate launch`) log the same
values to JSONL, offline W&B and TensorBoard, once per run.
"""

from __future__ import annotations

import json

import pytest

from scaletune import tracking as tr
from support.trackers import assert_trackers_match_jsonl, jsonl_series, read_tensorboard
from support.wandb_reader import find_runs, read_run

pytestmark = pytest.mark.slow  # every test here launches a training run or a process


def _train_args(tiny_bert, files, out, **extra) -> dict:
    return {"model_name_or_path": tiny_bert, "train_file": files["train_file"],
            "validation_file": files["validation_file"], "output_dir": str(out), "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 64, "logging_steps": 2, "eval_strategy": "steps", "eval_steps": 4,
            "save_steps": 4, "do_predict": False, "disable_tqdm": True, **extra}


THROUGHPUT_KEYS = {"samples_per_second", "tokens_per_second", "step_time", "data_wait_fraction",
                   "tflops_per_device", "peak_rss_gib"}


def test_single_process_run_logs_the_same_to_wandb_tensorboard_and_jsonl(tiny_bert, sentiment_files, tmp_path,
                                                                        monkeypatch):
    from scaletune.train import run

    wandb_dir = tmp_path / "wb"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    out = tmp_path / "out"
    result = run(_train_args(tiny_bert, sentiment_files, out, max_steps=8, report_to="wandb,tensorboard",
                             run_name="e2e", wandb_project="st-e2e", metric_for_best_model="accuracy",
                             plot_curves=True))

    records = tr.read_jsonl(out / "metrics.jsonl")
    train_recs = [r for r in records if "loss" in r]
    eval_recs = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_recs] == [2, 4, 6, 8]
    assert [r["step"] for r in eval_recs] == [4, 8]
    for r in train_recs:
        assert {"loss", "grad_norm", "learning_rate", "epoch"} | THROUGHPUT_KEYS <= set(r)
        assert "mfu" not in r  # CPU: no peak to compare with
        # One process, 8 rows per update (96 rows: no short batch in the first 8 updates).
        assert r["samples_per_second"] * r["step_time"] == pytest.approx(8)
        assert 4 < r["tokens_per_second"] / r["samples_per_second"] < 30  # non-padding tokens per sentence
        assert 0 <= r["data_wait_fraction"] < 1
    assert {r["step"]: r["loss"] for r in train_recs} == {e["step"]: e["loss"] for e in result.log_history
                                                          if "loss" in e}

    runs = [read_run(p) for p in find_runs(wandb_dir)]
    assert len(runs) == 1
    wb = runs[0]
    saved = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    assert wb.run_id == saved["tracker_run_id"]  # what a requeued job will resume
    assert (wb.project, wb.name) == ("st-e2e", "e2e")
    assert wb.config["model_name_or_path"] == tiny_bert and wb.config["max_steps"] == 8
    assert wb.config["logging_steps"] == 2  # the full effective config
    assert wb.summary["best_metric"] == result.best_metric
    assert wb.summary["best_global_step"] == result.best_global_step
    assert wb.summary["eval/accuracy"] == result.metrics["eval_accuracy"]

    tb = read_tensorboard(out / "runs" / "e2e")
    assert_trackers_match_jsonl(records, runs, tb)

    import matplotlib.image as mpimg

    img = mpimg.imread(out / "curves.png")
    assert img.shape[:2] == (640, 1200) and (img[..., :3].min(axis=-1) < 0.9).mean() > 0.02


def test_two_processes_log_once(tiny_bert, sentiment_files, tmp_path):
    from support.tiny import accelerate_launch

    out, wandb_dir = tmp_path / "out", tmp_path / "wb"
    args = _train_args(tiny_bert, sentiment_files, out, max_steps=4, per_device_train_batch_size=4,
                       report_to="wandb")
    argv = [a for k, v in args.items() for a in (f"--{k}", str(v))]
    proc = accelerate_launch(2, argv, env={"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir)}, timeout=300)

    runs = find_runs(wandb_dir)
    assert len(runs) == 1, runs  # rank 1 started no W&B run
    wb = read_run(runs[0])
    assert [row["_step"] for row in wb.history] == [2, 4]
    records = tr.read_jsonl(out / "metrics.jsonl")
    assert [(r["step"], "eval_loss" in r) for r in records] == [(2, False), (4, False), (4, True)]  # one stream
    for r in records[:2]:
        # Counts are reduced over ranks: 2 processes x 4 rows per update.
        assert r["samples_per_second"] * r["step_time"] == pytest.approx(8)
    saved = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert wb.run_id == saved["tracker_run_id"]
    assert_trackers_match_jsonl(records, [wb], {tr.tracker_key(k): list(v.items())
                                                for k, v in jsonl_series(records).items()})
    assert (proc.stdout + proc.stderr).count("scaletune: run finished") == 1
    assert (proc.stdout + proc.stderr).count("[step 2]") == 1
