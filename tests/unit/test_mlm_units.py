"""Masked-LM task (`task: mlm`, as run_mlm.py): grouping, masking, embeddings, metrics.

Uses the real MiniLM tokenizer and real packaged text; the end-to-end runs are in tests/e2e/test_mlm_runs.py.
"""

from __future__ import annotations

import contextlib
import math
from itertools import chain

import numpy as np
import pytest
import torch

from scaletune.config import ConfigError, load_config
from scaletune.errors import DataError
from scaletune.tasks import get_task
from scaletune.tasks.mlm import GROUP_BATCH_SIZE, MaskedLMTask, masked_token_accuracy
from scaletune.tasks.text import (embedding_resize_target, find_text_column, group_texts, perplexity,
                                  resize_token_embeddings, resolve_max_seq_length)
from support.mlm import MINILM, line_examples, minilm_tokenizer, mlm_collator, rotten_texts


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer()


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
    texts = rotten_texts(2500)
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
    prepared, _ = _prepare(tokenizer, rotten_texts(400), max_seq_length=32, max_train_samples=7)
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
    with pytest.raises(DataError, match="fewer than max_seq_length=512.*line_by_line"):
        _prepare(tokenizer, ["just a few words"], max_seq_length=512)


# --------------------------------------------------------------------------- masking


@pytest.mark.parametrize("probability", [0.15, 0.4])
def test_masking_rate_follows_mlm_probability_and_never_touches_special_tokens(tokenizer, probability):
    examples = line_examples(tokenizer, rotten_texts(600))  # ~15k maskable tokens, padded lines
    batch = mlm_collator(tokenizer, mlm_probability=probability)(examples)
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
    examples = line_examples(tokenizer, rotten_texts(8))
    col = mlm_collator(tokenizer)
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
    examples = line_examples(tokenizer, rotten_texts(16))
    train = mlm_collator(tokenizer)
    first = train(examples)["labels"]
    assert torch.equal(first, train(examples)["labels"])  # same epoch: reproducible
    train.set_epoch(1)
    assert not torch.equal(first, train(examples)["labels"])  # dynamic masking across epochs
    assert not torch.equal(first, mlm_collator(tokenizer, seed=7)(examples)["labels"])

    cfg = load_config({"task": "mlm", "train_file": "x.txt"})
    ev = MaskedLMTask().collator(tokenizer, cfg, for_training=False)
    assert torch.equal(ev(examples)["labels"], ev(examples)["labels"])
    assert not torch.equal(ev(examples)["labels"], MaskedLMTask().collator(tokenizer, cfg, True)(examples)["labels"])


def test_collator_pads_to_multiple_of(tokenizer):
    cfg = load_config({"task": "mlm", "train_file": "x.txt", "pad_to_multiple_of": 8})
    batch = MaskedLMTask().collator(tokenizer, cfg, True)(line_examples(tokenizer, ["one two three"]))
    assert batch["input_ids"].shape[1] % 8 == 0
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}


def test_collator_survives_pickling_for_dataloader_workers(tokenizer):
    import pickle

    col = mlm_collator(tokenizer)
    examples = line_examples(tokenizer, rotten_texts(4))
    before = col(examples)["labels"]
    assert torch.equal(pickle.loads(pickle.dumps(col))(examples)["labels"], before)


# --------------------------------------------------------------------------- model, metrics


def test_embedding_resize_decision():
    assert embedding_resize_target(30524, 30522) == 30524
    assert embedding_resize_target(30522, 30522) is None
    assert embedding_resize_target(100, 30522) is None  # never shrink (run_mlm.py only grows)


def test_build_model_resizes_embeddings_for_added_tokens(tmp_path):
    from transformers import AutoTokenizer

    from support.tiny import make_tiny_bert

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
    # (default_metric_for_best_model was dead code, removed; loss is the default metric of every task.)
    assert isinstance(task, MaskedLMTask) and "loss" in task.metric_names
    logits = torch.randn(2, 5, 11)
    assert torch.equal(task.preprocess_logits(logits, None), logits.argmax(-1))


def test_loop_hands_the_epoch_to_the_collator(tokenizer):
    # Dynamic masking needs the epoch; the loop passes it through the prepared dataloader's collate_fn.
    from accelerate import Accelerator

    from scaletune import data
    from scaletune.state import TrainingState
    from scaletune.stepper import TrainData
    from scaletune.throughput import ThroughputMeter

    prepared, cfg = _prepare(tokenizer, rotten_texts(50), max_seq_length=32)
    col = MaskedLMTask().collator(tokenizer, cfg, for_training=True)
    accelerator = Accelerator(cpu=True)
    dl = accelerator.prepare(data.build_dataloader(prepared.train, col, 4, True, cfg.training))
    state = TrainingState()
    state.epochs_completed = 3
    train_data = TrainData(dl, accelerator, 1, ThroughputMeter(torch.nn.Linear(2, 2), accelerator))
    next(train_data.epoch_batches(state))
    assert col.epoch == 3


@pytest.mark.parametrize("recipe", ["mlm_demo", "mlm_cola"])
def test_recipes_are_valid_mlm_configs(recipe):
    cfg = load_config(recipe)
    assert cfg.data.task == "mlm" and cfg.data.max_seq_length and cfg.training.load_best_model_at_end
    assert cfg.training.metric_for_best_model == "loss"  # best model by eval_loss
