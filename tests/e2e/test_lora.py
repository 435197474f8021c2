"""LoRA (peft) end to end: the real pretrained MiniLM for classification and MLM in one process, then every
backend (DDP, ZeRO-2, ZeRO-3, FSDP2) on two CPU processes with a tiny BERT: the classifier under ZeRO-2, ZeRO-3 and
FSDP2, the masked LM under DDP, ZeRO-3 and FSDP2.

What is checked: the trainable share printed at start, checkpoints that hold the adapter and not the frozen
model, the best-model reload of the adapter, and two exports that reproduce the run's evaluation: the
adapter loaded with `PeftModel.from_pretrained`, and the merged model loaded with plain `from_pretrained`.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from scaletune.assets import model_path
from scaletune.train import run
from support.tiny import REPO, evaluate_classifier, run_cli

pytestmark = pytest.mark.slow  # every test here launches a training run or a process

MINILM = "packaged:minilm"
QUIET = {"disable_tqdm": True, "plot_curves": False, "report_to": "none", "do_predict": False, "logging_steps": 1}
# Evaluate and save at steps 2 and 4; the inverted metric makes step 2 the best, so the end-of-training reload
# has to bring back an older adapter than the last one.
BEST_IS_STEP_2 = {"max_steps": 4, "eval_strategy": "steps", "eval_steps": 2, "save_steps": 2,
                  "load_best_model_at_end": True, "metric_for_best_model": "loss", "greater_is_better": True}


def _evals(log_history) -> dict:
    return {h["step"]: h for h in log_history if "eval_loss" in h}


def _keys(path: Path) -> set:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _evaluate(model, tokenizer, validation_file: str) -> dict:
    """What the user does with an exported model: tokenize, predict, score (no scaletune code)."""
    return evaluate_classifier(model, tokenizer, validation_file)


# --------------------------------------------------------------------------- the real MiniLM, one process


@pytest.fixture(scope="module")
def minilm_classifier(tmp_path_factory, sentiment_files):
    out = tmp_path_factory.mktemp("lora_minilm") / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):  # the start-up line (accelerator.print) and the end screen
        result = run({**QUIET, **BEST_IS_STEP_2, "model_name_or_path": MINILM, **sentiment_files,
                      "per_device_train_batch_size": 8, "learning_rate": 5e-3, "use_peft": True,
                      "output_dir": str(out)})
    return {"result": result, "out": out, "printed": stdout.getvalue().splitlines(), **sentiment_files}


def test_trainable_share_is_printed_and_small(minilm_classifier):
    line = next(p for p in minilm_classifier["printed"] if "trainable parameters" in p)
    trainable, total, share = re.search(r"trainable parameters ([\d,]+) of ([\d,]+) \(([\d.]+)%\)", line).groups()
    trainable, total = int(trainable.replace(",", "")), int(total.replace(",", ""))
    # r=8 on query and value of 6 layers (384 wide), plus the 2-label classifier trained whole
    assert trainable == 6 * 2 * (384 * 8 + 8 * 384) + (384 * 2 + 2)
    assert float(share) < 2 and "on query,value" in line and "trained whole: classifier" in line
    assert total > 22_000_000


def test_checkpoints_hold_the_adapter_not_the_frozen_model(minilm_classifier):
    out = minilm_classifier["out"]
    ckpt = out / "checkpoint-4"
    assert not (ckpt / "model.safetensors").exists() and (ckpt / "adapter" / "adapter_config.json").is_file()
    keys = _keys(ckpt / "adapter" / "adapter_model.safetensors")
    assert keys and all("lora_" in k or ".classifier." in k for k in keys), sorted(keys)[:5]
    # A full checkpoint holds the weights and twice as much AdamW state; 1/10 of the weights alone is stricter.
    assert _size(ckpt) <= (out / "model.safetensors").stat().st_size / 10, _size(ckpt)


def test_best_reload_and_both_exports_reproduce_the_evaluation(minilm_classifier):
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    out, result = minilm_classifier["out"], minilm_classifier["result"]
    evals = _evals(result.log_history)
    assert result.best_global_step == 2 and evals[2]["eval_loss"] != pytest.approx(evals[4]["eval_loss"], abs=1e-4)
    final = result.metrics
    assert final["eval_loss"] == pytest.approx(evals[2]["eval_loss"], abs=1e-6)  # the step-2 adapter came back
    tokenizer = AutoTokenizer.from_pretrained(out)
    # The merged model: a plain transformers folder, no adapter layers left in it.
    merged, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any("lora" in k or "base_layer" in k or "modules_to_save" in k for k in _keys(out / "model.safetensors"))
    got = _evaluate(merged, tokenizer, minilm_classifier["validation_file"])
    assert got["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-4)
    assert got["eval_accuracy"] == pytest.approx(final["eval_accuracy"], abs=1e-6)
    # The adapter alone, on the pretrained MiniLM, as peft users load it.
    base = AutoModelForSequenceClassification.from_pretrained(model_path(MINILM),
                                                              config=AutoConfig.from_pretrained(out))
    adapted = PeftModel.from_pretrained(base, out / "adapter")
    got = _evaluate(adapted, tokenizer, minilm_classifier["validation_file"])
    assert got["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-4)
    assert got["eval_accuracy"] == pytest.approx(final["eval_accuracy"], abs=1e-6)
    # merged = pretrained + the adapter's update: the query projection really changed
    assert not torch.equal(merged.bert.encoder.layer[0].attention.self.query.weight,
                           adapted.get_base_model().bert.encoder.layer[0].attention.self.query.base_layer.weight)


def test_mlm_trains_the_new_head_and_the_merged_export_reproduces_the_evaluation(tmp_path):
    data = {**QUIET, "task": "mlm", "dataset_name": "packaged:bbc_news", "max_seq_length": 32,
            "max_train_samples": 32, "max_eval_samples": 16, "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 16}
    out = tmp_path / "mlm"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        result = run({**data, **BEST_IS_STEP_2, "model_name_or_path": MINILM, "learning_rate": 5e-3,
                      "use_peft": True, "output_dir": str(out)})
    share = re.search(r"trainable parameters [\d,]+ of [\d,]+ \(([\d.]+)%\)", stdout.getvalue())
    assert share and float(share.group(1)) < 2, stdout.getvalue()[:2000]
    # The adapter, the new head transform and their optimizer state: a tenth of the merged weights at most.
    assert _size(out / "checkpoint-2") <= (out / "model.safetensors").stat().st_size / 10
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    # The encoder-only MiniLM has no MLM head: its new transform is trained whole; the decoder (tied to the
    # word embeddings) is not copied.
    assert config["modules_to_save"] == ["cls.predictions.transform"]
    keys = _keys(out / "checkpoint-2" / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.cls.predictions.transform.dense.weight" in keys
    assert not any("decoder" in k or "word_embeddings" in k for k in keys)
    evals = _evals(result.log_history)
    assert result.metrics["eval_loss"] == pytest.approx(evals[2]["eval_loss"], abs=1e-6)  # best adapter reloaded
    # The merged export, evaluated by a plain run (no peft) on the same validation texts and masks.
    check = run({**data, "model_name_or_path": str(out), "do_train": False, "output_dir": str(tmp_path / "eval")})
    assert check.metrics["eval_loss"] == pytest.approx(result.metrics["eval_loss"], abs=1e-4)
    assert check.metrics["eval_accuracy"] == pytest.approx(result.metrics["eval_accuracy"], abs=1e-6)
    # The adapter alone on the pretrained MiniLM, as peft users load it (its new head transform comes with it).
    from peft import PeftModel
    from transformers import AutoModelForMaskedLM

    adapted = PeftModel.from_pretrained(AutoModelForMaskedLM.from_pretrained(model_path(MINILM)), out / "adapter")
    check = run({**data, "model_name_or_path": str(out), "do_train": False, "output_dir": str(tmp_path / "eval2")},
                model=adapted)
    assert check.metrics["eval_loss"] == pytest.approx(result.metrics["eval_loss"], abs=1e-4)
    assert check.metrics["eval_accuracy"] == pytest.approx(result.metrics["eval_accuracy"], abs=1e-6)


# --------------------------------------------------------------------------- every backend, two processes

# Each backend that shards parameters (ZeRO-3, FSDP2) runs both jobs, each against a reference that keeps whole
# parameters on every rank. The classifier's is ZeRO-2: its modules_to_save head has the optimizer state that
# ZeRO-2 shards (it shards optimizer state and gradients, not parameters). The masked LM trains the adapters only
# (no optimizer state beyond theirs), so its reference is DDP's, which is then LoRA's DDP run for both jobs.
BACKENDS = ["deepspeed_zero2", "deepspeed_zero3", "fsdp2"]
MLM_BACKENDS = ["multi_gpu", "deepspeed_zero3", "fsdp2"]


# The same short LoRA job on each backend: evaluated and saved at step 2.
BACKEND_JOB = ["--do_predict", "false", "--per_device_train_batch_size", "4", "--learning_rate", "5e-2",
               "--max_steps", "2", "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "2",
               "--save_steps", "2", "--use_peft", "true", "--disable_tqdm", "true", "--plot_curves", "false"]


def _launch_every_backend(root: Path, args: list[str], backends=BACKENDS) -> dict:
    """`./launch PRESET --cpu 2` for each backend, into root/PRESET; the output dirs by preset."""
    outs = {preset: root / preset for preset in backends}
    for preset, out in outs.items():
        run_cli([str(REPO / "launch"), preset, "--cpu", "2", *args, *BACKEND_JOB, "--output_dir", str(out)],
                cwd=root, timeout=600, env={"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    return outs


def _adapter_tensors(folder: Path) -> dict:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _checkpoint_bytes(ckpt: Path) -> int:
    """What a checkpoint stores besides the tokenizer files."""
    return sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file() and not p.name.startswith("tokenizer"))


@pytest.fixture(scope="module")
def backends(tmp_path_factory, tiny_bert_no_dropout, sentiment_files):
    outs = _launch_every_backend(tmp_path_factory.mktemp("lora_backends"), [
        "--model_name_or_path", tiny_bert_no_dropout, "--train_file", sentiment_files["train_file"],
        "--validation_file", sentiment_files["validation_file"]])
    return {"outs": outs, "model": tiny_bert_no_dropout, **sentiment_files}


@pytest.mark.parametrize("preset", BACKENDS)
def test_lora_trains_saves_and_exports_under_every_backend(preset, backends):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = backends["outs"][preset]
    for adapter in (out / "checkpoint-2" / "adapter", out / "adapter"):  # gathered from the shards of every backend
        tensors = _adapter_tensors(adapter)
        assert tensors and all(t.numel() > 0 and t.abs().sum() > 0 for t in tensors.values()), preset
    # No copy of the frozen model in the checkpoint, whatever the backend's own format.
    model_bytes = (Path(backends["model"]) / "model.safetensors").stat().st_size
    assert _checkpoint_bytes(out / "checkpoint-2") < model_bytes / 4
    # Identical updates everywhere: the same losses as ZeRO-2's whole parameters.
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    reference = json.loads((backends["outs"]["deepspeed_zero2"] / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses == pytest.approx([h["loss"] for h in reference if "loss" in h], abs=1e-5) and len(losses) == 2
    # The merged model (merged on rank 0 from gathered weights) reproduces the run's last evaluation.
    final = json.loads((out / "all_results.json").read_text())
    got = _evaluate(AutoModelForSequenceClassification.from_pretrained(out), AutoTokenizer.from_pretrained(out),
                    backends["validation_file"])
    assert got["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-4), preset


@pytest.fixture(scope="module")
def mlm_backends(tmp_path_factory):
    """Masked-LM LoRA on a tiny BERT whose MLM head is pretrained (so only the adapters train: no bias, no
    norm, one optimizer group), on every backend that shards parameters, and DDP; under FSDP2 the head's tied
    output bias is sharded once."""
    from support.mlm import rotten_texts
    from support.tiny import make_tiny_bert

    root = tmp_path_factory.mktemp("lora_mlm_backends")
    model = str(make_tiny_bert(root / "tiny_mlm", mlm=True, dropout=0.0))
    texts = rotten_texts(96)  # real reviews, few enough that tokenizing them is instant in every process
    (root / "train.txt").write_text("\n".join(texts[:64]) + "\n")
    (root / "validation.txt").write_text("\n".join(texts[64:]) + "\n")
    data = {"task": "mlm", "train_file": str(root / "train.txt"), "validation_file": str(root / "validation.txt"),
            "max_seq_length": 32}
    outs = _launch_every_backend(root, [*(f"--{k}={v}" for k, v in data.items()), "--model_name_or_path", model,
                                        "--report_to", "none"], MLM_BACKENDS)
    return {"outs": outs, "model": model, "data": data, "root": root}


@pytest.mark.parametrize("preset", MLM_BACKENDS)
def test_mlm_lora_trains_saves_and_exports_under_every_backend(preset, mlm_backends):
    out = mlm_backends["outs"][preset]
    for adapter in (out / "checkpoint-2" / "adapter", out / "adapter"):
        tensors = _adapter_tensors(adapter)
        # Only the adapters trained: 2 layers x query/value x A/B, each non-empty and moved off zero.
        assert len(tensors) == 8 and all("lora_" in k for k in tensors), sorted(tensors)
        assert all(t.numel() > 0 and t.abs().sum() > 0 for t in tensors.values()), preset
    model_bytes = (Path(mlm_backends["model"]) / "model.safetensors").stat().st_size
    assert _checkpoint_bytes(out / "checkpoint-2") < model_bytes / 10
    # The adapters start from the same random init on every backend (a ZeRO-3 load draws from the generator
    # differently), so the updates and losses are DDP's.
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    reference = json.loads((mlm_backends["outs"]["multi_gpu"] / "trainer_state.json").read_text())["log_history"]
    for key in ("loss", "grad_norm"):
        got = [h[key] for h in history if "loss" in h]
        assert got == pytest.approx([h[key] for h in reference if "loss" in h], rel=1e-5) and len(got) == 2, key
    # The merged model, evaluated by a plain one-process run (no peft) on the same texts and masks.
    final = json.loads((out / "all_results.json").read_text())
    check = run({**QUIET, **mlm_backends["data"], "model_name_or_path": str(out), "do_train": False,
                 "output_dir": str(mlm_backends["root"] / f"eval_{preset}")})
    assert check.metrics["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-4), preset
    assert check.metrics["eval_accuracy"] == pytest.approx(final["eval_accuracy"], abs=1e-6), preset


# --------------------------------------------------------------------------- the other tasks, one process


def _task_job(task: str, tiny_bert: str, tmp: Path) -> dict:
    """Each task's data and a tiny model of the right kind (the model is not the point here)."""
    from support.ner_clm import make_tiny_llama, make_tiny_token_bert, ner_files, rotten_lines

    if task == "regression":
        return {"task": task, "model_name_or_path": tiny_bert, "dataset_name": "packaged:lee_similarity",
                "max_train_samples": 32, "max_eval_samples": 8, "max_seq_length": 48,
                "ignore_mismatched_sizes": True}
    if task == "multilabel":
        return {"task": task, "model_name_or_path": tiny_bert, "dataset_name": "packaged:tweet_entity_types",
                "label_delimiter": ";", "max_eval_samples": 8, "max_seq_length": 48,
                "ignore_mismatched_sizes": True}
    if task == "token_classification":
        files = ner_files(tmp / "ner", 24, 8, 1)
        return {"task": task, "model_name_or_path": make_tiny_token_bert(tmp / "bert"), "max_seq_length": 40,
                "train_file": files["train_file"], "validation_file": files["validation_file"]}
    files = rotten_lines(tmp / "text", 48, 12, 1)
    return {"task": "clm", "model_name_or_path": make_tiny_llama(tmp / "llama"), "block_size": 32,
            "train_file": files["train_file"], "validation_file": files["validation_file"]}


