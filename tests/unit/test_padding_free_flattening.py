"""`padding_free` for the per-token encoder tasks (mlm, token_classification): a padded batch flattened into one
row of its real tokens, MLM's masks unchanged by it, the attention check on encoders, and the refusal for the
sequence-level tasks. Real MiniLM tokenizer, real review text, tiny real BERT/DistilBERT/RoBERTa models; the
training runs are in tests/e2e/test_padding_free_encoders.py."""

from __future__ import annotations

import pytest
import torch

from scaletune.config import ConfigError, load_config
from scaletune.tasks.mlm import LABEL_POSITIONS
from scaletune.tasks.packing import FlattenedPadding, check_packed_attention, flatten_padded
from support.mlm import line_examples, minilm_tokenizer, mlm_collator, rotten_texts


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer()


def real_tokens(padded: dict, key: str, row: int) -> list:
    """One row's values at its real tokens (attention_mask 1), whichever side the padding is on."""
    return padded[key][row][padded["attention_mask"][row].bool()].tolist()


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_padded_batch_flattens_to_its_real_tokens_with_positions_restarting(side):
    lengths = [3, 5, 2]
    width = 6
    ids, labels, types, mask = (torch.zeros(3, width, dtype=torch.long) for _ in range(4))
    labels -= 100
    for row, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[row, cols] = torch.arange(n) + 10 * (row + 1)
        labels[row, cols] = torch.arange(n) + 100 * (row + 1)
        labels[row, cols.start] = -100  # an unlabelled real token stays unlabelled
        types[row, cols] = row % 2
        mask[row, cols] = 1
    flat = flatten_padded({"input_ids": ids, "labels": labels, "token_type_ids": types, "attention_mask": mask})
    assert set(flat) == {"input_ids", "labels", "token_type_ids", "position_ids"}  # no attention_mask
    assert flat["input_ids"].tolist() == [[10, 11, 12, 20, 21, 22, 23, 24, 30, 31]]
    assert flat["labels"].tolist() == [[-100, 101, 102, -100, 201, 202, 203, 204, -100, 301]]
    assert flat["token_type_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1, 0, 0]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]


def test_a_batch_without_mask_is_all_real_and_a_pooled_label_is_refused():
    ids = torch.arange(8).view(2, 4)
    flat = flatten_padded({"input_ids": ids, "labels": ids + 1})
    assert flat["input_ids"].tolist() == [list(range(8))] and flat["position_ids"].tolist() == [[0, 1, 2, 3] * 2]
    with pytest.raises(ConfigError, match=r"padding_free=true .* 'labels' is not one value per token .*"
                                          r"set padding_free=false"):
        flatten_padded({"input_ids": ids, "labels": torch.tensor([0, 1])})


@pytest.mark.parametrize("side", ["right", "left"])
def test_token_classification_flattens_its_own_padded_batch(side):
    """The task's training collator is DataCollatorForTokenClassification's batch (labels padded with -100),
    flattened: per example its sub-words and their tags in place; evaluation's stays padded."""
    from scaletune.tasks import get_task

    tok = minilm_tokenizer()
    tok.padding_side = side
    words = [t.split() for t in rotten_texts(6)]
    enc = tok(words, is_split_into_words=True, truncation=True, max_length=40)
    examples = [{"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i],
                 "attention_mask": enc["attention_mask"][i],
                 "labels": [-100 if w is None else w % 3 for w in enc.word_ids(i)]} for i in range(len(words))]
    task = get_task("token_classification")
    cfg = load_config({"task": "token_classification", "train_file": "x.txt", "padding_free": True})
    train, evaluate = task.collator(tok, cfg, True), task.collator(tok, cfg, False)
    assert isinstance(train, FlattenedPadding) and not isinstance(evaluate, FlattenedPadding)
    padded, flat = evaluate(examples), train(examples)
    assert padded["input_ids"].shape[1] > min(len(e["input_ids"]) for e in examples)  # there is padding to drop
    for key in ("input_ids", "labels", "token_type_ids"):
        assert flat[key].tolist() == [[v for e in examples for v in e[key]]], key
    assert flat["position_ids"].tolist() == [[p for e in examples for p in range(len(e["input_ids"]))]]
    assert "attention_mask" not in flat


def test_mlm_masks_of_the_flattened_batch_are_the_padded_batchs(tokenizer):
    """Masking happens per example on its own tokens before the flattening: the flattened row holds exactly
    the padded batch's masked inputs and labels, token for token, and the sparse head's label positions are
    those of the row's labels."""
    from scaletune.tasks.mlm import label_positions

    examples = line_examples(tokenizer, rotten_texts(24))
    padded = mlm_collator(tokenizer, label_positions=True)(examples)
    flat = mlm_collator(tokenizer, label_positions=True, flatten=True)(examples)
    assert (padded["labels"] != -100).sum() > 20  # masks to compare
    for key in ("input_ids", "labels", "token_type_ids"):
        assert flat[key].tolist() == [[v for row in range(len(examples)) for v in real_tokens(padded, key, row)]]
    assert flat["position_ids"].tolist() == [[p for e in examples for p in range(len(e["input_ids"]))]]
    assert "attention_mask" not in flat
    assert torch.equal(flat[LABEL_POSITIONS], label_positions(flat["labels"]))
    marked = flat["labels"][0, flat[LABEL_POSITIONS][0]]
    assert (marked != -100).sum() == (flat["labels"] != -100).sum()  # every labelled token is projected


def test_the_mlm_task_flattens_training_batches_only(tokenizer):
    from scaletune.tasks import get_task

    cfg = load_config({"task": "mlm", "train_file": "x.txt", "padding_free": True})
    task = get_task("mlm")
    assert task.collator(tokenizer, cfg, True).flatten and not task.collator(tokenizer, cfg, False).flatten


def test_padding_free_is_for_the_per_token_tasks_and_refused_for_pooled_ones():
    for task in ("mlm", "token_classification", "clm"):
        assert load_config({"task": task, "train_file": "x.txt", "padding_free": True}).data.padding_free
    for task in ("classification", "regression", "multilabel"):
        with pytest.raises(ConfigError) as refused:
            load_config({"task": task, "train_file": "x.csv", "padding_free": True})
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith(f"padding_free=true is for the per-token tasks (clm, mlm, token_classification); "
                                  f"task {task}'s head pools one vector per example from its padded row")
        assert "set padding_free=false" in message and "group_by_length" in message


def _tiny(config_class, model_class, **kw):
    torch.manual_seed(0)
    return model_class(config_class(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=128, **kw))


def test_the_attention_check_passes_bert_encoders_and_refuses_the_others():
    """BERT builds the per-example block mask from the position ids (transformers' masking_utils, sdpa and
    eager): its packed logits do not depend on the example before. DistilBERT attends over the whole row, and
    RoBERTa numbers positions after its padding id, which the row's 0-based position ids would shift."""
    import transformers as T

    for model_class, impl in ((T.BertForMaskedLM, "sdpa"), (T.BertForTokenClassification, "sdpa"),
                              (T.BertForTokenClassification, "eager")):
        check_packed_attention(_tiny(T.BertConfig, model_class, attn_implementation=impl))
    torch.manual_seed(0)
    distil = T.DistilBertForTokenClassification(T.DistilBertConfig(vocab_size=1000, dim=32, n_layers=2, n_heads=2,
                                                                   hidden_dim=64))
    with pytest.raises(ConfigError, match=r"^padding_free=true: distilbert with sdpa attention attends across the "
                                          r"examples packed in one row .*; set padding_free=false\.$"):
        check_packed_attention(distil)
    with pytest.raises(ConfigError, match=r"^padding_free=true: roberta does not number positions from 0 .*"
                                          r"set padding_free=false\.$"):
        check_packed_attention(_tiny(T.RobertaConfig, T.RobertaForMaskedLM))
    bert = _tiny(T.BertConfig, T.BertForMaskedLM)
    bert.config._attn_implementation = "flash_attention_2"  # not checkable on the CPU: refused, not trusted
    with pytest.raises(ConfigError, match="bert with flash_attention_2 attention is an encoder.*attn_implementation="
                                          "sdpa"):
        check_packed_attention(bert)


def test_the_dropin_path_without_a_tokenizer_flattens_the_given_tensors():
    from transformers import default_data_collator

    from scaletune.dropin import default_collator
    from scaletune.tasks import get_task

    cfg = load_config({"task": "token_classification", "train_file": "x.txt", "padding_free": True})
    task = get_task("token_classification")
    collator = default_collator(None, task, cfg, True)
    assert isinstance(collator, FlattenedPadding) and collator.padded is default_data_collator
    assert default_collator(None, task, cfg, False) is default_data_collator
    rows = [{"input_ids": [5, 6, 0], "attention_mask": [1, 1, 0], "labels": [1, 2, -100]},
            {"input_ids": [7, 8, 9], "attention_mask": [1, 1, 1], "labels": [3, 4, 5]}]
    flat = collator(rows)
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9]] and flat["position_ids"].tolist() == [[0, 1, 0, 1, 2]]
