"""Token-classification and causal-LM test inputs: tiny real models (random init from a config, the real MiniLM
tokenizer), a small learnable CoNLL corpus, and real text lines from the packaged Rotten Tomatoes reviews.

Tests about fine-tuning use the real pretrained MiniLM / SmolLM2 and real text (packaged:tweet_ner,
packaged:rotten_tomatoes); these tiny models are for the mechanics (distribution, resume, parity, prediction).
"""

from __future__ import annotations

import random
from pathlib import Path

NER_TAGS = ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]
_PEOPLE = [["Anna", "Szczepanski"], ["John"], ["Maria", "Kowalczyk"], ["Wei", "Zhang"], ["Okonkwo"],
           ["Olga", "Wojciechowska"]]
_PLACES = [["Berlin"], ["New", "York"], ["Ouagadougou"], ["Buenos", "Aires"], ["Antananarivo"], ["Kyoto"]]
_FILLER = "the report said that on monday a visitor from met talked about weather in spring near".split()


def conll_sentences(n: int, seed: int = 0) -> list[list[tuple[str, str]]]:
    """`n` sentences of (word, tag): filler words (O) around a person (B-PER I-PER) and a place (B-LOC I-LOC).
    Several names split into MiniLM sub-words ("Szczepanski" -> s ##zcz ##ep ##ans ##ki), so sub-word alignment
    is exercised."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        sentence = [(w, "O") for w in rng.choices(_FILLER, k=rng.randint(1, 4))]
        for words, kind in ((rng.choice(_PEOPLE), "PER"), (rng.choice(_PLACES), "LOC")):
            sentence += [(w, ("B-" if i == 0 else "I-") + kind) for i, w in enumerate(words)]
            sentence += [(w, "O") for w in rng.choices(_FILLER, k=rng.randint(1, 3))]
        out.append(sentence)
    return out


def write_conll_file(path: Path, sentences, separator: str = "\t") -> str:
    path.write_text("".join("".join(f"{w}{separator}{t}\n" for w, t in s) + "\n" for s in sentences))
    return str(path)


def ner_files(folder: Path, n_train: int = 48, n_validation: int = 13, n_test: int = 9, suffix: str = ".txt") -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    return {f"{split}_file": write_conll_file(folder / f"{split}{suffix}", conll_sentences(n, seed))
            for split, n, seed in (("train", n_train, 1), ("validation", n_validation, 2), ("test", n_test, 3))}


def make_tiny_token_bert(path: Path, labels=tuple(NER_TAGS), seed: int = 0, dropout: float = 0.1) -> str:
    """A 2-layer, 32-wide BertForTokenClassification with the MiniLM tokenizer and the label maps of `labels`,
    so scaletune and Trainer load the same head (no random re-initialisation on either side)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    from scaletune.assets import model_path

    tok = AutoTokenizer.from_pretrained(model_path("packaged:minilm"))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=len(labels),
                        id2label=dict(enumerate(labels)), label2id={lab: i for i, lab in enumerate(labels)},
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    BertForTokenClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def make_tiny_llama(path: Path, seed: int = 0) -> str:
    """A 2-layer, 32-wide LlamaForCausalLM over the MiniLM vocabulary (no dropout), saved with that tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from scaletune.assets import model_path

    tok = AutoTokenizer.from_pretrained(model_path("packaged:minilm"))
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                         eos_token_id=tok.sep_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def rotten_lines(folder: Path, n_train: int = 120, n_validation: int = 30, n_test: int = 12) -> dict:
    """Real movie-review sentences as .txt files, one text per line (the `text` builder's rows)."""
    import csv

    from scaletune.assets import dataset_files

    folder.mkdir(parents=True, exist_ok=True)
    with open(dataset_files("packaged:rotten_tomatoes")["train"], newline="") as f:
        texts = [r["text"].replace("\n", " ") for _, r in zip(range(n_train + n_validation + n_test),
                                                              csv.DictReader(f))]
    cuts = {"train": texts[:n_train], "validation": texts[n_train:n_train + n_validation],
            "test": texts[n_train + n_validation:]}
    out = {}
    for split, lines in cuts.items():
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
        out[f"{split}_file"] = str(folder / f"{split}.txt")
    return out
