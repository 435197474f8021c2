"""Sequence classification (the IMDB / GLUE tutorial job): one or two text columns, int or string labels.

This module also holds what the regression and multi-label tasks share with it -- text columns, label
checks, tokenization, the model head -- so those tasks only say how a label value becomes a target.

Label rules, as transformers' `run_classification.py`:

* the label set is the `ClassLabel` names, else the sorted distinct labels of the train split (integer
  labels 1-5 are 5 classes, named "1".."5");
* under `task: classification` the label column decides the job: floats are regression, lists (or
  strings with `label_delimiter` set) are multi-label -- the choice is logged in one line;
* a train or validation row without a label is an error naming the rows, unless `drop_unlabelled_rows`
  drops them (the count is logged); a test split with unlabelled rows (GLUE's -1) is predicted without
  test metrics.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Optional

import numpy as np

from ..errors import DataError
from ..losses import ItemLoss
from .base import PreparedData, Task
from .labels import detect_label_kind, id_column, is_float_feature, is_list_feature, is_missing, label_source, row_names
from .outputs import classification_metrics, write_prediction_file

logger = logging.getLogger(__name__)

# Column pairs tried in order when text_column_names is not given (as run_glue.py / run_classification.py).
_DEFAULT_TEXT_COLUMNS = [("text",), ("sentence",), ("sentence1", "sentence2"), ("question", "sentence"),
                         ("premise", "hypothesis"), ("question1", "question2"), ("review",), ("content",)]


def _delegated(method):
    """Forward to the task chosen from the labels (see ClassificationTask.prepare_data), if one was."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        chosen = getattr(self, "_chosen", None)
        if chosen is not None:
            return getattr(chosen, method.__name__)(*args, **kwargs)
        return method(self, *args, **kwargs)

    return wrapper


