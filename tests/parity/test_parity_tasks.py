"""Per-step loss parity with `transformers.Trainer` for token classification and causal LM.

The Trainer side is what a `run_ner.py` / `run_clm.py` user writes: read the same files, tokenize (words aligned to
sub-words with the first sub-word labelled; texts concatenated and cut into blocks with labels = input ids),
`DataCollatorForTokenClassification` / `default_data_collator`, the `Auto*` model, `Trainer`. Same model folder,
same seed, one process, fp32, no accumulation, no dropout. Trainer counts a causal LM's items on the shifted labels
(`labels[..., 1:]`), as scaletune's ShiftedCrossEntropy does, so the curves agree to float rounding.
"""

from __future__ import annotations

import pytest

from scaletune.conll_format import read_conll
from scaletune.train import run
from support.ner_clm import make_tiny_llama, make_tiny_token_bert, ner_files, rotten_lines
from support.parity import rel, trainer_args

pytestmark = pytest.mark.slow  # every test here launches a training run or a process

TOL = 1e-5
JOB = dict(per_device_train_batch_size=8, seed=11, learning_rate=5e-3, weight_decay=0.01, warmup_steps=2,
           max_grad_norm=1.0, lr_scheduler_type="linear", logging_steps=1, save_strategy="no")


def train_logs(history):
    return [h for h in history if "loss" in h and "eval_loss" not in h and "train_loss" not in h]


def assert_same_curve(ours, theirs, steps: int):
    a, b = train_logs(ours), train_logs(theirs)
    assert [h["step"] for h in a] == [h["step"] for h in b] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        assert rel(x["loss"], y["loss"]) <= TOL, (x["step"], x["loss"], y["loss"])
        assert rel(x["grad_norm"], y["grad_norm"]) <= TOL, (x["step"], x["grad_norm"], y["grad_norm"])
    first, last = [h["loss"] for h in a[:3]], [h["loss"] for h in a[-3:]]
    assert sum(last) < sum(first)  # the curve moves: the comparison is not of a flat line


def test_token_classification_loss_curve_matches_trainer(tmp_path):
    import datasets
    from transformers import (AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification,
                              Trainer)

    model_dir = make_tiny_token_bert(tmp_path / "model", dropout=0.0)
    files = ner_files(tmp_path / "data", n_train=40)  # 5 batches per epoch, the last one of 8
    ours = run({"task": "token_classification", "model_name_or_path": model_dir, "train_file": files["train_file"],
                "validation_file": files["validation_file"], "do_eval": False, "do_predict": False,
                "num_train_epochs": 3, "max_seq_length": 64, "output_dir": str(tmp_path / "ours"),
                "disable_tqdm": True, "report_to": "none", **JOB})

    # The run_ner.py user: sorted tag names, first sub-word labelled, the rest -100.
    tok = AutoTokenizer.from_pretrained(model_dir)
    words, tags = read_conll(files["train_file"])
    names = sorted({t for s in tags for t in s})

    def encode(batch):
        enc = tok(batch["tokens"], is_split_into_words=True, truncation=True, max_length=64)
        enc["labels"] = []
        for i, sentence_tags in enumerate(batch["ner_tags"]):
            previous, labels = None, []
            for w in enc.word_ids(batch_index=i):
                labels.append(-100 if w is None or w == previous else names.index(sentence_tags[w]))
                previous = w
            enc["labels"].append(labels)
        return enc

    train = datasets.Dataset.from_dict({"tokens": words, "ner_tags": tags}).map(
        encode, batched=True, remove_columns=["tokens", "ner_tags"])
    trainer = Trainer(model=AutoModelForTokenClassification.from_pretrained(model_dir),
                      args=trainer_args(tmp_path / "trainer", num_train_epochs=3, **JOB), train_dataset=train,
                      data_collator=DataCollatorForTokenClassification(tok), processing_class=tok)
    trainer.train()
    assert_same_curve(ours.log_history, trainer.state.log_history, 15)


def test_causal_lm_loss_curve_matches_trainer(tmp_path):
    from itertools import chain

    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, default_data_collator

    model_dir = make_tiny_llama(tmp_path / "model")
    files = rotten_lines(tmp_path / "data", n_train=100, n_validation=10, n_test=2)
    ours = run({"task": "clm", "model_name_or_path": model_dir, "train_file": files["train_file"],
                "validation_file": files["validation_file"], "do_eval": False, "do_predict": False,
                "block_size": 32, "max_steps": 12, "output_dir": str(tmp_path / "ours"), "disable_tqdm": True,
                "report_to": "none", **JOB})

    # The run_clm.py user: tokenize, concatenate, cut into blocks of 32 (remainder dropped), labels = input ids.
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [t for t in open(files["train_file"]).read().splitlines() if t.strip()]

    def group(batch):
        ids = list(chain.from_iterable(batch["input_ids"]))
        total = len(ids) // 32 * 32
        blocks = [ids[i: i + 32] for i in range(0, total, 32)]
        return {"input_ids": blocks, "attention_mask": [[1] * 32 for _ in blocks], "labels": [b[:] for b in blocks]}

    tokenized = datasets.Dataset.from_dict({"text": texts}).map(
        lambda b: tok(b["text"], return_token_type_ids=False), batched=True, remove_columns=["text"])
    train = tokenized.map(group, batched=True, batch_size=1000, remove_columns=tokenized.column_names)
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(model_dir),
                      args=trainer_args(tmp_path / "trainer", max_steps=12, **JOB), train_dataset=train,
                      data_collator=default_data_collator, processing_class=tok)
    trainer.train()
    assert len(train) * 3 > 12 * 8 > len(train)  # more than one epoch: the epoch boundary is crossed
    assert_same_curve(ours.log_history, trainer.state.log_history, 12)
