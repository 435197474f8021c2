"""Masked-LM task (`task: mlm`, as run_mlm.py): grouping, masking, embeddings, metrics, and end-to-end runs.

Unit tests use the real MiniLM tokenizer and real packaged text; end-to-end tests go through
`scaletune.train.run` / `accelerate launch` with the real pretrained MiniLM where the test is about
learning, and a tiny BERT where it is about mechanics (accumulation, distribution).
"""

from __future__ import annotations

import contextlib
import json
import math
from itertools import chain
from pathlib import Path

import numpy as np
import pytest
import torch

from scaletune.assets import model_path
from scaletune.config import ConfigError, load_config
from scaletune.tasks import get_task
from scaletune.tasks.mlm import (
    GROUP_BATCH_SIZE,
    ContentSeededMLMCollator,
    MaskedLMTask,
    embedding_resize_target,
    find_text_column,
    group_texts,
    masked_token_accuracy,
    perplexity,
    resize_token_embeddings,
    resolve_max_seq_length,
)

MINILM = "packaged:minilm"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path(MINILM))


def _rotten_texts(n: int) -> list[str]:
    """Real short texts (movie reviews) from the packaged Rotten Tomatoes corpus."""
    import csv

    from scaletune.assets import dataset_files

    with open(dataset_files("packaged:rotten_tomatoes")["train"], newline="") as f:
        return [r["text"] for _, r in zip(range(n), csv.DictReader(f))]


def _prepare(tokenizer, texts: list[str], **cfg_kw):
    import datasets

    cfg = load_config({"task": "mlm", "train_file": "unused.txt", "model_name_or_path": MINILM, **cfg_kw})
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})})
    return MaskedLMTask().prepare_data(raw, tokenizer, cfg, contextlib.nullcontext), cfg


# --------------------------------------------------------------------------- grouping