class ClassificationTask(Task):
    name = "classification"
    metric_names = ("loss", "accuracy", "precision", "recall", "f1", "matthews_correlation")
    problem_type: Optional[str] = None  # transformers infers single-label classification from integer labels
    detects_label_kind = True
    """Only `task: classification` looks at the label column to pick regression or multi-label."""

    def __init__(self):
        self._chosen: Optional[Task] = None
        self.new_parameters: set[str] = set()
        """Names of the parameters `build_model` initialised afresh (not in the checkpoint)."""

    # ------------------------------------------------------------------ data
    def text_columns(self, columns: list[str], cfg) -> tuple[str, ...]:
        if cfg.data.text_column_names:
            wanted = tuple(c.strip() for c in cfg.data.text_column_names.split(",") if c.strip())
            if not 1 <= len(wanted) <= 2:
                raise DataError(f"text_column_names takes one or two columns, got {len(wanted)}.")
            for c in wanted:
                if c not in columns:
                    raise DataError(f"text column {c!r} (text_column_names) is not in the data; columns: "
                                    f"{', '.join(columns)}. Set --text_column_names to one of them.")
            return wanted
        for cand in _DEFAULT_TEXT_COLUMNS:
            if all(c in columns for c in cand):
                return cand
        raise DataError(f"No text column found among {', '.join(columns)}; set --text_column_names.")

    def label_list(self, raw, cfg) -> list:
        """Label names in id order: ClassLabel names, else the sorted distinct values of the train split."""
        col = cfg.data.label_column_name
        train = label_source(raw)
        feature = train.features[col]
        if hasattr(feature, "names"):
            return list(feature.names)
        values = [v for v in train.unique(col) if not is_missing(v)]
        if not values:
            raise DataError(f"The label column {col!r} of the train split holds no labels.")
        if is_float_feature(feature):
            if not all(float(v).is_integer() for v in values):
                raise DataError(f"The label column {col!r} holds fractional numbers, which are not class labels; "
                                f"set task: regression to regress on them.")
            values = [int(v) for v in values]
            logger.warning("The label column %r holds whole-number floats (a CSV integer column with blank cells "
                           "reads as floats): using them as the %d class labels %s (set task: regression to "
                           "regress on them).", col, len(values), sorted(values)[:10])
        if all(isinstance(v, (int, np.integer)) for v in values):
            # The label set is the sorted distinct values (labels 1-5 are 5 classes), as run_classification.py.
            return sorted(int(v) for v in values)
        self._check_not_mixed_numbers(col, [str(v) for v in values])
        return sorted(str(v) for v in values)

    @staticmethod
    def _check_not_mixed_numbers(col: str, values: list[str]) -> None:
        """Fractional numbers next to text in one label column are a broken regression column, not classes."""
        fractional, text = [], []
        for v in values:
            try:
                number = float(v)
            except ValueError:
                text.append(v)
                continue
            if not number.is_integer():
                fractional.append(v)
        if fractional and text:
            raise DataError(f"The label column {col!r} mixes numbers ({', '.join(sorted(fractional)[:3])}) with "
                            f"text ({', '.join(repr(t) for t in sorted(text)[:3])}); clean the column, or set "
                            f"task: regression once every label is a number.")

    @_delegated
    def prepare_data(self, raw, tokenizer, cfg, main_process_first) -> PreparedData:
        if self.detects_label_kind:
            kind = detect_label_kind(raw, cfg)
            if kind != self.name:
                from . import get_task

                col = cfg.data.label_column_name
                listed = is_list_feature(label_source(raw).features[col])
                holds = {"regression": "fractional numbers",
                         "multilabel": "lists of labels" if listed else "label_delimiter strings"}[kind]
                logger.warning("task: classification -- the label column %r holds %s, so this is a %s task "
                               "(set task: %s to choose it explicitly).", col, holds, kind, kind)
                self._chosen = get_task(kind)
                self.name, self.metric_names = self._chosen.name, self._chosen.metric_names
                return self._chosen.prepare_data(raw, tokenizer, cfg, main_process_first)
        text_cols = self._check_columns(raw, cfg)
        raw = self._handle_unlabelled(raw, cfg)
        labels = self.label_list(raw, cfg)
        raw = self._strip_unlabelled_test(raw, cfg, labels)
        to_target = self.label_encoder(raw, cfg, labels)
        prepared = PreparedData(label_list=labels, text_columns=text_cols, label_column=cfg.data.label_column_name)
        self._tokenize(raw, tokenizer, cfg, text_cols, to_target, prepared, main_process_first)
        return prepared

    def _check_columns(self, raw, cfg) -> tuple[str, ...]:
        first = label_source(raw)
        text_cols = self.text_columns(list(first.column_names), cfg)
        label_col = cfg.data.label_column_name
        for split, ds in raw.items():
            if label_col not in ds.column_names and split != "test":
                raise DataError(f"label column {label_col!r} is not in the {split} split; columns: "
                                f"{', '.join(ds.column_names)}. Set --label_column_name to one of them.")
            missing = [c for c in text_cols if c not in ds.column_names]
            if missing:
                raise DataError(f"text column {missing[0]!r} is missing from the {split} split.")
            for c in text_cols:  # an empty cell reads as null, which the tokenizer refuses with a traceback
                empty = ds.with_format("arrow")[c].null_count
                if empty:
                    raise DataError(f"The text column {c!r} of the {split} split is empty in {empty} of {len(ds)} "
                                    f"rows: fill those rows or drop them (or set text_column_names).")
        return text_cols

    @staticmethod
    def _is_unlabelled(value, classlabel: bool) -> bool:
        # -1 is datasets' "no label" in a ClassLabel column; in a plain integer column it is a label like any.
        return is_missing(value) or (classlabel and not isinstance(value, list) and value == -1)

    def _handle_unlabelled(self, raw, cfg):
        """Train/validation rows without a label: an error naming them, or dropped with a logged count."""
        col = cfg.data.label_column_name
        drop = cfg.data.drop_unlabelled_rows
        for split in ("train", "validation"):
            if split not in raw or col not in raw[split].column_names:
                continue
            ds = raw[split]
            classlabel = hasattr(ds.features[col], "names")
            rows = [i for i, v in enumerate(ds[col]) if self._is_unlabelled(v, classlabel)]
            if not rows:
                continue
            if not drop:
                hint = " (a multi-label row with no labels is an empty list [] in JSON/JSONL)" \
                    if self.name == "multilabel" else ""
                raise DataError(f"The {split} split has {len(rows)} of {len(ds)} rows with no {col!r} label "
                                f"({row_names(ds, rows)}){hint}; fill them in, or set drop_unlabelled_rows: true "
                                f"to drop them.")
            keep = sorted(set(range(len(ds))) - set(rows))
            if not keep:
                raise DataError(f"Every row of the {split} split has no {col!r} label; check label_column_name.")
            logger.warning("Dropped %d of %d %s rows with no %r label (drop_unlabelled_rows).",
                           len(rows), len(ds), split, col)
            raw[split] = ds.select(keep)
        return raw

    def _test_unlabelled(self, value, classlabel: bool, labels) -> bool:
        # GLUE-style test files written as plain integers carry -1 where the label is hidden.
        return self._is_unlabelled(value, classlabel) or (
            value == -1 and not isinstance(value, list) and labels is not None and -1 not in labels)

    def _strip_unlabelled_test(self, raw, cfg, labels):
        """A test split with unlabelled rows is predicted without test metrics (GLUE's test sets)."""
        col = cfg.data.label_column_name
        if "test" not in raw or col not in raw["test"].column_names:
            return raw
        ds = raw["test"]
        classlabel = hasattr(ds.features[col], "names")
        unlabelled = sum(1 for v in ds[col] if self._test_unlabelled(v, classlabel, labels))
        if unlabelled:
            if unlabelled < len(ds):
                logger.warning("%d of %d test rows have no label: the test split is predicted without test "
                               "metrics.", unlabelled, len(ds))
            raw["test"] = ds.remove_columns(col)
        return raw

    def label_encoder(self, raw, cfg, labels) -> Callable:
        """value -> class id; every labelled split is checked first, so encoding cannot fail halfway."""
        col = cfg.data.label_column_name
        label_to_id = {lab: i for i, lab in enumerate(labels)}
        if hasattr(label_source(raw).features.get(col), "names"):  # a ClassLabel column already holds the ids
            label_to_id.update({i: i for i in range(len(labels))})
        self._check_label_range(raw, col, label_to_id, labels)
        return functools.partial(_class_id, label_to_id=label_to_id)

    @staticmethod
    def _check_label_range(raw, col, label_to_id, labels):
        for split, ds in raw.items():
            if col not in ds.column_names:
                continue
            bad = sorted({v for v in ds.unique(col) if not is_missing(v)
                          and v not in label_to_id and str(v) not in label_to_id}, key=str)
            if bad:
                raise DataError(
                    f"The {split} split has labels {bad[:5]} that are not among the {len(labels)} training labels "
                    f"{labels[:10]}; fix the data or train on a split that contains every label."
                )

    @staticmethod
    def _tokenize(raw, tokenizer, cfg, text_cols, to_target, prepared: PreparedData, main_process_first):
        d = cfg.data
        label_col = d.label_column_name
        max_len = min(d.max_seq_length or 128, tokenizer.model_max_length)

        def encode(batch):
            texts = [batch[c] for c in text_cols]
            out = tokenizer(*texts, truncation=True, max_length=max_len)
            if label_col in batch:
                out["labels"] = [to_target(v) for v in batch[label_col]]
            return out

        with main_process_first():
            for split, ds in raw.items():
                tokenized = ds.map(encode, batched=True, remove_columns=ds.column_names,
                                   num_proc=d.preprocessing_num_workers,
                                   load_from_cache_file=not d.overwrite_cache, desc=f"Tokenizing {split}")
                setattr(prepared, split, tokenized)
        if "test" in raw:
            id_col = id_column(raw["test"].column_names)
            prepared.test_ids = list(raw["test"][id_col]) if id_col else list(range(len(raw["test"])))

    # ------------------------------------------------------------------ model
    @_delegated
    def model_config_kwargs(self, prepared: PreparedData) -> dict:
        """num_labels, label maps and problem_type for the head (saved in the exported config.json)."""
        labels = [str(x) for x in prepared.label_list]
        kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                  "label2id": {lab: i for i, lab in enumerate(labels)}}
        if self.problem_type:
            kwargs["problem_type"] = self.problem_type
        return kwargs

    @_delegated
    def build_model(self, cfg, prepared: PreparedData, tokenizer):
        from transformers import AutoModelForSequenceClassification

        from ..model_source import load_config, load_pretrained

        config = load_config(cfg.model, **self.model_config_kwargs(prepared))
        model, info = load_pretrained(AutoModelForSequenceClassification, cfg.model, config=config,
                                      output_loading_info=True)
        # Parameters the checkpoint did not provide (a new head): a task may initialise them (multilabel does).
        self.new_parameters = {k if isinstance(k, str) else k[0]
                               for k in (*info.get("missing_keys", ()), *info.get("mismatched_keys", ()))}
        return model

    @_delegated
    def loss(self, cfg) -> ItemLoss:
        return super().loss(cfg)  # cross-entropy (with label_smoothing_factor); delegated when autodetected

    @_delegated
    def collator(self, tokenizer, cfg, for_training: bool):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=cfg.data.pad_to_multiple_of)

    # ------------------------------------------------------------------ outputs
    @_delegated
    def preprocess_logits(self, logits, labels):
        return logits.float()

    @_delegated
    def compute_metrics(self, predictions: np.ndarray, label_ids: np.ndarray) -> dict:
        return classification_metrics(predictions, label_ids)

    @_delegated
    def metrics_from_loss(self, eval_loss: float) -> dict:
        return {}

    @_delegated
    def baseline(self, dataset):
        labels = [y for y in dataset["labels"] if y != -100] if dataset is not None else []
        if not labels:
            return None
        majority = max(set(labels), key=labels.count)
        return f"majority class accuracy {labels.count(majority) / len(labels):.4g}"

    @_delegated
    def write_predictions(self, path, predictions: np.ndarray, prepared: PreparedData, model_config) -> None:
        write_prediction_file(path, predictions, prepared.test_ids, model_config.id2label)


def _class_id(value, label_to_id):
    # Module level (not a closure over the task) so the `datasets` cache fingerprint depends on the labels only.
    if is_missing(value):
        return -100  # only reachable in a test split, whose labels are dropped when any row lacks one
    key = value if value in label_to_id else str(value)
    return label_to_id[key]
