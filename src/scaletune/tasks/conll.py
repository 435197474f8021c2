"""Token classification's pure pieces: CoNLL splits re-read as sentences, word-to-sub-word label alignment,
B-/I- tag maps, entity-level metrics (seqeval) -- everything that needs no model. The file format itself is
`scaletune.conll_format`.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np

from ..conll_format import conll_dataset, is_conll_file
from ..losses import IGNORE_INDEX


# --------------------------------------------------------------------------- CoNLL splits


def conll_splits(raw, cfg):
    """Local CoNLL files re-read as sentences.

    `data.load_raw_datasets` reads `.txt` with the `text` builder, one row per line -- and has then carved the
    validation split and applied max_*_samples on *lines*, which would cut sentences apart. The files are
    read again here, as sentences, and the carving and limits are applied to sentences, with the same rules
    (seeded `train_test_split`, first N rows).
    """
    import datasets

    from ..data import data_files
    from ..splits import carve_validation

    files = data_files(cfg)
    if not files or not all(is_conll_file(p) for p in files.values()):
        return raw
    if any(set(ds.column_names) != {"text"} for ds in raw.values()):
        return raw  # already rows of words and tags (a reader upstream understood the files)
    d, t = cfg.data, cfg.training
    out = datasets.DatasetDict({split: conll_dataset(path) for split, path in files.items()})
    if "validation" not in out and "train" in out and d.validation_split_percentage > 0:
        out["train"], out["validation"] = carve_validation(out["train"], d.validation_split_percentage, t.seed,
                                                           unit="sentences")
    for split, limit in (("train", d.max_train_samples), ("validation", d.max_eval_samples),
                         ("test", d.max_predict_samples)):
        if split in out and limit is not None:
            out[split] = out[split].select(range(min(limit, len(out[split]))))
    return out


# --------------------------------------------------------------------------- pure pieces


def align_labels(word_ids: list, word_labels: Optional[list[int]], label_all_tokens: bool,
                 b_to_i: list[int]) -> list[int]:
    """Sub-word labels from word labels (run_ner.py's `tokenize_and_align_labels`).

    Special tokens (word id None) get -100; the first sub-word of a word its label; the following sub-words
    -100, or with `label_all_tokens` the word's label with B-X replaced by I-X (an entity starts once).
    Without word labels (a file to predict) every position is -100.
    """
    out = []
    previous = None
    for w in word_ids:
        if w is None or word_labels is None:
            out.append(IGNORE_INDEX)
        elif w != previous:
            out.append(word_labels[w])
        else:
            out.append(b_to_i[word_labels[w]] if label_all_tokens else IGNORE_INDEX)
        previous = w
    return out


def b_to_i_map(label_list: list[str]) -> list[int]:
    """For each tag id, the id of its inside tag (`B-PER` -> `I-PER`) when the tag set has one, else itself."""
    index = {lab: i for i, lab in enumerate(label_list)}
    out = []
    for i, lab in enumerate(label_list):
        inside = "I-" + lab[2:] if lab.startswith("B-") else None
        out.append(index.get(inside, i))
    return out


def split_sentences(predictions: np.ndarray, label_ids: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Cut evaluation's flat outputs back into sentences.

    Evaluation keeps the labelled positions of every sample, in dataset order, concatenated; `preprocess_logits`
    sends, next to each predicted tag, a flag that is 1 at a sentence's first labelled position. Entities must
    not run from the end of one sentence into the next (B-PER | I-PER would merge), so seqeval gets sentences.
    """
    predictions = np.asarray(predictions)
    label_ids = np.asarray(label_ids).reshape(-1)
    if predictions.ndim == 1:  # no flags (a caller's own preprocess): one sequence
        return [predictions], [label_ids]
    tags, starts = predictions[:, 0], predictions[:, 1]
    cuts = np.flatnonzero(starts == 1)
    if len(cuts) == 0 or cuts[0] != 0:
        cuts = np.concatenate(([0], cuts))
    return np.split(tags, cuts[1:]), np.split(label_ids, cuts[1:])


def entity_metrics(true_tags: list[list[str]], predicted_tags: list[list[str]], per_type: bool = False) -> dict:
    """seqeval's entity-level precision, recall, F1 (micro over entities) and tag accuracy, as the `seqeval`
    metric of `evaluate` reports them to run_ner.py; with `per_type`, `<type>_precision/_recall/_f1/_number`."""
    from seqeval.metrics import accuracy_score, classification_report

    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")  # seqeval warns about labels with no entity: the scores say it (0)
        report = classification_report(true_tags, predicted_tags, output_dict=True, zero_division=0)
        accuracy = accuracy_score(true_tags, predicted_tags)
    overall = report["micro avg"]
    out = {"precision": float(overall["precision"]), "recall": float(overall["recall"]),
           "f1": float(overall["f1-score"]), "accuracy": float(accuracy)}
    if per_type:
        for name, scores in report.items():
            if name.endswith(" avg"):
                continue
            out.update({f"{name}_precision": float(scores["precision"]), f"{name}_recall": float(scores["recall"]),
                        f"{name}_f1": float(scores["f1-score"]), f"{name}_number": int(scores["support"])})
    return out


def word_tags(word_count: int, positions: list[int], predicted: list[str], fallback: str) -> tuple[list[str], int]:
    """Word-level tags from predictions at labelled sub-word positions (`positions[i]` is the word of the i-th):
    each word takes its first sub-word's tag. A word with no prediction -- cut off by max_seq_length, or a word
    the tokenizer turns into no sub-word at all -- gets `fallback`; their number is returned to be logged."""
    out: list[Optional[str]] = [None] * word_count
    for w, tag in zip(positions, predicted):
        if out[w] is None:
            out[w] = tag
    missing = sum(t is None for t in out)
    return [fallback if t is None else t for t in out], missing
