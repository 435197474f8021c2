"""Token classification (named entities, part of speech, chunks), as transformers' `run_ner.py`.

Data: rows with a list of words (`tokens`) and one tag per word (`ner_tags`: strings, or a `ClassLabel`
sequence as hub datasets ship them), or CoNLL files -- one `word ... tag` per line (first column the word, last
column the tag), a blank line between sentences -- as `.conll`, or `.txt` under `task: token_classification`.

* the tag set is the `ClassLabel` names, else the sorted distinct tags of the train split (run_ner.py);
* words are split into sub-words by a fast tokenizer; the first sub-word of each word carries the word's tag
  and the others -100 (not counted), or -- with `label_all_tokens` -- the word's tag too, `B-X` turned into
  `I-X` as run_ner.py does;
* loss: cross-entropy over the labelled sub-words, through the loss seam (`losses.CrossEntropy`);
* metrics: entity-level precision / recall / F1 and tag accuracy with `seqeval` (per entity type too with
  `return_entity_level_metrics`), sentence by sentence;
* predictions: the test split written back at word level in CoNLL form (`word<TAB>predicted tag`, a blank
  line between sentences).

Bad data stops the run before the model loads, with one message naming the rows: a sentence with no words, an
empty word, words and tags of different lengths, a validation/test tag the training data does not have.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import numpy as np

from ..errors import ConfigError, DataError
from ..losses import IGNORE_INDEX
from .base import PreparedData, Task, present_splits
from ..conll_format import write_conll
from .conll import align_labels, b_to_i_map, conll_splits, entity_metrics, split_sentences, word_tags
from .labels import id_column, is_list_feature, row_names
from .packing import FlattenedPadding

logger = logging.getLogger(__name__)

_WORD_COLUMNS = ("tokens", "words")
_TAG_COLUMNS = ("ner_tags", "tags", "pos_tags", "chunk_tags")
DEFAULT_MAX_LENGTH = 512
"""Sub-words per sentence when max_seq_length is unset and the tokenizer states no limit of its own."""


# --------------------------------------------------------------------------- the task


class TokenClassificationTask(Task):
    """`task: token_classification`: a tag per word (NER), AutoModelForTokenClassification."""

    name = "token_classification"
    metric_names = ("loss", "precision", "recall", "f1", "accuracy")
    predictions_file = "predictions.conll"

    def __init__(self):
        self.fixed_labels: Optional[list[str]] = None
        """Tag names in id order to use instead of the train split's (`scaletune.predict`: the model's own)."""
        self.label_list: list[str] = []
        self.per_type = False
        self.test_words: Optional[list[list[str]]] = None
        """The test split's words, for the word-level prediction file."""
        self.test_positions: Optional[list[list[int]]] = None
        """Per test sentence, the word of each labelled sub-word position, in order."""
        self.test_word_index: Optional[list[list[int]]] = None
        """Per test sentence, the word of every sub-word position (-1 for special tokens): what `predict` reads."""

    # ------------------------------------------------------------------ data
    def prepare_data(self, raw, tokenizer, cfg, main_process_first: Callable) -> PreparedData:
        d = cfg.data
        self.per_type = d.return_entity_level_metrics
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(f"Token classification needs a fast tokenizer (it maps sub-words back to words), and "
                              f"{type(tokenizer).__name__} is not one; use a model with a tokenizer.json, or set "
                              f"tokenizer_name to one.")
        raw = conll_splits(raw, cfg)
        splits = present_splits(raw)
        words_col, tags_col = self.columns(splits, cfg)
        for split, ds in splits.items():
            self._check_rows(split, ds, words_col, tags_col)
        labels = self._label_list(splits, tags_col)
        self.label_list = labels
        to_ids = self._tag_encoder(splits, tags_col, labels,
                                   lambda unknown: _cut_fix(unknown, cfg, splits.get("train"), words_col, tags_col))
        max_length = _max_length(d.max_seq_length, tokenizer, cfg)
        prepared = PreparedData(label_list=labels, info={"words_column": words_col, "tags_column": tags_col,
                                                          "max_seq_length": max_length},
                                text_columns=(words_col,), label_column=tags_col)
        encode = _Encoder(tokenizer, words_col, tags_col, to_ids, max_length, d.label_all_tokens, b_to_i_map(labels))
        with main_process_first():
            for split, ds in splits.items():
                tokenized = ds.map(encode, batched=True, remove_columns=ds.column_names,
                                   num_proc=d.preprocessing_num_workers, load_from_cache_file=not d.overwrite_cache,
                                   desc=f"Tokenizing and aligning tags ({split})")
                self._log_lost_words(split, tokenized)
                if split == "test":
                    self.test_words = [list(w) for w in ds[words_col]]
                    self.test_word_index = [list(w) for w in tokenized["word_index"]]
                    self.test_positions = [[w for w, lab in zip(wi, labs) if lab != IGNORE_INDEX]
                                           for wi, labs in zip(self.test_word_index, tokenized["labels"])]
                    ids_col = id_column(ds.column_names)
                    prepared.test_ids = list(ds[ids_col]) if ids_col else list(range(len(ds)))
                setattr(prepared, split, tokenized.remove_columns(["word_index", "lost_words"]))
        return prepared

    def columns(self, splits: dict, cfg) -> tuple[str, Optional[str]]:
        """(words column, tags column): `text_column_name` else `tokens`/`words`; `label_column_name` when the
        data has it, else `ner_tags`/`tags`/`pos_tags`/`chunk_tags`. The tags column may be absent only from
        a split that is predicted without metrics (`scaletune.predict`)."""
        d = cfg.data
        first = splits.get("train", next(iter(splits.values())))
        names = list(first.column_names)
        if d.text_column_name is not None:
            if d.text_column_name not in names:
                raise DataError(f"text_column_name={d.text_column_name!r} is not a column of the data; columns: "
                                f"{', '.join(names)}. Set --text_column_name to the column of word lists.")
            words = d.text_column_name
        else:
            words = next((c for c in _WORD_COLUMNS if c in names), None)
            if words is None:
                raise DataError(f"No column of words (tokens, words) among {', '.join(names)}; set "
                                f"--text_column_name, or give CoNLL files (`word ... tag` per line).")
        candidates = [c for split_ds in splits.values() for c in split_ds.column_names]
        tags = d.label_column_name if d.label_column_name in candidates else next(
            (c for c in _TAG_COLUMNS if c in candidates), None)
        for split, ds in splits.items():
            missing = [c for c in (words, tags) if c is not None and c not in ds.column_names]
            if words in missing:
                raise DataError(f"The {split} split has no {words!r} column of words; columns: "
                                f"{', '.join(ds.column_names)}.")
            if missing and (split != "test" or self.fixed_labels is None):
                raise DataError(f"The {split} split has no {tags!r} column of tags; columns: "
                                f"{', '.join(ds.column_names)}. Token classification needs a tag per word to train, "
                                f"evaluate and test (tag a file without tags with `python -m scaletune.predict`).")
        if tags is None and self.fixed_labels is None:
            raise DataError(f"No column of tags (ner_tags, tags, pos_tags, chunk_tags) among {', '.join(names)}; "
                            f"set --label_column_name.")
        return words, tags

    @staticmethod
    def _check_rows(split: str, ds, words_col: str, tags_col: Optional[str]) -> None:
        """Every row: a non-empty list of non-empty words, and (when tagged) exactly one tag per word."""
        has_tags = tags_col is not None and tags_col in ds.column_names
        problems: dict[str, list[int]] = {"no words": [], "an empty word": [], "ragged": [], "a missing tag": []}
        tag_lists = ds[tags_col] if has_tags else None
        for i, words in enumerate(ds[words_col]):
            if not words:
                problems["no words"].append(i)
                continue
            if any(not isinstance(w, str) or not w.strip() for w in words):
                problems["an empty word"].append(i)
            if has_tags:
                tags = tag_lists[i]
                if tags is None or len(tags) != len(words):
                    problems["ragged"].append(i)
                elif any(t is None or (isinstance(t, str) and not t.strip()) for t in tags):
                    problems["a missing tag"].append(i)
        rows = problems["no words"]
        if rows:
            raise DataError(f"The {split} split has {len(rows)} sentence(s) with no words ({row_names(ds, rows)}); "
                            f"remove them or fill in their {words_col!r}.")
        rows = problems["an empty word"]
        if rows:
            raise DataError(f"The {split} split has {len(rows)} sentence(s) with an empty or non-text word "
                            f"({row_names(ds, rows)}); every entry of {words_col!r} must be a word.")
        rows = problems["ragged"]
        if rows:
            i = rows[0]
            n_tags = len(tag_lists[i]) if tag_lists[i] is not None else 0
            raise DataError(f"The {split} split has {len(rows)} sentence(s) whose {words_col!r} and {tags_col!r} "
                            f"differ in length ({row_names(ds, rows)}; the first has {len(ds[i][words_col])} words and "
                            f"{n_tags} tags); give exactly one tag per word.")
        rows = problems["a missing tag"]
        if rows:
            raise DataError(f"The {split} split has {len(rows)} sentence(s) with a missing tag in {tags_col!r} "
                            f"({row_names(ds, rows)}); give every word a tag (`O` outside entities).")

    def _label_list(self, splits: dict, tags_col: Optional[str]) -> list[str]:
        """The model's tags when predicting; else ClassLabel names; else the sorted distinct tags of train."""
        if self.fixed_labels is not None:
            return list(self.fixed_labels)
        source = splits.get("train", splits.get("validation", next(iter(splits.values()))))
        names = _classlabel_names(source.features[tags_col])
        if names is not None:
            return names
        values = {t for tags in source[tags_col] for t in tags}
        if any(not isinstance(v, str) for v in values):
            raise DataError(f"The tags in {tags_col!r} are numbers without names; token classification needs tag "
                            f"names (B-PER, I-PER, O) to score entities: give string tags or a ClassLabel feature.")
        return sorted(values)

    @staticmethod
    def _tag_encoder(splits: dict, tags_col: Optional[str], labels: list[str],
                     cut_fix: Callable[[list], Optional[str]] = lambda unknown: None) -> dict:
        """tag (name, or ClassLabel id) -> id in `labels`; a tag outside `labels` in any split is an error, which
        lists every such tag and every training tag (`cut_fix`: the fix when max_train_samples left them out)."""
        to_id: dict = {lab: i for i, lab in enumerate(labels)}
        for split, ds in splits.items():
            if tags_col is None or tags_col not in ds.column_names:
                continue
            names = _classlabel_names(ds.features[tags_col])
            if names is not None:
                to_id.update({j: to_id[n] for j, n in enumerate(names) if n in to_id})
                seen = {names[t] if isinstance(t, int) and 0 <= t < len(names) else t
                        for tags in ds[tags_col] for t in tags}
            else:
                seen = {t for tags in ds[tags_col] for t in tags}
            unknown = sorted((t for t in seen if t not in to_id), key=str)
            if unknown:
                raise DataError(f"The {split} split has tags {unknown} that are not among the {len(labels)} "
                                f"training tags {labels}; "
                                f"{cut_fix(unknown) or 'fix the data or train on a split that has every tag'}.")
        return to_id

    @staticmethod
    def _log_lost_words(split: str, tokenized) -> None:
        lost = sum(tokenized["lost_words"])
        if lost:
            logger.warning("%s: %d word(s) have no sub-word within max_seq_length (cut off by truncation, or text "
                           "the tokenizer drops): they are not trained on or scored, and are written with tag O in "
                           "prediction files.", split, lost)

    # ------------------------------------------------------------------ model
    def build_model(self, cfg, prepared: PreparedData, tokenizer):
        from transformers import AutoModelForTokenClassification

        from ..model_source import load_config, load_pretrained

        labels = [str(x) for x in prepared.label_list]
        config = load_config(cfg.model, num_labels=len(labels), id2label=dict(enumerate(labels)),
                             label2id={lab: i for i, lab in enumerate(labels)}, finetuning_task="ner")
        return load_pretrained(AutoModelForTokenClassification, cfg.model, config=config)

    def collator(self, tokenizer, cfg, for_training: bool) -> Callable:
        from transformers import DataCollatorForTokenClassification

        padded = DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=cfg.data.pad_to_multiple_of)
        # Evaluation stays padded: its predictions are read back one row per sentence.
        return FlattenedPadding(padded) if for_training and cfg.data.padding_free else padded

    # ------------------------------------------------------------------ outputs
    def preprocess_logits(self, logits, labels):
        """(batch, length, 2): the predicted tag id, and 1 at each sentence's first labelled position."""
        import torch

        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        predicted = logits.argmax(dim=-1)
        if labels is None:
            return predicted
        counted = labels != IGNORE_INDEX
        first = counted & (counted.cumsum(dim=1) == 1)
        return torch.stack((predicted, first.to(predicted.dtype)), dim=-1)

    def tag_names(self, ids) -> list[str]:
        return [self.label_list[int(i)] for i in ids]

    def compute_metrics(self, predictions: np.ndarray, label_ids: np.ndarray) -> dict:
        predicted, true = split_sentences(predictions, label_ids)
        return entity_metrics([self.tag_names(s) for s in true], [self.tag_names(s) for s in predicted],
                              self.per_type)

    def outside_tag(self) -> str:
        """The tag of a word in no entity: `O`, else (a tag set without it) the first tag."""
        return "O" if "O" in self.label_list else self.label_list[0]

    def baseline(self, dataset) -> Optional[str]:
        """Every word tagged `O`: no entity found, so entity F1 is 0; accuracy is the share of O tags."""
        if dataset is None or "labels" not in getattr(dataset, "column_names", ()) or not self.label_list:
            return None
        outside = self.label_list.index(self.outside_tag())
        counted = [lab for row in dataset["labels"] for lab in row if lab != IGNORE_INDEX]
        if not counted:
            return None
        accuracy = sum(lab == outside for lab in counted) / len(counted)
        return f"all-{self.outside_tag()} tagger f1 0, accuracy {accuracy:.4g}"

    def write_predictions(self, path, predictions: np.ndarray, prepared: PreparedData, model_config) -> None:
        """The test sentences with their predicted tags, word by word, in CoNLL form."""
        if self.test_words is None or self.test_positions is None:
            return
        predictions = np.asarray(predictions)
        tags = predictions[:, 0] if predictions.ndim == 2 else predictions.reshape(-1)
        names = _id2label(model_config, self.label_list)
        out, offset, missing = [], 0, 0
        for words, positions in zip(self.test_words, self.test_positions):
            predicted = [names[int(t)] for t in tags[offset: offset + len(positions)]]
            offset += len(positions)
            sentence_tags, lost = word_tags(len(words), positions, predicted, self.outside_tag())
            out.append(sentence_tags)
            missing += lost
        if offset != len(tags):
            raise RuntimeError(f"{len(tags)} test predictions for {offset} labelled positions: the predictions are "
                               f"not those of this test split.")
        write_conll(path, self.test_words, out)
        if missing:
            logger.warning("%d test word(s) had no prediction (no sub-word within max_seq_length) and were written "
                           "with tag %s.", missing, self.outside_tag())

    def mark_words(self, test):
        """An untagged test split (`scaletune.predict`) with each word's first sub-word as a labelled position
        (label 0): inference then hands back the predictions at the positions `write_predictions` reads."""
        marks = [[0 if w >= 0 and (i == 0 or row[i - 1] != w) else IGNORE_INDEX for i, w in enumerate(row)]
                 for row in self.test_word_index]
        self.test_positions = [[w for w, mark in zip(row, marked) if mark != IGNORE_INDEX]
                               for row, marked in zip(self.test_word_index, marks)]
        return test.remove_columns("labels").add_column("labels", marks)


