"""Masked-LM end to end through `scaletune.train.run` / `accelerate launch`: the real pretrained MiniLM where the
test is about learning, and a tiny BERT where it is about mechanics (accumulation, distribution, resume).

The unit tests of the MLM pieces are in tests/unit/test_mlm_units.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from scaletune.assets import model_path
from support.mlm import MINILM, line_examples, minilm_tokenizer, mlm_collator, rotten_texts

pytestmark = pytest.mark.slow  # every test here launches a training run or a process


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer()


RUN_QUIET = {"disable_tqdm": True, "plot_curves": False, "report_to": "none", "save_strategy": "no"}


def _weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def _train_entries(log_history):
    return [e for e in log_history if "loss" in e]


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    """The real pretrained MiniLM (its MLM head starts random) fine-tuned briefly on real BBC News text."""
    from scaletune.train import run

    out = tmp_path_factory.mktemp("mlm_minilm") / "out"
    return run({**RUN_QUIET, "task": "mlm", "model_name_or_path": MINILM, "dataset_name": "packaged:bbc_news",
                "max_seq_length": 32, "max_train_samples": 64, "max_eval_samples": 16, "do_predict": False,
                "max_steps": 8, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16,
                "learning_rate": 5e-4, "logging_steps": 2, "eval_strategy": "steps", "eval_steps": 8,
                "eval_on_start": True, "output_dir": str(out)})


def test_loss_falls_and_perplexity_is_exp_eval_loss_on_real_text(minilm_run):
    evals = [e for e in minilm_run.log_history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [0, 8]
    for e in evals:
        assert e["eval_perplexity"] == pytest.approx(math.exp(e["eval_loss"]), rel=1e-9)
        assert 0.0 <= e["eval_accuracy"] <= 1.0
    # The head starts random: ~ln(vocab) = 10.3 nats; a few updates on real text must cut that clearly.
    assert evals[0]["eval_loss"] > 9.5
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 1.0
    train = _train_entries(minilm_run.log_history)
    assert train[-1]["loss"] < train[0]["loss"]
    final = json.loads((Path(minilm_run.output_dir) / "all_results.json").read_text())
    assert final["eval_perplexity"] == pytest.approx(math.exp(final["eval_loss"]), rel=1e-9)
    assert minilm_run.best_metric is None or minilm_run.best_metric == pytest.approx(final["eval_loss"])


def test_exported_model_works_in_a_fill_mask_pipeline(minilm_run):
    import csv

    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline, set_seed

    from scaletune.assets import dataset_files

    out = minilm_run.output_dir
    _, loading = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not loading["missing_keys"], loading  # the learned head (and its tied bias) was exported
    with open(dataset_files("packaged:bbc_news")["validation"], newline="") as f:
        texts = [r["text"].lower() for r in csv.DictReader(f)]
    sentences = [t[:300].replace(" the ", " [MASK] ", 1) for t in texts if " the " in t[:300]][:10]

    tuned = pipeline("fill-mask", model=out, device=-1)
    results = tuned(sentences, top_k=5)
    assert len(results) == len(sentences)
    for top in results:
        assert len(top) == 5 and all(r["token_str"] and 0 <= r["score"] <= 1 for r in top)
        assert [r["score"] for r in top] == sorted((r["score"] for r in top), reverse=True)

    # The starting point: the same MiniLM with the head initialised as the run initialised it.
    set_seed(42)
    start = pipeline("fill-mask", model=AutoModelForMaskedLM.from_pretrained(model_path(MINILM)),
                     tokenizer=AutoTokenizer.from_pretrained(model_path(MINILM)), device=-1)

    def p_the(pipe):
        return float(np.mean([r[0]["score"] for r in pipe(sentences, targets=["the"])]))

    assert p_the(tuned) > 10 * p_the(start)


def _line_files(folder: Path) -> dict:
    """Eight training lines, one long and seven short, so any split into micro-batches of two has uneven
    masked-token counts; nine validation lines (an odd count: the 2-rank gather drops a duplicate)."""
    reviews = sorted(set(rotten_texts(400)), key=lambda t: (len(t.split()), t))
    short, long = reviews[10:17], [r for r in reviews if len(r.split()) >= 40][0]
    train = short[:3] + [long] + short[3:]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text("\n".join(train) + "\n")
    (folder / "validation.txt").write_text("\n".join(reviews[100:400:33][:9]) + "\n")
    return {"train_file": str(folder / "train.txt"), "validation_file": str(folder / "validation.txt"),
            "lines": train}


@pytest.fixture(scope="module")
def mechanics(tmp_path_factory):
    from support.tiny import make_tiny_bert

    root = tmp_path_factory.mktemp("mlm_mechanics")
    model = make_tiny_bert(root / "tiny_mlm", mlm=True, dropout=0.0)  # no dropout: forward passes comparable
    files = _line_files(root / "data")
    base = {**RUN_QUIET, "task": "mlm", "model_name_or_path": str(model), "train_file": files["train_file"],
            "validation_file": files["validation_file"], "line_by_line": True, "max_seq_length": 64,
            "max_steps": 2, "logging_steps": 1, "eval_strategy": "steps", "eval_steps": 1, "do_predict": False,
            "learning_rate": 1e-2, "lr_scheduler_type": "constant", "per_device_eval_batch_size": 4}
    return {"root": root, "model": model, "files": files, "base": base}


@pytest.fixture(scope="module")
def reference_1x8(mechanics):
    from scaletune.train import run

    return run({**mechanics["base"], "per_device_train_batch_size": 8,
                "output_dir": str(mechanics["root"] / "ref_1x8")})


def _assert_same_training(result_logs, reference, other_dir, init_dir):
    ref_train, other_train = _train_entries(reference.log_history), _train_entries(result_logs)
    assert [e["step"] for e in other_train] == [e["step"] for e in ref_train] == [1, 2]
    for a, b in zip(other_train, ref_train):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    ref_w, other_w, init_w = _weights(reference.output_dir), _weights(other_dir), _weights(init_dir)
    moved = max((ref_w[k] - init_w[k]).abs().max().item() for k in ref_w if k in init_w)
    assert moved > 1e-3  # the updates did something, so equality below is not vacuous
    for k in ref_w:
        # Adam divides by sqrt(v): where gradients are ~0, float summation-order noise shows at ~1e-6.
        torch.testing.assert_close(other_w[k], ref_w[k], rtol=1e-5, atol=1e-5)


def test_accumulation_4x2_equals_1x8_with_uneven_masked_counts(mechanics, reference_1x8, tokenizer):
    from scaletune.train import run

    # Masked counts per example are fixed by content (seed, epoch), whatever the batching: check they are
    # uneven enough that every pairing into micro-batches of two differs (one example > a quarter of all).
    lines = mechanics["files"]["lines"]
    for epoch in (0, 1):
        col = mlm_collator(tokenizer, seed=42)
        col.set_epoch(epoch)
        counts = [(col([e])["labels"] != -100).sum().item() for e in line_examples(tokenizer, lines)]
        assert max(counts) > sum(counts) / 4, counts

    out = mechanics["root"] / "acc_4x2"
    result = run({**mechanics["base"], "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4,
                  "output_dir": str(out)})
    _assert_same_training(result.log_history, reference_1x8, out, mechanics["model"])
    assert result.metrics["eval_loss"] == pytest.approx(reference_1x8.metrics["eval_loss"], rel=1e-5)


def test_fsdp2_run_matches_one_process_and_exports_the_tied_head(mechanics, reference_1x8):
    """2 ranks x 4 = one batch of 8: each rank masks its own examples and the loss is normalised over the masked
    tokens of both ranks, so the training and the evaluation are the one-process run's. (The only 2-process
    masked-LM run: DDP's would check the same data-parallel path, which is the Stepper's on every backend.)
    BERT's MLM head holds its output bias under two names (`cls.predictions.bias` is the decoder's bias); FSDP2
    shards it once, under the decoder's name, and the export still loads as a plain BertForMaskedLM."""
    import sys

    from transformers import AutoModelForMaskedLM

    from support.tiny import REPO, run_cli

    out = mechanics["root"] / "fsdp2_2x4"
    args = []
    for k, v in {**mechanics["base"], "per_device_train_batch_size": 4, "save_strategy": "steps", "save_steps": 1,
                 "load_best_model_at_end": True, "output_dir": str(out)}.items():
        args += [f"--{k}", str(v)]
    proc = run_cli([str(REPO / "launch"), "fsdp2", "--cpu", "2", *args], cwd=mechanics["root"], timeout=300,
                   env={"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert "FSDP2: cls.predictions.bias is kept under the output layer's name only" in proc.stdout
    state = json.loads((out / "trainer_state.json").read_text())
    assert list((out / "checkpoint-2" / "pytorch_model_fsdp_0").glob("*.distcp"))  # really sharded by FSDP
    ref_train, fsdp_train = _train_entries(reference_1x8.log_history), _train_entries(state["log_history"])
    assert [e["step"] for e in fsdp_train] == [1, 2]
    for a, b in zip(fsdp_train, ref_train):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        # The norm is summed shard by shard, then across ranks: another float order over a 30,522-row gradient.
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    final = json.loads((out / "all_results.json").read_text())
    assert final["eval_loss"] == pytest.approx(state["best_metric"], rel=1e-6)  # the best weights reloaded
    # Evaluation masks depend only on content, so the distributed evaluation equals the single-process one.
    assert final["eval_loss"] == pytest.approx(reference_1x8.metrics["eval_loss"], rel=1e-5)
    assert final["eval_accuracy"] == pytest.approx(reference_1x8.metrics["eval_accuracy"])
    assert final["eval_perplexity"] == pytest.approx(math.exp(final["eval_loss"]), rel=1e-9)
    exported, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    head = exported.cls.predictions
    assert head.bias is head.decoder.bias and head.decoder.weight is exported.bert.embeddings.word_embeddings.weight
    # The loss falls, so the best is the last step: the export holds the one-process run's final weights.
    assert state["best_global_step"] == 2
    reference = AutoModelForMaskedLM.from_pretrained(reference_1x8.output_dir).state_dict()
    moved = (head.bias - AutoModelForMaskedLM.from_pretrained(mechanics["model"]).cls.predictions.bias).abs()
    assert moved.max() > 1e-3  # the shared bias was trained, not left at its initial value
    for k, v in exported.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=1e-5, atol=1e-5)


def test_streaming_run_restarts_the_stream_until_max_steps(mechanics, tmp_path):
    from scaletune.train import run

    result = run({**mechanics["base"], "streaming": True, "per_device_train_batch_size": 4, "max_steps": 5,
                  "eval_steps": 5, "do_predict": True, "test_file": mechanics["files"]["validation_file"],
                  "output_dir": str(tmp_path / "stream")})
    assert result.global_step == 5 and result.stop_reason == "max_steps"
    # MLM's test split gives metrics, not a predictions file (as run_mlm.py); none is claimed.
    assert "test_loss" in result.metrics and result.predictions_file is None
    assert not (tmp_path / "stream" / "predictions.csv").exists()
    assert {e["epoch"] for e in _train_entries(result.log_history)} == {0.0, 1.0, 2.0}  # 2 batches per pass
    assert result.metrics["eval_perplexity"] == pytest.approx(math.exp(result.metrics["eval_loss"]), rel=1e-9)


def test_resume_mid_epoch_matches_uninterrupted_and_best_model_reloads(mechanics, tmp_path):
    import shutil

    from scaletune.train import run

    cfg = {**mechanics["base"], "per_device_train_batch_size": 4, "max_steps": 4, "save_strategy": "steps",
           "save_steps": 1, "load_best_model_at_end": True}  # 2 batches per epoch: step 3 is mid-epoch 1
    full = run({**cfg, "output_dir": str(tmp_path / "full")})
    # The tied decoder (stored once by safetensors) must not stop the best checkpoint from reloading.
    assert full.best_model_checkpoint and full.metrics["eval_loss"] == pytest.approx(full.best_metric, rel=1e-6)

    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed = run({**cfg, "output_dir": str(tmp_path / "resumed"), "resume_from_checkpoint": "latest"})
    ref = {e["step"]: e for e in _train_entries(full.log_history)}
    for e in _train_entries(resumed.log_history):
        if e["step"] == 4:  # masks of the resumed step come from (seed, epoch, tokens): identical
            assert e["loss"] == pytest.approx(ref[4]["loss"], rel=1e-5)
            assert e["grad_norm"] == pytest.approx(ref[4]["grad_norm"], rel=1e-5)
    assert 4 in {e["step"] for e in _train_entries(resumed.log_history)}
