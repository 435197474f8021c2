"""Trainer's everyday arguments, each shown to change what it should (issue: Trainer drop-in, item 2)."""

from __future__ import annotations

import math

import pytest
import torch

from scaletune.config import load_config
from scaletune.errors import ConfigError
from scaletune.train import run

BASE = {"do_predict": False, "disable_tqdm": True, "report_to": "none", "save_strategy": "no",
        "per_device_train_batch_size": 8, "logging_steps": 1, "learning_rate": 1e-3}


def job(tiny_bert, sentiment_files, tmp_path, name, **kw):
    return run({"model_name_or_path": tiny_bert, **sentiment_files, **BASE, "output_dir": str(tmp_path / name),
                **kw})


def train_logs(result):
    return [h for h in result.log_history if "loss" in h]


def test_optimizers_are_trainers_classes_with_their_arguments(tiny_bert):
    from transformers import AutoModelForSequenceClassification
    from transformers.optimization import Adafactor

    from scaletune.optim import build_optimizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)

    def built(**kw):
        return build_optimizer(model, load_config({"train_file": "x.csv", **kw}).training)

    fused, plain = built(), built(optim="adamw_torch")
    assert isinstance(fused, torch.optim.AdamW) and fused.defaults["fused"] and not plain.defaults.get("fused")
    sgd = built(optim="sgd", optim_args="momentum=0.9,nesterov=true", learning_rate=0.1)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"]
    assert isinstance(built(optim="adafactor"), Adafactor)
    # Trainer's parameter groups either way: no weight decay on biases and LayerNorm weights.
    assert [g["weight_decay"] for g in built(optim="sgd", weight_decay=0.1).param_groups] == [0.1, 0.0]


@pytest.mark.slow
def test_sgd_trains_differently_from_adamw(tiny_bert, sentiment_files, tmp_path):
    adam = job(tiny_bert, sentiment_files, tmp_path, "adam", max_steps=4)
    sgd = job(tiny_bert, sentiment_files, tmp_path, "sgd", max_steps=4, optim="sgd", optim_args="momentum=0.9")
    a, s = train_logs(adam), train_logs(sgd)
    assert a[0]["loss"] == pytest.approx(s[0]["loss"], rel=1e-6)  # same first batch, same weights
    assert a[-1]["loss"] != pytest.approx(s[-1]["loss"], rel=1e-6)


@pytest.mark.slow
def test_every_schedule_of_get_scheduler_gives_its_learning_rates(tiny_bert, sentiment_files, tmp_path):
    from transformers import get_scheduler

    r = job(tiny_bert, sentiment_files, tmp_path, "restarts", max_steps=12, warmup_steps=2,
            lr_scheduler_type="cosine_with_restarts", lr_scheduler_kwargs={"num_cycles": 2})
    reference = get_scheduler("cosine_with_restarts", torch.optim.SGD([torch.zeros(1)], lr=1e-3),
                              num_warmup_steps=2, num_training_steps=12, scheduler_specific_kwargs={"num_cycles": 2})
    expected = []
    for _ in range(12):
        expected.append(reference.get_last_lr()[0])
        reference.step()
    assert [h["learning_rate"] for h in train_logs(r)] == pytest.approx(expected, rel=1e-9)
    assert sum(1 for a, b in zip(expected[3:], expected[4:]) if b > a) == 1  # a second cycle restarts the rate
    with pytest.raises(ConfigError, match="lr_scheduler_kwargs"):
        job(tiny_bert, sentiment_files, tmp_path, "badkw", max_steps=2, lr_scheduler_type="linear",
            lr_scheduler_kwargs={"num_cycles": 2})


@pytest.mark.slow
def test_reduce_lr_on_plateau_steps_on_the_evaluation_metric(tiny_bert, sentiment_files, tmp_path):
    # A metric that never improves: with patience 0 the rate halves after every evaluation but the first.
    r = run({"model_name_or_path": tiny_bert, **sentiment_files, **BASE, "output_dir": str(tmp_path / "plateau"),
             "max_steps": 6, "eval_strategy": "steps", "eval_steps": 2, "metric_for_best_model": "score",
             "lr_scheduler_type": "reduce_lr_on_plateau", "lr_scheduler_kwargs": {"patience": 0, "factor": 0.5}},
            compute_metrics=lambda predictions, label_ids: {"score": 1.0})
    lrs = {h["step"]: h["learning_rate"] for h in train_logs(r)}
    assert lrs[1] == lrs[2] == lrs[3] == 1e-3 and lrs[5] == pytest.approx(5e-4) and lrs[6] == pytest.approx(5e-4)
    with pytest.raises(ConfigError, match="reduce_lr_on_plateau"):
        load_config({"train_file": "x.csv", "lr_scheduler_type": "reduce_lr_on_plateau"})


