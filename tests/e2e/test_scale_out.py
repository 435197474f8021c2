"""Scale out: every accelerate config in accelerate_configs/, DeepSpeed "auto" filling, ZeRO-3 export, precision.

The end-to-end tests launch the real thing on CPU through `./launch PRESET --cpu N` (gloo; real DeepSpeed
ZeRO-1/2/3 engines), a tiny BERT without dropout, for a few steps with evaluation, saves and a resume. One run
per preset is shared by every assertion about it.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from scaletune.config import ConfigError, TrainingArguments
from scaletune.distributed import adjust_for_cpu_only, effective_mixed_precision, fill_deepspeed_config
from support.tiny import REPO, make_tiny_bert, run_cli

CONFIG_DIR = REPO / "accelerate_configs"
PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
# Launched here: every preset but fsdp2, whose run, resume and equality with DDP tests/e2e/test_fsdp2.py checks
# on its own runs (its offload variant is launched here), and the multi-node ones: tests/cluster/test_slurm.py
# runs multi_node on two real Slurm nodes (rendezvous, training, the one-node run's weights and metrics); FSDP2
# on two processes is fsdp2's run. Their launch commands are checked with every preset's below.
LAUNCHED = [p for p in PRESETS if p != "fsdp2" and not p.endswith("multi_node")]
LAUNCH = str(REPO / "launch")
GLOBAL_BATCH = 8


# --------------------------------------------------------------------------- "auto" filling (pure)


def _training(**kw) -> TrainingArguments:
    return replace(TrainingArguments(), **{"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                                           "max_grad_norm": 0.5, **kw})


def _ds(**kw) -> dict:
    return {"zero_optimization": {"stage": 2}, **kw}


def test_auto_and_missing_values_are_filled_from_the_training_config():
    ds = _ds(train_batch_size="auto", train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto",
             gradient_clipping="auto", bf16={"enabled": "auto"}, fp16={"enabled": "auto", "initial_scale_power": 12})
    out = fill_deepspeed_config(ds, _training(), world_size=3, mixed_precision="bf16")
    assert out["train_micro_batch_size_per_gpu"] == 4
    assert out["gradient_accumulation_steps"] == 2
    assert out["train_batch_size"] == 4 * 2 * 3
    assert out["gradient_clipping"] == 0.5
    assert out["bf16"]["enabled"] is True and out["fp16"]["enabled"] is False
    assert out["fp16"]["initial_scale_power"] == 12  # DeepSpeed's own settings are kept
    assert ds["train_batch_size"] == "auto"  # pure: the input is not modified
    # Absent keys are filled too: DeepSpeed's defaults (no clipping, accumulation 1) would silently differ.
    bare = fill_deepspeed_config(_ds(), _training(max_grad_norm=0.0), world_size=2, mixed_precision="no")
    assert (bare["train_batch_size"], bare["gradient_clipping"], bare["bf16"], bare["fp16"]) == \
        (16, 0.0, {"enabled": False}, {"enabled": False})


def test_explicit_values_that_disagree_are_one_error_naming_both_values():
    ds = _ds(train_micro_batch_size_per_gpu=16, gradient_accumulation_steps=2, gradient_clipping=1.0,
             fp16={"enabled": True})
    with pytest.raises(ConfigError) as e:
        fill_deepspeed_config(ds, _training(), world_size=2, mixed_precision="bf16")
    msg = str(e.value)
    assert "train_micro_batch_size_per_gpu=16" in msg and "gives 4 (per_device_train_batch_size)" in msg
    assert "gradient_clipping=1.0" in msg and "gives 0.5 (max_grad_norm)" in msg
    assert "fp16.enabled=True" in msg and "'bf16'" in msg
    assert "gradient_accumulation_steps=" not in msg  # it agrees
    assert '"auto"' in msg  # the fix
    with pytest.raises(ConfigError, match=r"train_batch_size=99 .* 4 x 2 x 2"):
        fill_deepspeed_config(_ds(train_batch_size=99), _training(), world_size=2, mixed_precision="no")


def test_explicit_values_that_agree_are_accepted():
    ds = _ds(train_micro_batch_size_per_gpu=4, train_batch_size=16, gradient_accumulation_steps=2,
             gradient_clipping=0.5, bf16={"enabled": "true"})
    out = fill_deepspeed_config(ds, _training(), world_size=2, mixed_precision="bf16")
    assert out["train_batch_size"] == 16 and out["bf16"]["enabled"] == "true"


def test_optimizer_or_scheduler_sections_are_rejected_and_zero3_always_gathers_weights():
    for section in ("optimizer", "scheduler"):
        with pytest.raises(ConfigError, match=f'remove "{section}"'):
            fill_deepspeed_config(_ds(**{section: {"type": "AdamW"}}), _training(), 1, "no")
    with pytest.raises(ConfigError, match="zero_optimization"):
        fill_deepspeed_config({"train_batch_size": "auto"}, _training(), 1, "no")
    z3 = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}}
    assert fill_deepspeed_config(z3, _training(), 1, "no")["zero_optimization"][
        "stage3_gather_16bit_weights_on_model_save"] is True


def test_mixed_precision_flag_wins_over_the_accelerate_config():
    env = {"ACCELERATE_MIXED_PRECISION": "fp16"}
    assert effective_mixed_precision(_training(bf16=True), env) == "bf16"
    assert effective_mixed_precision(_training(), env) == "fp16"
    assert effective_mixed_precision(_training(), {}) == "no"


def test_cpu_only_keeps_torch_adamw_with_offload_unless_configured():
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    assert adjust_for_cpu_only(offload)["zero_force_ds_cpu_optimizer"] is False
    assert adjust_for_cpu_only({**offload, "zero_force_ds_cpu_optimizer": True})["zero_force_ds_cpu_optimizer"]
    assert "zero_force_ds_cpu_optimizer" not in adjust_for_cpu_only(_ds())


def test_the_presets_deepspeed_json_fills_without_error():
    ds = json.loads((CONFIG_DIR / "deepspeed_zero3_offload.json").read_text())
    out = fill_deepspeed_config(ds, _training(), world_size=2, mixed_precision="fp16")
    assert out["fp16"]["enabled"] is True and out["train_batch_size"] == 16
    # what is still "auto" depends on the model's hidden size: accelerate fills it in prepare()
    left = {k for k, v in out["zero_optimization"].items() if v == "auto"}
    assert left == {"reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"}


def test_gradient_checkpointing_is_switched_on_by_the_config(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    from scaletune.distributed import configure_model

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    assert not configure_model(model, _training()).is_activation_checkpointing
    assert configure_model(model, _training(gradient_checkpointing=True)).is_activation_checkpointing


# --------------------------------------------------------------------------- the config files themselves


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_is_a_valid_accelerate_config_with_its_launch_command(preset):
    from accelerate.commands.config.config_args import load_config_from_file

    path = CONFIG_DIR / f"{preset}.yaml"
    load_config_from_file(str(path))  # accelerate's own parser: unknown keys or bad values raise
    header = "".join(line for line in path.read_text().splitlines(True) if line.startswith("#"))
    assert f"./launch {preset}" in header
    assert f"accelerate launch --config_file accelerate_configs/{preset}.yaml" in header
    assert "-m scaletune.train" in header


def test_all_the_expected_presets_exist():
    assert set(PRESETS) >= {"single_gpu", "multi_gpu", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3",
                            "deepspeed_zero3_offload", "multi_node"}
    offload = yaml.safe_load((CONFIG_DIR / "deepspeed_zero3_offload.yaml").read_text())
    ds = json.loads((REPO / offload["deepspeed_config"]["deepspeed_config_file"]).read_text())
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"


# --------------------------------------------------------------------------- end to end (launched)


@pytest.fixture(scope="module")
def work(tmp_path_factory, sentiment_files):
    """A tiny BERT without dropout: one process and two must compute the very same thing."""
    root = tmp_path_factory.mktemp("scale_out")
    model = make_tiny_bert(root / "tiny_bert_nodrop")
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    return {"root": root, "model": str(model), **sentiment_files}


def _train_args(work, processes: int, output_dir: Path) -> list[str]:
    return [
        "--model_name_or_path", work["model"], "--train_file", work["train_file"],
        "--validation_file", work["validation_file"], "--do_predict", "false",
        "--per_device_train_batch_size", str(GLOBAL_BATCH // processes), "--learning_rate", "1e-2",
        "--max_steps", "4", "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "2",
        "--save_steps", "2", "--load_best_model_at_end", "true",
        # Inverted on purpose: the best checkpoint is then step 2, not the last one (the eval loss falls), so
        # the end-of-training reload has to bring back older weights under every backend.
        "--metric_for_best_model", "loss", "--greater_is_better", "true",
        "--disable_tqdm", "true", "--output_dir", str(output_dir),
    ]


def _env() -> dict:
    return {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def _launch(preset: str, processes: int, args: list[str], cwd, extra=(), check=True):
    return run_cli([LAUNCH, preset, "--cpu", str(processes), *extra, *args], env=_env(), cwd=cwd, check=check,
                   timeout=600)


_RUNS: dict = {}


def run_preset(preset: str, work) -> dict:
    """Train 4 steps (saves at 2 and 4), then resume from checkpoint-2 into a second output dir. Cached."""
    if preset in _RUNS:
        return _RUNS[preset]
    processes = 1 if preset == "single_gpu" else 2
    # ZeRO-3 also recomputes activations (gradient checkpointing): its loss curve must not change.
    knobs = ["--gradient_checkpointing", "true"] if preset == "deepspeed_zero3" else []
    first, resumed = work["root"] / f"{preset}-run", work["root"] / f"{preset}-resumed"
    # The resume reads another folder's checkpoint: this test wrote it, so it is trusted (DeepSpeed unpickles).
    for out, extra in ((first, []), (resumed, ["--resume_from_checkpoint", str(first / "checkpoint-2"),
                                               "--trust_checkpoint", "true"])):
        args = _train_args(work, processes, out) + knobs + extra
        _launch(preset, processes, args, cwd=work["root"])  # not the repo: ./launch works from anywhere
    _RUNS[preset] = {"first": first, "resumed": resumed, "processes": processes}
    return _RUNS[preset]


def _history(out: Path) -> list:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def _by_step(out: Path, key: str) -> dict:
    return {h["step"]: h[key] for h in _history(out) if key in h}


@pytest.mark.slow
@pytest.mark.parametrize("preset", LAUNCHED)
def test_preset_trains_evaluates_saves_and_resumes(preset, work):
    r = run_preset(preset, work)
    first, resumed = r["first"], r["resumed"]
    assert sorted(p.name for p in first.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for ckpt in first.glob("checkpoint-*"):  # every backend leaves a from_pretrained-loadable model
        assert (ckpt / "model.safetensors").is_file() and (ckpt / "trainer_state.json").is_file()
    losses, evals = _by_step(first, "loss"), _by_step(first, "eval_loss")
    assert sorted(losses) == [1, 2, 3, 4] and sorted(evals) == [2, 4]
    assert all(math.isfinite(v) for v in losses.values())
    state = json.loads((first / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["best_global_step"] == 2
    # load_best_model_at_end brought back step 2's weights: the final evaluation is step 2's, not step 4's.
    final = json.loads((first / "all_results.json").read_text())
    assert evals[2] != pytest.approx(evals[4], abs=1e-4)
    assert final["eval_loss"] == pytest.approx(evals[2], abs=1e-5)
    # The resumed run continues exactly: same losses for steps 3 and 4, same evaluation, same final model.
    resumed_losses = _by_step(resumed, "loss")
    for step in (3, 4):
        assert resumed_losses[step] == pytest.approx(losses[step], abs=1e-5), (step, resumed_losses, losses)
    assert _by_step(resumed, "eval_loss")[4] == pytest.approx(evals[4], abs=1e-5)
    assert json.loads((resumed / "all_results.json").read_text())["eval_loss"] == pytest.approx(final["eval_loss"],
                                                                                                 abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("preset", [p for p in LAUNCHED if p != "single_gpu"])
def test_two_processes_match_one_process_with_the_same_global_batch(preset, work):
    """DDP, ZeRO-1/2/3 (+offload) and FSDP2 with CPU offload, 2 x 4 per device == 1 x 8: same loss curve."""
    one = run_preset("single_gpu", work)["first"]
    two = run_preset(preset, work)["first"]
    for key in ("loss", "eval_loss", "grad_norm"):
        expected, got = _by_step(one, key), _by_step(two, key)
        assert sorted(got) == sorted(expected)
        for step in expected:
            assert got[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5), (key, step, got, expected)


def _evaluate_exported(model_dir: Path, validation_file: str) -> dict:
    """What the user does with the exported folder: from_pretrained, tokenize, predict (no scaletune code)."""
    import pandas as pd
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    df = pd.read_csv(validation_file)
    enc = tokenizer(list(df["text"]), padding=True, truncation=True, max_length=128, return_tensors="pt")
    labels = torch.tensor([model.config.label2id[str(y)] for y in df["label"]])
    with torch.no_grad():
        logits = model(**enc).logits
    return {"eval_loss": F.cross_entropy(logits, labels).item(),
            "eval_accuracy": (logits.argmax(-1) == labels).float().mean().item()}


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["deepspeed_zero3", "deepspeed_zero3_offload"])
def test_zero3_export_loads_with_from_pretrained_and_reproduces_the_eval(preset, work):
    out = run_preset(preset, work)["first"]
    weights = (out / "model.safetensors")
    assert weights.stat().st_size > 100_000  # consolidated, not ZeRO-3's empty placeholders
    got = _evaluate_exported(out, work["validation_file"])
    best = {k: v for h in _history(out) if h["step"] == 2 and "eval_loss" in h for k, v in h.items()}
    assert got["eval_loss"] == pytest.approx(best["eval_loss"], abs=1e-4)
    assert got["eval_accuracy"] == pytest.approx(best["eval_accuracy"], abs=1e-6)
    # the checkpoints' weights load as well (and are the weights evaluated in the loop at that step)
    ckpt = _evaluate_exported(out / "checkpoint-4", work["validation_file"])
    assert ckpt["eval_loss"] == pytest.approx(_by_step(out, "eval_loss")[4], abs=1e-4)


@pytest.mark.slow
def test_bf16_through_the_accelerate_config_on_cpu(work):
    """`--mixed_precision bf16` (the accelerate config's field) turns DeepSpeed's bf16 "auto" on."""
    out = work["root"] / "zero2-bf16"
    args = _train_args(work, 2, out) + ["--load_best_model_at_end", "false", "--max_steps", "2",
                                        "--save_strategy", "no", "--eval_strategy", "no"]
    _launch("deepspeed_zero2", 2, args, cwd=work["root"], extra=["--mixed_precision", "bf16"])
    from safetensors import safe_open
    import torch

    with safe_open(str(out / "model.safetensors"), "pt") as f:  # DeepSpeed trained a bf16 model
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    fp32 = _by_step(run_preset("deepspeed_zero2", work)["first"], "loss")
    bf16 = _by_step(out, "loss")
    assert sorted(bf16) == [1, 2]
    for step in bf16:  # the same computation, at bf16 precision
        assert bf16[step] == pytest.approx(fp32[step], abs=0.02)
    assert any(bf16[s] != fp32[s] for s in bf16)


def _ds_yaml(tmp: Path, ds: dict, name: str) -> Path:
    (tmp / f"{name}.json").write_text(json.dumps(ds))
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"distributed_type": "DEEPSPEED", "num_machines": 1, "num_processes": 1,
                                    "deepspeed_config": {"deepspeed_config_file": f"{name}.json"}}))
    return path


@pytest.mark.slow
def test_explicit_deepspeed_value_that_disagrees_fails_before_training(work):
    ds = {"train_micro_batch_size_per_gpu": 16, "gradient_clipping": 0.5, "zero_optimization": {"stage": 2}}
    config = _ds_yaml(work["root"], ds, "ds_mismatch")
    out = work["root"] / "mismatch"
    proc = _launch(str(config), 1, _train_args(work, 2, out), cwd=work["root"], check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "train_micro_batch_size_per_gpu=16 but the training config gives 4" in text
    assert "gradient_clipping=0.5 but the training config gives 1.0 (max_grad_norm)" in text
    assert "[step" not in text and not list(out.glob("checkpoint-*"))


def _fp16_supported() -> bool:
    try:
        from deepspeed.accelerator import get_accelerator

        return bool(get_accelerator().is_fp16_supported())
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _fp16_supported(), reason="this CPU has no fp16 support for DeepSpeed")
def test_fp16_overflow_skips_the_update_and_does_not_advance_the_scheduler(work):
    # A loss scale of 2^20 overflows fp16 on the first steps; DeepSpeed halves it until it fits.
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "fp16": {"enabled": "auto", "initial_scale_power": 20, "hysteresis": 1},
          "zero_optimization": {"stage": 2}}
    config = _ds_yaml(work["root"], ds, "ds_fp16")
    out, max_steps, warmup, lr = work["root"] / "fp16", 8, 2, 1e-2
    args = _train_args(work, 2, out) + ["--fp16", "true", "--max_steps", str(max_steps), "--warmup_steps",
                                        str(warmup), "--load_best_model_at_end", "false", "--eval_strategy", "no",
                                        "--save_strategy", "no"]
    _launch(str(config), 2, args, cwd=work["root"])
    norms, rates = _by_step(out, "grad_norm"), _by_step(out, "learning_rate")
    skipped = [s for s in sorted(norms) if not math.isfinite(norms[s])]
    assert 0 < len(skipped) < max_steps, norms
    # The learning rate an update used is the schedule at the number of updates really made before it.
    done = 0
    for step in range(1, max_steps + 1):
        expected = lr * done / warmup if done < warmup else lr * (max_steps - done) / (max_steps - warmup)
        assert rates[step] == pytest.approx(expected, abs=1e-9), (step, rates, skipped)
        done += step not in skipped