@pytest.mark.parametrize("task, trained_whole", [("regression", ["classifier"]), ("multilabel", ["classifier"]),
                                                 ("token_classification", ["classifier"]), ("clm", None)])
def test_lora_on_every_other_task_checkpoints_the_adapter_and_exports_a_plain_model(task, trained_whole,
                                                                                     tiny_bert, tmp_path):
    job = {**QUIET, **_task_job(task, tiny_bert, tmp_path), "per_device_train_batch_size": 8,
           "per_device_eval_batch_size": 8}
    out = tmp_path / "out"
    result = run({**job, "max_steps": 2, "eval_strategy": "steps", "eval_steps": 2, "save_steps": 2,
                  "learning_rate": 5e-2, "use_peft": True, "output_dir": str(out)})
    # The head of a task is new and trained whole; a causal LM's head is pretrained (tied): adapters only.
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["modules_to_save"] == trained_whole
    ckpt = out / "checkpoint-2"
    assert not (ckpt / "model.safetensors").exists()
    tensors = _adapter_tensors(ckpt / "adapter")
    lora = {k: t for k, t in tensors.items() if "lora_" in k}
    assert lora and all(t.abs().sum() > 0 for t in lora.values())
    assert all("lora_" in k or ".classifier." in k for k in tensors), sorted(tensors)
    # The merged export is a plain model of the task: a one-process evaluation without peft reproduces the run's.
    check = run({**job, "model_name_or_path": str(out), "do_train": False, "output_dir": str(tmp_path / "eval")})
    assert check.metrics["eval_loss"] == pytest.approx(result.metrics["eval_loss"], abs=1e-4)
    assert not any("lora" in k or "base_layer" in k for k in _keys(out / "model.safetensors"))