@pytest.mark.slow
def test_label_smoothing_changes_the_loss_as_torch_defines_it(tiny_bert, sentiment_files, tmp_path):
    from scaletune.losses import CrossEntropy

    logits, labels = torch.randn(6, 3), torch.tensor([0, 2, 1, -100, 2, 0])
    sums, items = CrossEntropy(label_smoothing=0.2).per_sample(logits, labels)
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.2, ignore_index=-100)
    assert (sums.sum() / items.sum()).item() == pytest.approx(expected.item(), rel=1e-6)
    plain = job(tiny_bert, sentiment_files, tmp_path, "plain", max_steps=1)
    smooth = job(tiny_bert, sentiment_files, tmp_path, "smooth", max_steps=1, label_smoothing_factor=0.3)
    assert train_logs(plain)[0]["loss"] != pytest.approx(train_logs(smooth)[0]["loss"], rel=1e-4)


@pytest.mark.slow
def test_logging_strategy_epoch_and_no(tiny_bert, sentiment_files, tmp_path):
    # 96 rows / 8 = 12 updates per epoch.
    by_epoch = job(tiny_bert, sentiment_files, tmp_path, "epoch", num_train_epochs=2, logging_strategy="epoch")
    assert [h["step"] for h in train_logs(by_epoch)] == [12, 24]
    silent = job(tiny_bert, sentiment_files, tmp_path, "no", max_steps=3, logging_strategy="no")
    assert train_logs(silent) == []


@pytest.mark.slow
def test_num_input_tokens_seen_counts_every_non_padding_token(tiny_bert, sentiment_files, tmp_path):
    from transformers import AutoTokenizer

    r = job(tiny_bert, sentiment_files, tmp_path, "tokens", num_train_epochs=1, include_num_input_tokens_seen=True)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    import csv

    with open(sentiment_files["train_file"], newline="") as f:
        total = sum(len(tok(row["text"], truncation=True, max_length=128)["input_ids"]) for row in csv.DictReader(f))
    seen = [h["num_input_tokens_seen"] for h in train_logs(r)]
    assert seen == sorted(seen) and seen[-1] == total  # one epoch: every training token once


@pytest.mark.slow
def test_eval_accumulation_steps_gives_the_same_metrics(tiny_bert, sentiment_files, tmp_path):
    a = job(tiny_bert, sentiment_files, tmp_path, "acc1", max_steps=2, per_device_eval_batch_size=4)
    b = job(tiny_bert, sentiment_files, tmp_path, "acc3", max_steps=2, per_device_eval_batch_size=4,
            eval_accumulation_steps=3)
    for key, value in a.metrics.items():
        assert b.metrics[key] == pytest.approx(value, rel=1e-9) or (math.isnan(value) and math.isnan(b.metrics[key]))


@pytest.mark.slow
def test_tf32_without_an_ampere_gpu_is_an_error(tiny_bert, sentiment_files, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="tf32=true needs an Ampere"):
        job(tiny_bert, sentiment_files, tmp_path, "tf32", max_steps=1, tf32=True)


@pytest.mark.slow
def test_exported_model_has_a_model_card(tiny_bert, sentiment_files, tmp_path):
    r = job(tiny_bert, sentiment_files, tmp_path, "card", max_steps=4, eval_strategy="steps", eval_steps=2,
            save_strategy="steps", save_steps=2, load_best_model_at_end=True, metric_for_best_model="accuracy")
    card = (tmp_path / "card" / "README.md").read_text()
    assert card.startswith("---") and "scaletune" in card  # Hub metadata header, tags
    for expected in ("learning_rate: 0.001", "train_batch_size: 8", "seed: 42", "training_steps: 4",
                     "| Training Loss | Epoch ", "| Validation Loss | Accuracy ", "### Best checkpoint",
                     f"accuracy: {r.best_metric:.4g} at step {r.best_global_step}"):
        assert expected in card, expected
    import re

    rows = re.findall(r"^\| [0-9.]+ +\| [0-9.]+ +\| (\d+) +\| ([0-9.]+) ", card, flags=re.M)  # the eval history
    evals = [h for h in r.log_history if "eval_loss" in h]
    assert [int(step) for step, _ in rows] == [h["step"] for h in evals] == [2, 4]
    assert [float(v) for _, v in rows] == pytest.approx([h["eval_loss"] for h in evals], abs=1e-4)


