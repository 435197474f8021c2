"""Scale out: every accelerate config in accelerate_configs/, DeepSpeed "auto" filling, ZeRO-3 export, precision.

The end-to-end tests launch the real thing on CPU through `./launch PRESET --cpu N` (gloo; real DeepSpeed
ZeRO-1/2/3 engines, real FSDP2 `fully_shard`), a tiny BERT without dropout, for a few steps with evaluation,
saves and a resume. One run per preset is shared by every assertion about it: process start-up is most of a
launch's cost, so a check rides on a run made here whenever that run can serve it unchanged.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from scaletune.checkpoint import verify
from scaletune.config import ConfigError, TrainingArguments
from scaletune.distributed import adjust_for_cpu_only, effective_mixed_precision, fill_deepspeed_config
from support.tiny import REPO, evaluate_classifier, run_cli, write_sentiment_csv

CONFIG_DIR = REPO / "accelerate_configs"
PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
# Launched here: every preset but the multi-node ones: tests/cluster/test_slurm.py runs multi_node on two real
# Slurm nodes (rendezvous, training, the one-node run's weights and metrics); FSDP2 on two processes is fsdp2's
# run. Their launch commands are checked with every preset's below.
LAUNCHED = [p for p in PRESETS if not p.endswith("multi_node")]
# Resumed on the same process count, into a second output dir: the sharded backends. Not resumed here, since
# another run already checks that resume on the same backend and count:
# - single_gpu: tests/e2e/test_core.py's mid-epoch resume (the same one-process load, in the pytest process);
# - multi_gpu (DDP, 2 processes): tests/cluster/test_slurm.py's requeued job resumes a 2-process DDP run (dropout
#   on) and ends as its uninterrupted run (weights to 1e-6, every loss); tests/e2e/test_k8s.py's restarted pod and
#   tests/e2e/test_ray.py's restarted worker resume one too;
# - the offloaded presets and ZeRO-1: their resume would be that of fsdp2 / deepspeed_zero3 / deepspeed_zero2 (the
#   same FSDP2 state-dict load, the same DeepSpeed load_checkpoint of per-rank optimizer shards; on CPU the
#   offloaded state already lives where the parameters do).
RESUMED = ["deepspeed_zero2", "deepspeed_zero3", "fsdp2"]
# 2 per device x 2 accumulation x 2 processes: FSDP2's accumulation without gradient sync against DDP's. One
# process accumulates 2 x 4: its checkpoint resumes on 2 processes with accumulation 1 (and the 2-process DDP
# one on 1 process with accumulation 4).
ACCUMULATION = {"single_gpu": 2, "multi_gpu": 2, "fsdp2": 2}
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
def work(tmp_path_factory, tiny_bert_no_dropout, sentiment_files):
    """A tiny BERT without dropout: one process and two must compute the very same thing. 24 training rows are
    3 updates of 8 an epoch: checkpoint-2 is mid-epoch, and the resumed steps 3 and 4 cross into the second
    epoch, whose order must not depend on the process count either. Whole batches only: accelerate pads a short
    last batch on N > 1 processes with samples from the epoch's start, so N processes would see other samples."""
    root = tmp_path_factory.mktemp("scale_out")
    train = write_sentiment_csv(root / "train.csv", 24, seed=1)
    return {"root": root, "model": tiny_bert_no_dropout, **sentiment_files, "train_file": str(train)}


