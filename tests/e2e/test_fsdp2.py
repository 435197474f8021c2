"""FSDP2 (`fully_shard`) for real on CPU: `./launch fsdp2 --cpu 2` shards a tiny BERT over two gloo processes.

One DDP run and one FSDP2 run with the same global batch (2 per device x 2 accumulation x 2 processes) are
compared step by step; the FSDP2 run is resumed from its mid-epoch checkpoint, and its export is evaluated
in one process with plain `from_pretrained`. The runs are shared by every assertion about them.
"""

from __future__ import annotations

import json
import math
import shutil
import shlex
import sys
from pathlib import Path

import pytest

from scaletune.checkpoint import verify
from scaletune.config import ConfigError
from scaletune.distributed import check_fsdp_launch, fsdp_layers_to_wrap, untie_fsdp_aliases
from support.tiny import REPO, evaluate_classifier, make_tiny_bert, run_cli

LAUNCH = str(REPO / "launch")


# --------------------------------------------------------------------------- decisions (nothing launched)


def test_fsdp_on_cpu_runs_only_behind_the_switch_and_only_fsdp2():
    cpu = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "ACCELERATE_USE_CPU": "true"}
    # Without the switch accelerate would train DDP and call it FSDP: refused, naming the command that works.
    with pytest.raises(ConfigError, match=r"silently trains DDP.*\./launch <fsdp preset> --cpu N"):
        check_fsdp_launch(cpu, cuda_available=False)
    assert check_fsdp_launch({**cpu, "SCALETUNE_FSDP_ON_CPU": "1"}, cuda_available=False)
    gpu = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    assert not check_fsdp_launch({**gpu, "SCALETUNE_FSDP_ON_CPU": "1"}, cuda_available=True)  # GPUs: accelerate's own
    with pytest.raises(ConfigError, match="FSDP2 only: set fsdp_version: 2"):
        check_fsdp_launch({**gpu, "FSDP_VERSION": "1"}, cuda_available=True)
    assert not check_fsdp_launch({"ACCELERATE_USE_CPU": "true"}, cuda_available=False)  # not FSDP at all


def _dry_run(*args, gpus: str = "") -> list[str]:
    env = {"PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": gpus, "SLURM_NNODES": "", "SLURM_NODEID": "",
           "MASTER_ADDR": "", "MASTER_PORT": ""}
    out = run_cli([LAUNCH, *args, "--train_file", "train.csv", "--dry-run"], env=env, cwd=REPO, timeout=60)
    return shlex.split(out.stdout.splitlines()[1][len("command: "):])