@pytest.mark.slow
def test_save_only_model_checkpoints_hold_weights_only(tiny_bert, sentiment_files, tmp_path):
    r = job(tiny_bert, sentiment_files, tmp_path, "only", max_steps=4, eval_strategy="steps", eval_steps=2,
            save_strategy="steps", save_steps=2, load_best_model_at_end=True, save_only_model=True)
    full = job(tiny_bert, sentiment_files, tmp_path, "full", max_steps=4, eval_strategy="steps", eval_steps=2,
               save_strategy="steps", save_steps=2, load_best_model_at_end=True)
    only_files = {p.name for p in (tmp_path / "only" / "checkpoint-4").iterdir()}
    assert "model.safetensors" in only_files and not {"optimizer.bin", "scheduler.bin"} & only_files
    assert not any(n.startswith("random_states") for n in only_files)
    assert {"optimizer.bin", "scheduler.bin"} <= {p.name for p in (tmp_path / "full" / "checkpoint-4").iterdir()}
    assert r.metrics["eval_loss"] == pytest.approx(full.metrics["eval_loss"], rel=1e-6)  # best reload: weights only
    with pytest.raises(Exception, match="holds the model only"):
        job(tiny_bert, sentiment_files, tmp_path, "only", max_steps=6, save_strategy="steps", save_steps=2,
            save_only_model=True, resume_from_checkpoint="latest")


@pytest.mark.slow
def test_background_and_foreground_saves_resume_identically(tiny_bert, sentiment_files, tmp_path):
    """The background writer's checkpoint is the one accelerate's save_state writes: same files, same resume."""
    runs = {}
    for background in (True, False):
        name = f"bg{int(background)}"
        job(tiny_bert, sentiment_files, tmp_path, name, max_steps=3, save_strategy="steps", save_steps=3,
            save_in_background=background)
        runs[background] = job(tiny_bert, sentiment_files, tmp_path, name, max_steps=6, save_strategy="steps",
                               save_steps=3, save_in_background=background, resume_from_checkpoint="latest")
        assert sorted(p.name for p in (tmp_path / name / "checkpoint-3").iterdir()) == sorted(
            p.name for p in (tmp_path / "bg1" / "checkpoint-3").iterdir())
    a, b = train_logs(runs[True]), train_logs(runs[False])
    assert [h["loss"] for h in a] == [h["loss"] for h in b]


def test_ddp_and_compile_arguments_reach_the_accelerator(monkeypatch):
    from accelerate.state import AcceleratorState

    from scaletune.distributed import build_accelerator

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    cfg = load_config({"train_file": "x.csv", "ddp_find_unused_parameters": True, "ddp_timeout": 77,
                       "torch_compile_mode": "reduce-overhead"})
    assert cfg.training.torch_compile  # a compile mode implies compiling, as Trainer
    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier in-process run's state must not answer
    try:
        acc = build_accelerator(cfg)
        assert acc.ddp_handler.find_unused_parameters is True
        assert acc.init_handler.timeout.total_seconds() == 77
        # torch_compile compiles the step's forward + loss (fast_path), so accelerate compiles no model.
        assert acc.state.dynamo_plugin.backend.value == "NO"
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.slow
def test_exported_and_checkpointed_weights_are_readable_like_every_other_file(tiny_bert, sentiment_files, tmp_path):
    import os
    import stat

    job(tiny_bert, sentiment_files, tmp_path, "modes", max_steps=2, save_strategy="steps", save_steps=2)
    mask = os.umask(0)
    os.umask(mask)
    for path in (tmp_path / "modes" / "model.safetensors", tmp_path / "modes" / "checkpoint-2" / "model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path  # not 0600 on a shared filesystem