def _train_args(work, processes: int, output_dir: Path, accumulation: int = 1) -> list[str]:
    return [
        "--model_name_or_path", work["model"], "--train_file", work["train_file"],
        "--validation_file", work["validation_file"], "--do_predict", "false",
        "--per_device_train_batch_size", str(GLOBAL_BATCH // (processes * accumulation)),
        "--gradient_accumulation_steps", str(accumulation), "--learning_rate", "1e-2",
        "--max_steps", "4", "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "2",
        "--save_steps", "2", "--load_best_model_at_end", "true",
        # On these 24 rows at this learning rate the eval loss rises from step 2 to step 4: the best checkpoint is
        # step 2, not the last one, so the end-of-training reload has to bring back older weights under every
        # backend (the tests assert both facts, so a change of data or model that ends this fails loudly).
        "--metric_for_best_model", "loss", "--greater_is_better", "false",
        "--disable_tqdm", "true", "--plot_curves", "false", "--output_dir", str(output_dir),
    ]


def _env() -> dict:
    return {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def _launch(preset: str, processes: int, args: list[str], cwd, extra=(), check=True):
    return run_cli([LAUNCH, preset, "--cpu", str(processes), *extra, *args], env=_env(), cwd=cwd, check=check,
                   timeout=600)


_RUNS: dict = {}


def run_preset(preset: str, work) -> dict:
    """Train 4 steps (saves at 2 and 4), then (RESUMED) resume from checkpoint-2 into a second output dir. Cached."""
    if preset in _RUNS:
        return _RUNS[preset]
    processes = 1 if preset == "single_gpu" else 2
    # ZeRO-3 also recomputes activations (gradient checkpointing): its loss curve must not change.
    knobs = ["--gradient_checkpointing", "true"] if preset == "deepspeed_zero3" else []
    first, resumed = work["root"] / f"{preset}-run", work["root"] / f"{preset}-resumed"
    # The resume reads another folder's checkpoint: this test wrote it, so it is trusted (DeepSpeed unpickles).
    runs = [(first, [])]
    if preset in RESUMED:
        runs.append((resumed, ["--resume_from_checkpoint", str(first / "checkpoint-2"), "--trust_checkpoint", "true"]))
    for out, extra in runs:
        args = _train_args(work, processes, out, ACCUMULATION.get(preset, 1)) + knobs + extra
        _launch(preset, processes, args, cwd=work["root"])  # not the repo: ./launch works from anywhere
    _RUNS[preset] = {"first": first, "resumed": resumed if preset in RESUMED else None, "processes": processes}
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
    if resumed is None:
        return
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
    """DDP and FSDP2 (2 per device x 2 accumulation), ZeRO-1/2/3 (+offload) and FSDP2 with CPU offload (2 x 4 per
    device) == 1 process x 4 x 2 accumulation: same loss curve."""
    one = run_preset("single_gpu", work)["first"]
    two = run_preset(preset, work)["first"]
    for key in ("loss", "eval_loss", "grad_norm"):
        expected, got = _by_step(one, key), _by_step(two, key)
        assert sorted(got) == sorted(expected)
        for step in expected:
            assert got[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5), (key, step, got, expected)


def _evaluate_exported(model_dir: Path, validation_file: str) -> dict:
    """What the user does with the exported folder, in one process: from_pretrained, tokenize, predict (no
    scaletune code)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, info = AutoModelForSequenceClassification.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return evaluate_classifier(model.float(), tokenizer, validation_file)


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
    """`--mixed_precision bf16` (the accelerate config's field) turns DeepSpeed's bf16 "auto" on. One process:
    the precision, not the process count, is what is checked (1 x 8 is the 2 x 4 run's global batch)."""
    out = work["root"] / "zero2-bf16"
    args = _train_args(work, 1, out) + ["--load_best_model_at_end", "false", "--max_steps", "2",
                                        "--save_strategy", "no", "--eval_strategy", "no"]
    _launch("deepspeed_zero2", 1, args, cwd=work["root"], extra=["--mixed_precision", "bf16"])
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


@pytest.mark.slow
def test_zero2_checkpoint_resumes_on_one_process_through_the_universal_format(work):
    """ZeRO partitions the optimizer state per process: the 2-process run's mid-epoch checkpoint-2 resumed on 1
    process converts it to DeepSpeed's universal format in a view beside it (the checkpoint itself stays as
    written) and continues the run (ZeRO-3 1 -> 2 and DDP both ways: tests/e2e/test_world_size_resume.py)."""
    first = run_preset("deepspeed_zero2", work)["first"]
    resumed = work["root"] / "zero2-on-one"
    resumed.mkdir()
    shutil.copytree(first / "checkpoint-2", resumed / "checkpoint-2")
    proc = _launch("deepspeed_zero2", 1, _train_args(work, 2, resumed) + ["--resume_from_checkpoint", "latest"],
                   cwd=work["root"])
    said = proc.stdout + proc.stderr
    assert "gradient_accumulation_steps 1 -> 2 keeps the global batch" in said
    assert "converted to DeepSpeed's universal checkpoint" in said
    a, b = _by_step(first, "loss"), _by_step(resumed, "loss")
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):  # fp32, no dropout: the same updates on the other count
        assert b[step] == pytest.approx(a[step], abs=1e-4), (step, a[step], b[step])
    assert json.loads((resumed / "trainer_state.json").read_text())["world_size"] == 1
    assert not [p for p in resumed.iterdir() if p.name.startswith(".universal-")]  # the view is gone
    assert verify(resumed / "checkpoint-2") is None  # and the checkpoint it was made from is as written


@pytest.mark.slow
@pytest.mark.parametrize("saved,resumed_on", [("multi_gpu", 1), ("single_gpu", 2)])
def test_ddp_checkpoint_resumes_on_another_process_count(saved, resumed_on, work):
    """The run's mid-epoch checkpoint-2, left where a preempted job leaves it, resumed on the other count: the
    global batch is kept by rescaling accumulation, and the losses continue the run's (into the second epoch)."""
    r = run_preset(saved, work)
    saved_on, accumulation = r["processes"], ACCUMULATION[saved]
    out = work["root"] / f"{saved}-on-{resumed_on}"
    out.mkdir()
    shutil.copytree(r["first"] / "checkpoint-2", out / "checkpoint-2")
    proc = _launch("single_gpu" if resumed_on == 1 else "multi_gpu", resumed_on,
                   _train_args(work, saved_on, out, accumulation) + ["--resume_from_checkpoint", "latest"],
                   cwd=work["root"])
    new_accumulation = accumulation * saved_on // resumed_on
    assert (f"gradient_accumulation_steps {accumulation} -> {new_accumulation} keeps the global batch"
            in proc.stderr + proc.stdout)
    a, b = _by_step(r["first"], "loss"), _by_step(out, "loss")
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], abs=1e-4), (step, a[step], b[step])
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["world_size"] == resumed_on and state["global_step"] == 4
    assert re.search(r"Resumed from \S+checkpoint-2 at step 2\.", proc.stdout), proc.stdout[-2000:]
    if saved_on > resumed_on:  # each fact in one line: the counts (with the rescaling), whose random state is dropped
        counts = f"checkpoint-2 was written by {saved_on} process(es) and this run has {resumed_on}"
        said = [line for line in proc.stderr.splitlines() if counts in line]
        assert len(said) == 1 and said[0].startswith("scaletune: "), proc.stderr[-3000:]
        dropped = [line for line in proc.stdout.splitlines() if "random state" in line]
        assert dropped == ["scaletune: the random state of processes 1..1 is dropped (the checkpoint has 2, this run "
                           "has 1)."], proc.stdout[-3000:]


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


# --------------------------------------------------------------------------- FSDP2 (fully_shard) on CPU
# fsdp2's run above (2 per device x 2 accumulation x 2 processes) against multi_gpu's (the same sizes, DDP), its
# resume, a resume of its checkpoint on 4 processes, and bf16 through FSDP's policy. The CPU switch and the checks
# made before anything loads: tests/e2e/test_fsdp2.py.


@pytest.mark.slow
def test_fsdp2_loss_per_step_equals_ddp_under_accumulation(work):
    # fp32, the same global batch: FSDP2's reduce-scatter and accumulation without gradient sync
    # (accelerator.no_sync -> set_requires_gradient_sync) give DDP's updates. Step 1 also shows that rank 1,
    # which loaded no weights (fsdp_cpu_ram_efficient_loading), received rank 0's.
    ddp_run, fsdp_run = run_preset("multi_gpu", work)["first"], run_preset("fsdp2", work)["first"]
    for key, tol in (("loss", 1e-5), ("eval_loss", 1e-5), ("grad_norm", 1e-5)):
        ddp, fsdp = _by_step(ddp_run, key), _by_step(fsdp_run, key)
        assert sorted(fsdp) == sorted(ddp) and ddp
        for step in ddp:
            assert fsdp[step] == pytest.approx(ddp[step], abs=tol), (key, step, fsdp, ddp)


@pytest.mark.slow
def test_fsdp2_checkpoints_are_sharded_complete_and_loadable_in_one_process(work):
    out = run_preset("fsdp2", work)["first"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not [p for p in out.iterdir() if ".partial" in p.name or ".deleting" in p.name]
    for ckpt in out.glob("checkpoint-*"):
        # torch.distributed.checkpoint shards (written by FSDP only, so this was no DDP fallback) ...
        assert list((ckpt / "pytorch_model_fsdp_0").glob("*.distcp")) and (ckpt / "optimizer_0").is_dir()
        # ... plus the consolidated weights, and the manifest that makes the folder verifiable
        assert (ckpt / "model.safetensors").is_file() and verify(ckpt) is None
    got = _evaluate_exported(out / "checkpoint-4", work["validation_file"])
    assert got["eval_loss"] == pytest.approx(_by_step(out, "eval_loss")[4], abs=1e-5)


@pytest.mark.slow
def test_fsdp2_best_model_reload_and_the_whole_model_export(work):
    out = run_preset("fsdp2", work)["first"]
    evals = _by_step(out, "eval_loss")
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["best_global_step"] == 2 and evals[2] != pytest.approx(evals[4], abs=1e-4)
    final = json.loads((out / "all_results.json").read_text())
    assert final["eval_loss"] == pytest.approx(evals[2], abs=1e-6)  # step 2's weights were reloaded
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:  # gathered, not one rank's shard
        sizes = {k: f.get_tensor(k).numel() for k in f.keys()}
    assert sizes and min(sizes.values()) > 0
    assert sizes["bert.embeddings.word_embeddings.weight"] == 30522 * 32
    got = _evaluate_exported(out, work["validation_file"])  # 1 process evaluates what 2 FSDP2 processes evaluated
    assert got["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-5)
    assert got["eval_accuracy"] == pytest.approx(final["eval_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_fsdp2_resume_mid_epoch_continues_exactly(work):
    r = run_preset("fsdp2", work)
    first, resumed = r["first"], r["resumed"]
    assert _by_step(first, "epoch")[2] < 1 < _by_step(first, "epoch")[4]  # 24 examples / 8 per update
    losses, again = _by_step(first, "loss"), _by_step(resumed, "loss")
    for step in (3, 4):
        assert again[step] == pytest.approx(losses[step], abs=1e-6), (step, again, losses)
    assert _by_step(resumed, "eval_loss")[4] == pytest.approx(_by_step(first, "eval_loss")[4], abs=1e-6)
    final = json.loads((first / "all_results.json").read_text())
    assert json.loads((resumed / "all_results.json").read_text())["eval_loss"] == pytest.approx(final["eval_loss"],
                                                                                                abs=1e-6)


@pytest.mark.slow
def test_fsdp2_resume_on_another_process_count_reshards(work):
    """The 2-process run's step-2 checkpoint resumed on 4 processes (accumulation 2 -> 1, the same global batch
    of 8): torch.distributed.checkpoint reshards the weights and optimizer. One direction is enough: 4 -> 2 is
    the same resharding, and a 4-process reference run would cost two more 4-process launches on CI's 2 cores."""
    two = run_preset("fsdp2", work)["first"]
    out = work["root"] / "fsdp2-two-to-four"
    out.mkdir()
    shutil.copytree(two / "checkpoint-2", out / "checkpoint-2")
    # The config keeps the accumulation it was written with; the resume rescales it to keep the global batch.
    proc = _launch("fsdp2", 4, _train_args(work, 2, out, accumulation=2) + ["--resume_from_checkpoint", "latest"],
                   cwd=work["root"])
    assert "gradient_accumulation_steps 2 -> 1 keeps the global batch" in proc.stderr
    losses, resumed = _by_step(two, "loss"), _by_step(out, "loss")
    assert sorted(resumed) == sorted(losses) == [1, 2, 3, 4]  # steps 1-2 from the checkpoint's history
    for step in (3, 4):  # the remaining samples, on 4 processes x 1 accumulation, continue the 2 x 2 run
        assert resumed[step] == pytest.approx(losses[step], abs=1e-4), (step, resumed, losses)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["world_size"] == 4 and state["global_step"] == 4


@pytest.mark.slow
def test_fsdp2_bf16_is_fsdps_mixed_precision_policy(work):
    from safetensors import safe_open
    import torch

    out = work["root"] / "fsdp2-bf16"
    args = _train_args(work, 2, out, accumulation=2) + ["--max_steps", "2", "--eval_strategy", "no",
                                                        "--save_strategy", "no", "--load_best_model_at_end", "false"]
    _launch("fsdp2", 2, args, cwd=work["root"], extra=["--mixed_precision", "bf16"])
    bf16, fp32 = _by_step(out, "loss"), _by_step(run_preset("multi_gpu", work)["first"], "loss")
    assert sorted(bf16) == [1, 2]
    for step in bf16:  # the same computation in bf16 ...
        assert bf16[step] == pytest.approx(fp32[step], abs=0.02) and math.isfinite(bf16[step])
    assert any(bf16[s] != fp32[s] for s in bf16)  # ... really in bf16
    # MixedPrecisionPolicy gathers bf16 copies for compute; the sharded master weights stay fp32.
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