def test_group_texts_keeps_every_token_but_the_remainder():
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(0, 1000, size=rng.integers(1, 40))) for _ in range(50)]
    total = sum(map(len, seqs))
    out = group_texts({"input_ids": seqs, "attention_mask": [[1] * len(s) for s in seqs]}, block_size=16)
    assert len(out["input_ids"]) == total // 16
    assert all(len(b) == 16 for b in out["input_ids"])
    # Blocks are the token stream, in order, minus the tail that does not fill a block.
    assert list(chain.from_iterable(out["input_ids"])) == list(chain.from_iterable(seqs))[: (total // 16) * 16]
    assert len(out["attention_mask"]) == len(out["input_ids"])


def test_group_texts_shorter_than_one_block_gives_nothing():
    assert group_texts({"input_ids": [[1, 2, 3]]}, block_size=4) == {"input_ids": []}


def test_prepare_groups_real_text_into_blocks_with_per_batch_remainder(tokenizer):
    # 2500 texts = three map batches of <= 1000 texts; run_mlm.py drops one remainder per batch.
    texts = _rotten_texts(2500)
    prepared, _ = _prepare(tokenizer, texts, max_seq_length=64)
    streams = [tokenizer(texts[i: i + GROUP_BATCH_SIZE])["input_ids"] for i in range(0, len(texts), GROUP_BATCH_SIZE)]
    expected_blocks = sum(sum(map(len, s)) // 64 for s in streams)
    kept = list(chain.from_iterable(list(chain.from_iterable(s))[: (sum(map(len, s)) // 64) * 64] for s in streams))

    train = prepared.train
    assert len(train) == expected_blocks == prepared.info["train_examples"]
    assert set(map(len, train["input_ids"])) == {64}
    assert list(chain.from_iterable(train["input_ids"])) == kept
    # The special-token mask travels with the tokens, so the collator never masks a mid-block [CLS]/[SEP].
    special = np.array(train["special_tokens_mask"]).reshape(-1).astype(bool)
    ids = np.array(train["input_ids"]).reshape(-1)
    assert set(ids[special]) == {tokenizer.cls_token_id, tokenizer.sep_token_id}


def test_prepare_line_by_line_drops_blank_lines_and_truncates(tokenizer):
    texts = ["a short line", "", "   ", "word " * 300, "another line"]
    prepared, _ = _prepare(tokenizer, texts, line_by_line=True, max_seq_length=32)
    lengths = list(map(len, prepared.train["input_ids"]))
    assert len(lengths) == 3
    assert max(lengths) == 32 and lengths[0] == len(tokenizer("a short line")["input_ids"])


def test_max_train_samples_counts_blocks(tokenizer):
    prepared, _ = _prepare(tokenizer, _rotten_texts(400), max_seq_length=32, max_train_samples=7)
    assert len(prepared.train) == 7


def test_block_size_defaults_and_caps():
    assert resolve_max_seq_length(None, 512, 512) == 512
    assert resolve_max_seq_length(None, int(1e30), None) == 1024  # run_mlm.py's cap for "no limit" tokenizers
    assert resolve_max_seq_length(2048, 4096, 514) == 514  # never beyond the position table
    assert resolve_max_seq_length(64, 512, 512) == 64
    with pytest.raises(ConfigError, match="max_seq_length"):
        resolve_max_seq_length(0, 512)


def test_text_column_choice_and_error():
    assert find_text_column(["id", "text", "label"], None) == "text"
    assert find_text_column(["idx", "sentence", "label"], None, ["sentence"]) == "sentence"  # first string column
    assert find_text_column(["idx", "sentence"], None, None) == "idx"  # types unknown: run_mlm.py's first column
    with pytest.raises(ConfigError, match="No text column.*text_column_name"):
        find_text_column(["idx", "label"], None, [])
    assert find_text_column(["idx", "sentence", "label"], "sentence") == "sentence"
    with pytest.raises(ConfigError, match="text_column_name='body'.*idx, sentence"):
        find_text_column(["idx", "sentence"], "body")


def test_too_little_text_for_one_block_is_a_clear_error(tokenizer):
    with pytest.raises(ConfigError, match="fewer than max_seq_length=512.*line_by_line"):
        _prepare(tokenizer, ["just a few words"], max_seq_length=512)


# --------------------------------------------------------------------------- masking


def _collator(tokenizer, **kw):
    return ContentSeededMLMCollator(tokenizer=tokenizer, mlm_probability=kw.pop("mlm_probability", 0.15),
                                    seed=kw.pop("seed", 42), **kw)


def _line_examples(tokenizer, texts):
    enc = tokenizer(texts, truncation=True, max_length=64, return_special_tokens_mask=True)
    return [{k: enc[k][i] for k in enc} for i in range(len(texts))]


@pytest.mark.parametrize("probability", [0.15, 0.4])
def test_masking_rate_follows_mlm_probability_and_never_touches_special_tokens(tokenizer, probability):
    examples = _line_examples(tokenizer, _rotten_texts(600))  # ~15k maskable tokens, padded lines
    batch = _collator(tokenizer, mlm_probability=probability)(examples)
    original = tokenizer.pad(examples, return_tensors="pt")
    special = original["special_tokens_mask"].bool()
    masked = batch["labels"] != -100

    assert (special & masked).sum() == 0
    specials_seen = set(original["input_ids"][special].tolist())
    assert {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id} <= specials_seen
    assert torch.equal(batch["input_ids"][special], original["input_ids"][special])  # [CLS]/[SEP]/[PAD] intact

    rate = masked.sum().item() / (~special).sum().item()
    n = (~special).sum().item()
    assert abs(rate - probability) < 4 * math.sqrt(probability * (1 - probability) / n)
    # Labels hold the original token at masked positions; 80% of those become [MASK] (BERT's 80/10/10).
    assert torch.equal(batch["labels"][masked], original["input_ids"][masked])
    share_mask = (batch["input_ids"][masked] == tokenizer.mask_token_id).float().mean().item()
    assert abs(share_mask - 0.8) < 0.03
    assert torch.equal(batch["attention_mask"], original["attention_mask"])


def test_masking_of_an_example_does_not_depend_on_its_batch(tokenizer):
    # Accumulation and sharding regroup examples; their masks must not change with it.
    examples = _line_examples(tokenizer, _rotten_texts(8))
    col = _collator(tokenizer)
    whole = col(examples)
    for i in range(0, 8, 2):
        part = col(examples[i: i + 2])
        width = part["input_ids"].shape[1]  # padded to this pair's longest, not the batch's
        assert torch.equal(part["labels"], whole["labels"][i: i + 2, :width])
        assert torch.equal(part["input_ids"], whole["input_ids"][i: i + 2, :width])
    # Uneven masked counts per micro-batch: the case where per-micro-batch loss averaging goes wrong.
    counts = [(col(examples[i: i + 2])["labels"] != -100).sum().item() for i in range(0, 8, 2)]
    assert len(set(counts)) > 1


def test_masks_change_with_epoch_and_seed_but_evaluation_masks_are_fixed(tokenizer):
    examples = _line_examples(tokenizer, _rotten_texts(16))
    train = _collator(tokenizer)
    first = train(examples)["labels"]
    assert torch.equal(first, train(examples)["labels"])  # same epoch: reproducible
    train.set_epoch(1)
    assert not torch.equal(first, train(examples)["labels"])  # dynamic masking across epochs
    assert not torch.equal(first, _collator(tokenizer, seed=7)(examples)["labels"])

    cfg = load_config({"task": "mlm", "train_file": "x.txt"})
    ev = MaskedLMTask().collator(tokenizer, cfg, for_training=False)
    assert torch.equal(ev(examples)["labels"], ev(examples)["labels"])
    assert not torch.equal(ev(examples)["labels"], MaskedLMTask().collator(tokenizer, cfg, True)(examples)["labels"])


def test_collator_pads_to_multiple_of(tokenizer):
    cfg = load_config({"task": "mlm", "train_file": "x.txt", "pad_to_multiple_of": 8})
    batch = MaskedLMTask().collator(tokenizer, cfg, True)(_line_examples(tokenizer, ["one two three"]))
    assert batch["input_ids"].shape[1] % 8 == 0
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}


def test_collator_survives_pickling_for_dataloader_workers(tokenizer):
    import pickle

    col = _collator(tokenizer)
    examples = _line_examples(tokenizer, _rotten_texts(4))
    before = col(examples)["labels"]
    assert torch.equal(pickle.loads(pickle.dumps(col))(examples)["labels"], before)


# --------------------------------------------------------------------------- model, metrics


def test_embedding_resize_decision():
    assert embedding_resize_target(30524, 30522) == 30524
    assert embedding_resize_target(30522, 30522) is None
    assert embedding_resize_target(100, 30522) is None  # never shrink (run_mlm.py only grows)


def test_build_model_resizes_embeddings_for_added_tokens(tmp_path):
    from transformers import AutoTokenizer

    from conftest import make_tiny_bert

    path = make_tiny_bert(tmp_path / "tiny", mlm=True)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_tokens(["scaletuneword", "anotherword"])
    cfg = load_config({"task": "mlm", "train_file": "x.txt", "model_name_or_path": str(path)})
    model = MaskedLMTask().build_model(cfg, None, tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == tok.vocab_size + 2
    assert model.get_output_embeddings().weight.shape[0] == len(tok)  # predictions can be the new tokens
    assert resize_token_embeddings(model, len(tok)) is None  # idempotent


def test_masked_token_accuracy_counts_only_masked_positions():
    labels = np.array([[-100, 5, -100, 7], [3, -100, -100, -100]])
    preds = np.array([[9, 5, 9, 1], [3, 9, 9, 9]])
    assert masked_token_accuracy(preds, labels) == pytest.approx(2 / 3)
    assert math.isnan(masked_token_accuracy(preds, np.full_like(labels, -100)))


def test_perplexity_is_exp_loss_and_overflow_safe():
    assert perplexity(2.0) == pytest.approx(math.exp(2.0))
    assert perplexity(1e6) == float("inf")


def test_task_registry_and_logit_reduction():
    task = get_task("mlm")
    assert isinstance(task, MaskedLMTask) and task.default_metric_for_best_model == "loss"
    logits = torch.randn(2, 5, 11)
    assert torch.equal(task.preprocess_logits(logits, None), logits.argmax(-1))


def test_loop_hands_the_epoch_to_the_collator(tokenizer):
    # Dynamic masking needs the epoch; the loop passes it through the prepared dataloader's collate_fn.
    from types import SimpleNamespace

    from accelerate import Accelerator

    from scaletune import data, loop
    from scaletune.state import TrainingState

    prepared, cfg = _prepare(tokenizer, _rotten_texts(50), max_seq_length=32)
    col = MaskedLMTask().collator(tokenizer, cfg, for_training=True)
    dl = Accelerator(cpu=True).prepare(data.build_dataloader(prepared.train, col, 4, True, cfg.training))
    state = TrainingState()
    state.epochs_completed = 3
    next(loop.epoch_batches(SimpleNamespace(train_dataloader=dl, accelerator=None), state))
    assert col.epoch == 3


# --------------------------------------------------------------------------- end to end

RUN_QUIET = {"disable_tqdm": True, "report_to": "none", "save_strategy": "no"}


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


@pytest.mark.slow
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


@pytest.mark.slow
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
    reviews = sorted(set(_rotten_texts(400)), key=lambda t: (len(t.split()), t))
    short, long = reviews[10:17], [r for r in reviews if len(r.split()) >= 40][0]
    train = short[:3] + [long] + short[3:]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text("\n".join(train) + "\n")
    (folder / "validation.txt").write_text("\n".join(reviews[100:400:33][:9]) + "\n")
    return {"train_file": str(folder / "train.txt"), "validation_file": str(folder / "validation.txt"),
            "lines": train}


@pytest.fixture(scope="module")
def mechanics(tmp_path_factory):
    from conftest import make_tiny_bert

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


@pytest.mark.slow
def test_accumulation_4x2_equals_1x8_with_uneven_masked_counts(mechanics, reference_1x8, tokenizer):
    from scaletune.train import run

    # Masked counts per example are fixed by content (seed, epoch), whatever the batching: check they are
    # uneven enough that every pairing into micro-batches of two differs (one example > a quarter of all).
    lines = mechanics["files"]["lines"]
    for epoch in (0, 1):
        col = _collator(tokenizer, seed=42)
        col.set_epoch(epoch)
        counts = [(col([e])["labels"] != -100).sum().item() for e in _line_examples(tokenizer, lines)]
        assert max(counts) > sum(counts) / 4, counts

    out = mechanics["root"] / "acc_4x2"
    result = run({**mechanics["base"], "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4,
                  "output_dir": str(out)})
    _assert_same_training(result.log_history, reference_1x8, out, mechanics["model"])
    assert result.metrics["eval_loss"] == pytest.approx(reference_1x8.metrics["eval_loss"], rel=1e-5)


@pytest.mark.slow
def test_two_process_run_matches_one_process(mechanics, reference_1x8):
    from conftest import accelerate_launch

    out = mechanics["root"] / "ddp_2x4"
    args = []
    for k, v in {**mechanics["base"], "per_device_train_batch_size": 4, "output_dir": str(out)}.items():
        args += [f"--{k}", str(v)]
    accelerate_launch(2, args, timeout=300)

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    # 2 ranks x 4 = one batch of 8: the loss is normalised over masked tokens of both ranks.
    _assert_same_training(state["log_history"], reference_1x8, out, mechanics["model"])
    final = json.loads((out / "all_results.json").read_text())
    # Evaluation masks depend only on content, so the distributed evaluation equals the single-process one.
    assert final["eval_loss"] == pytest.approx(reference_1x8.metrics["eval_loss"], rel=1e-5)
    assert final["eval_accuracy"] == pytest.approx(reference_1x8.metrics["eval_accuracy"])
    assert final["eval_perplexity"] == pytest.approx(math.exp(final["eval_loss"]), rel=1e-9)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.parametrize("recipe", ["mlm_demo", "mlm_cola"])
def test_recipes_are_valid_mlm_configs(recipe):
    cfg = load_config(recipe)
    assert cfg.data.task == "mlm" and cfg.data.max_seq_length and cfg.training.load_best_model_at_end
    assert cfg.training.metric_for_best_model == "loss"  # best model by eval_loss