@pytest.mark.slow
def test_launch_sets_the_cpu_switch_only_for_fsdp_with_cpu():
    cmd = _dry_run("fsdp2", "--cpu", "2")
    assert cmd[:2] == ["ACCELERATE_USE_CPU=true", "SCALETUNE_FSDP_ON_CPU=1"]
    assert cmd[cmd.index("--config_file") + 1].endswith("accelerate_configs/fsdp2.yaml")
    for words in (_dry_run("fsdp2", gpus="0,1"), _dry_run("fsdp2_offload", gpus="0,1"),
                  _dry_run("multi_gpu", "--cpu", "2")):
        assert not any(w.startswith("SCALETUNE_FSDP_ON_CPU") for w in words)
    one = run_cli([LAUNCH, "fsdp2", "--cpu", "1", "--train_file", "train.csv", "--dry-run"], check=False, cwd=REPO,
                  env={"PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}, timeout=60)
    assert one.returncode == 2 and "needs at least 2" in one.stderr


def test_model_checks_made_before_prepare(tmp_path):
    import torch
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, BertForMaskedLM

    classifier = AutoModelForSequenceClassification.from_pretrained(make_tiny_bert(tmp_path / "cls"))
    # BertEmbeddings is in _no_split_modules, but accelerate shards the word embedding on its own.
    assert fsdp_layers_to_wrap(classifier) == ["BertLayer"]
    assert untie_fsdp_aliases(classifier) == []
    # BERT's MLM bias has two names; the head's goes (the decoder, in the embeddings' unit, keeps it) and stays
    # gone when accelerate calls tie_weights() while sharding. The decoder weight stays tied.
    mlm_path = make_tiny_bert(tmp_path / "mlm", mlm=True, dropout=0.0)
    mlm = AutoModelForMaskedLM.from_pretrained(mlm_path)
    ids = torch.tensor([[101, 2023, 2003, 102]])
    before = mlm(input_ids=ids).logits
    assert untie_fsdp_aliases(mlm) == ["cls.predictions.bias"]
    mlm.tie_weights()
    assert "cls.predictions.bias" not in dict(mlm.named_parameters(remove_duplicate=False))
    assert mlm.cls.predictions.decoder.weight is mlm.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(mlm(input_ids=ids).logits, before, rtol=0, atol=0)
    # A model whose own tie_weights registers the alias again cannot be sharded: said before prepare.

    class RetiesItsHead(BertForMaskedLM):
        def tie_weights(self, *args, **kwargs):
            super().tie_weights(*args, **kwargs)
            self.cls.predictions.bias = self.cls.predictions.decoder.bias

    with pytest.raises(ConfigError, match=r"cls\.predictions\.bias is tied .* deepspeed_zero3"):
        untie_fsdp_aliases(RetiesItsHead.from_pretrained(mlm_path))


# --------------------------------------------------------------------------- launched runs


def _args(model: str, files: dict, out: Path) -> list[str]:
    return ["--model_name_or_path", model, "--train_file", files["train_file"],
            "--validation_file", files["validation_file"], "--do_predict", "false",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-2",
            "--max_steps", "4", "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "2",
            "--save_steps", "2", "--load_best_model_at_end", "true",
            # Inverted on purpose: the best checkpoint is step 2, so the end-of-training reload must bring back
            # older weights than the last ones.
            "--metric_for_best_model", "loss", "--greater_is_better", "true",
            "--disable_tqdm", "true", "--output_dir", str(out)]


def _launch(preset: str, args: list[str], cwd: Path, extra=(), cpu: int = 2):
    return run_cli([LAUNCH, preset, "--cpu", str(cpu), *extra, *args],
                   env={"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert_no_dropout, sentiment_files):
    root = tmp_path_factory.mktemp("fsdp2")
    model, files = tiny_bert_no_dropout, sentiment_files
    out = {name: root / name for name in ("ddp", "fsdp2", "resumed", "bf16")}
    _launch("multi_gpu", _args(model, files, out["ddp"]), root)
    _launch("fsdp2", _args(model, files, out["fsdp2"]), root)
    # Resume where a preempted job would: the same output dir, holding what the run had written by step 2.
    out["resumed"].mkdir()
    shutil.copytree(out["fsdp2"] / "checkpoint-2", out["resumed"] / "checkpoint-2")
    _launch("fsdp2", _args(model, files, out["resumed"]) + ["--resume_from_checkpoint", "latest"], root)
    bf16 = _args(model, files, out["bf16"]) + ["--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no",
                                               "--load_best_model_at_end", "false"]
    _launch("fsdp2", bf16, root, extra=["--mixed_precision", "bf16"])
    return {**out, "validation_file": files["validation_file"]}


def _history(out: Path) -> list:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def _by_step(out: Path, key: str) -> dict:
    return {h["step"]: h[key] for h in _history(out) if key in h}


def _evaluate(model_dir: Path, validation_file: str) -> dict:
    """One process, no scaletune: from_pretrained, tokenize, predict."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, info = AutoModelForSequenceClassification.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return evaluate_classifier(model, tokenizer, validation_file)


@pytest.mark.slow
def test_fsdp2_loss_per_step_equals_ddp_under_accumulation(runs):
    # fp32, the same global batch: FSDP2's reduce-scatter and accumulation without gradient sync
    # (accelerator.no_sync -> set_requires_gradient_sync) give DDP's updates. Step 1 also shows that rank 1,
    # which loaded no weights (fsdp_cpu_ram_efficient_loading), received rank 0's.
    for key, tol in (("loss", 1e-5), ("eval_loss", 1e-5), ("grad_norm", 1e-5)):
        ddp, fsdp = _by_step(runs["ddp"], key), _by_step(runs["fsdp2"], key)
        assert sorted(fsdp) == sorted(ddp) and ddp
        for step in ddp:
            assert fsdp[step] == pytest.approx(ddp[step], abs=tol), (key, step, fsdp, ddp)


@pytest.mark.slow
def test_checkpoints_are_sharded_complete_and_loadable_in_one_process(runs):
    out = runs["fsdp2"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not [p for p in out.iterdir() if ".partial" in p.name or ".deleting" in p.name]
    for ckpt in out.glob("checkpoint-*"):
        # torch.distributed.checkpoint shards (written by FSDP only, so this was no DDP fallback) ...
        assert list((ckpt / "pytorch_model_fsdp_0").glob("*.distcp")) and (ckpt / "optimizer_0").is_dir()
        # ... plus the consolidated weights, and the manifest that makes the folder verifiable
        assert (ckpt / "model.safetensors").is_file() and verify(ckpt) is None
    got = _evaluate(out / "checkpoint-4", runs["validation_file"])
    assert got["eval_loss"] == pytest.approx(_by_step(out, "eval_loss")[4], abs=1e-5)


@pytest.mark.slow
def test_best_model_reload_and_the_whole_model_export(runs):
    out = runs["fsdp2"]
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
    got = _evaluate(out, runs["validation_file"])  # 1 process evaluates what 2 FSDP2 processes evaluated
    assert got["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-5)
    assert got["eval_accuracy"] == pytest.approx(final["eval_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_resume_mid_epoch_continues_exactly(runs):
    first, resumed = runs["fsdp2"], runs["resumed"]
    assert _by_step(first, "epoch")[2] < 1  # 96 examples / 8 per update: step 2 is mid-epoch
    losses, again = _by_step(first, "loss"), _by_step(resumed, "loss")
    for step in (3, 4):
        assert again[step] == pytest.approx(losses[step], abs=1e-6), (step, again, losses)
    assert _by_step(resumed, "eval_loss")[4] == pytest.approx(_by_step(first, "eval_loss")[4], abs=1e-6)
    final = json.loads((first / "all_results.json").read_text())
    assert json.loads((resumed / "all_results.json").read_text())["eval_loss"] == pytest.approx(final["eval_loss"],
                                                                                                abs=1e-6)


@pytest.fixture(scope="module")
def resharded(runs, tmp_path_factory, tiny_bert_no_dropout, sentiment_files):
    """The 2-process run's step-2 checkpoint resumed on 4 processes (accumulation 2 -> 1, the same global batch
    of 8): torch.distributed.checkpoint reshards the weights and optimizer. One direction is enough: 4 -> 2 is
    the same resharding, and a 4-process reference run would cost two more 4-process launches on CI's 2 cores."""
    root = tmp_path_factory.mktemp("fsdp2_resharded")
    out = root / "two_to_four"
    out.mkdir()
    shutil.copytree(runs["fsdp2"] / "checkpoint-2", out / "checkpoint-2")
    # The config keeps the accumulation it was written with; the resume rescales it to keep the global batch.
    proc = _launch("fsdp2", _args(tiny_bert_no_dropout, sentiment_files, out) + [
        "--gradient_accumulation_steps", "2", "--resume_from_checkpoint", "latest"], root, cpu=4)
    return out, proc


@pytest.mark.slow
def test_resume_on_another_process_count_reshards(runs, resharded):
    out, proc = resharded
    two = _by_step(runs["fsdp2"], "loss")
    assert "gradient_accumulation_steps 2 -> 1 keeps the global batch" in proc.stderr
    resumed = _by_step(out, "loss")
    assert sorted(resumed) == sorted(two) == [1, 2, 3, 4]  # steps 1-2 from the checkpoint's history
    for step in (3, 4):  # the remaining samples, on 4 processes x 1 accumulation, continue the 2 x 2 run
        assert resumed[step] == pytest.approx(two[step], abs=1e-4), (step, resumed, two)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["world_size"] == 4 and state["global_step"] == 4


@pytest.mark.slow
def test_bf16_is_fsdps_mixed_precision_policy(runs):
    from safetensors import safe_open
    import torch

    bf16, fp32 = _by_step(runs["bf16"], "loss"), _by_step(runs["ddp"], "loss")
    assert sorted(bf16) == [1, 2]
    for step in bf16:  # the same computation in bf16 ...
        assert bf16[step] == pytest.approx(fp32[step], abs=0.02) and math.isfinite(bf16[step])
    assert any(bf16[s] != fp32[s] for s in bf16)  # ... really in bf16
    # MixedPrecisionPolicy gathers bf16 copies for compute; the sharded master weights stay fp32.
    with safe_open(str(runs["bf16"] / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