class _Encoder:
    """Tokenize word lists and align tags (a class, not a closure: the `datasets` cache key is its settings)."""

    def __init__(self, tokenizer, words_col, tags_col, to_ids, max_length, label_all_tokens, b_to_i):
        self.tokenizer = tokenizer
        self.words_col, self.tags_col = words_col, tags_col
        self.to_ids = to_ids
        self.max_length = max_length
        self.label_all_tokens = label_all_tokens
        self.b_to_i = b_to_i

    def __call__(self, batch):
        words = batch[self.words_col]
        enc = self.tokenizer(words, is_split_into_words=True, truncation=True, max_length=self.max_length)
        tags = batch.get(self.tags_col) if self.tags_col else None
        labels, word_index, lost = [], [], []
        for i, sentence in enumerate(words):
            ids = enc.word_ids(batch_index=i)
            word_labels = [self.to_ids[t] for t in tags[i]] if tags is not None else None
            labels.append(align_labels(ids, word_labels, self.label_all_tokens, self.b_to_i))
            word_index.append([-1 if w is None else w for w in ids])
            lost.append(len(sentence) - len({w for w in ids if w is not None}))
        enc["labels"] = labels
        enc["word_index"] = word_index
        enc["lost_words"] = lost
        return enc


def _cut_fix(unknown: list, cfg, train, words_col: str, tags_col: Optional[str]) -> Optional[str]:
    """The fix when max_train_samples cut tags out of the training data (the whole training split has them),
    else None. Only on the error path: the data is loaded again without the cut (from the `datasets` cache) and
    trusted only if its first rows are exactly this run's training sentences (not so for run(train_dataset=))."""
    import copy

    from ..data import load_raw_datasets

    limit = cfg.data.max_train_samples
    if (train is None or limit is None or len(train) < limit or tags_col is None
            or _classlabel_names(train.features[tags_col]) is not None  # named tags: every name is a label, cut or not
            or (cfg.data.dataset_name is None and cfg.data.train_file is None)):
        return None
    whole_cfg = copy.deepcopy(cfg)
    whole_cfg.data.max_train_samples = None
    whole = conll_splits(load_raw_datasets(whole_cfg), whole_cfg).get("train")
    if whole is None or len(whole) <= limit or whole.select(range(limit))[words_col] != train[words_col]:
        return None
    in_whole = {t for tags in whole[tags_col] for t in tags}
    cut = [t for t in unknown if t in in_whole]
    if not cut:
        return None
    absent = [t for t in unknown if t not in in_whole]
    return (f"max_train_samples={limit} keeps the first {limit} training sentences, and only later ones have "
            f"{cut}: raise or unset max_train_samples" + (f" (no training sentence has {absent}: fix the data)"
                                                          if absent else ""))


def _classlabel_names(feature) -> Optional[list[str]]:
    inner = getattr(feature, "feature", None) if is_list_feature(feature) else None
    return list(inner.names) if inner is not None and hasattr(inner, "names") else None


def _id2label(model_config, fallback: list[str]) -> list[str]:
    id2label = getattr(model_config, "id2label", None) or {}
    if len(id2label) != len(fallback):
        return list(fallback)
    return [id2label[i] if i in id2label else id2label[str(i)] for i in range(len(fallback))]


def _max_length(requested: Optional[int], tokenizer, cfg) -> int:
    """max_seq_length, else the tokenizer's limit (run_ner.py); either capped by the model's position table, which
    a longer sentence would overrun in its first forward pass."""
    from ..model_source import max_position_embeddings

    limit = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else DEFAULT_MAX_LENGTH
    positions = max_position_embeddings(cfg.model)
    if positions:
        limit = min(limit, positions)
    if requested and requested > limit:
        logger.warning("max_seq_length=%d exceeds the model's limit %d; using %d.", requested, limit, limit)
    return min(requested, limit) if requested else limit
