"""scaletune.fingerprint: datasets' fingerprint of a tokenizing map, without the tokenizer's Python vocabulary copy.

What must hold for the map cache to stay right: the same tokenizer loaded twice (another run, another rank) gives
the same fingerprint, so the cache is reused; any change to how it tokenizes gives another one, so it is not."""

from __future__ import annotations

import pytest
from datasets import Dataset
from datasets.fingerprint import Hasher
from transformers import AutoTokenizer

from scaletune.fingerprint import hash_by_backend


def _load(path):
    tokenizer = AutoTokenizer.from_pretrained(path)
    hash_by_backend(tokenizer)
    return tokenizer


def _map_fingerprint(tokenizer) -> str:
    rows = Dataset.from_dict({"text": ["a good film", "a bad one"]})
    return rows.map(lambda b: tokenizer(b["text"], truncation=True, max_length=8), batched=True)._fingerprint


def test_the_same_tokenizer_loaded_twice_has_one_fingerprint(tiny_bert):
    one, two = _load(tiny_bert), _load(tiny_bert)
    assert one._tokenizer is not None and len(one.__dict__["_vocab"]) > 30_000  # the copy that is left out
    assert Hasher.hash(one) == Hasher.hash(two)
    assert _map_fingerprint(one) == _map_fingerprint(two)


def test_the_python_vocabulary_copy_is_not_hashed_but_the_backend_is(tiny_bert):
    tokenizer = _load(tiny_bert)
    before = Hasher.hash(tokenizer)
    tokenizer.__dict__["_vocab"] = {"only": 0}  # tokenizing never reads it
    assert Hasher.hash(tokenizer) == before
    tokenizer.add_tokens(["scaletunish"])  # the backend's vocabulary: tokenizing changes
    assert Hasher.hash(tokenizer) != before


@pytest.mark.parametrize("change", [{"padding_side": "left"}, {"model_max_length": 7}, {"truncation_side": "left"}])
def test_a_python_side_setting_still_changes_the_fingerprint(tiny_bert, change):
    base, changed = _load(tiny_bert), _load(tiny_bert)
    for key, value in change.items():
        setattr(changed, key, value)
    assert Hasher.hash(changed) != Hasher.hash(base)
    assert _map_fingerprint(changed) != _map_fingerprint(base)


def test_hashing_leaves_the_tokenizer_as_it_was(tiny_bert):
    tokenizer = _load(tiny_bert)
    tokenizer._tokenizer.enable_truncation(max_length=5)
    Hasher.hash(tokenizer)
    assert tokenizer._tokenizer.truncation["max_length"] == 5  # datasets' reducer restores what it toggles
    assert "_vocab" in tokenizer.__dict__  # the tokenizer itself is not changed
