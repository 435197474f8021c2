"""Sequence classification (the IMDB / GLUE tutorial job): one or two text columns, int or string labels."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..data import DataError
from .base import PreparedData, Task

# Column pairs tried in order when text_column_names is not given (as run_glue.py / run_classification.py).
_DEFAULT_TEXT_COLUMNS = [("text",), ("sentence",), ("sentence1", "sentence2"), ("question", "sentence"),
                         ("premise", "hypothesis"), ("question1", "question2"), ("review",), ("content",)]
_ID_COLUMNS = ("id", "idx", "guid")


class ClassificationTask(Task):
    name = "classification"
    default_metric_for_best_model = "loss"
    metric_names = ("loss", "accuracy", "precision", "recall", "f1", "matthews_correlation")

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
        train = raw["train"] if "train" in raw else raw["validation"]
        feature = train.features[col]
        if hasattr(feature, "names"):
            return list(feature.names)
        values = [v for v in train.unique(col) if v is not None and v != -1]
        if not values:
            raise DataError(f"The label column {col!r} of the train split holds no labels.")
        if all(isinstance(v, (int, np.integer)) for v in values):
            # Integer labels are ids 0..n-1 (as the model head expects); gaps are filled so ids stay ids.
            return list(range(int(max(values)) + 1))
        if any(isinstance(v, float) for v in values):
            raise DataError(f"The label column {col!r} holds floats; regression is not supported. "
                            f"Use integer or string class labels.")
        return sorted(str(v) for v in values)

    def prepare_data(self, raw, tokenizer, cfg, main_process_first) -> PreparedData:
        d = cfg.data
        first = raw["train"] if "train" in raw else next(iter(raw.values()))
        columns = list(first.column_names)
        text_cols = self.text_columns(columns, cfg)
        label_col = d.label_column_name
        for split, ds in raw.items():
            has_labels = label_col in ds.column_names
            if not has_labels and split != "test":
                raise DataError(f"label column {label_col!r} is not in the {split} split; columns: "
                                f"{', '.join(ds.column_names)}. Set --label_column_name to one of them.")
            missing = [c for c in text_cols if c not in ds.column_names]
            if missing:
                raise DataError(f"text column {missing[0]!r} is missing from the {split} split.")
        labels = self.label_list(raw, cfg)
        label_to_id = {lab: i for i, lab in enumerate(labels)}
        if hasattr(first.features.get(label_col), "names"):  # a ClassLabel column already holds the ids
            label_to_id.update({i: i for i in range(len(labels))})
        self._check_label_range(raw, label_col, label_to_id, labels)

        max_len = min(d.max_seq_length or 128, tokenizer.model_max_length)

        def encode(batch):
            texts = [batch[c] for c in text_cols]
            out = tokenizer(*texts, truncation=True, max_length=max_len)
            if label_col in batch:
                out["labels"] = [self._to_id(v, label_to_id) for v in batch[label_col]]
            return out

        prepared = PreparedData(label_list=labels)
        with main_process_first():
            for split, ds in raw.items():
                tokenized = ds.map(encode, batched=True, remove_columns=ds.column_names,
                                   num_proc=d.preprocessing_num_workers,
                                   load_from_cache_file=not d.overwrite_cache, desc=f"Tokenizing {split}")
                setattr(prepared, split, tokenized)
        if "test" in raw:
            id_col = next((c for c in _ID_COLUMNS if c in raw["test"].column_names), None)
            prepared.test_ids = list(raw["test"][id_col]) if id_col else list(range(len(raw["test"])))
            if prepared.test is not None and "labels" in prepared.test.column_names:
                # Unlabelled test rows (GLUE uses -1) cannot count towards test metrics.
                if any(v == -100 for v in prepared.test["labels"]):
                    prepared.test = prepared.test.remove_columns("labels")
        return prepared

    @staticmethod
    def _to_id(value, label_to_id):
        if value is None or value == -1:
            return -100  # unlabelled (e.g. GLUE test): ignored by the loss
        key = value if value in label_to_id else str(value)
        return label_to_id[key]

    @staticmethod
    def _check_label_range(raw, col, label_to_id, labels):
        for split, ds in raw.items():
            if col not in ds.column_names:
                continue
            bad = sorted({v for v in ds.unique(col) if v is not None and v != -1
                          and v not in label_to_id and str(v) not in label_to_id}, key=str)
            if bad:
                raise DataError(
                    f"The {split} split has labels {bad[:5]} that are not among the {len(labels)} training labels "
                    f"{labels[:10]}; fix the data or train on a split that contains every label."
                )

    # ------------------------------------------------------------------ model
    def build_model(self, cfg, prepared: PreparedData, tokenizer):
        from transformers import AutoConfig, AutoModelForSequenceClassification

        from ..assets import model_path

        m = cfg.model
        labels = [str(x) for x in prepared.label_list]
        config = AutoConfig.from_pretrained(
            model_path(m.config_name or m.model_name_or_path), num_labels=len(labels),
            id2label=dict(enumerate(labels)), label2id={lab: i for i, lab in enumerate(labels)},
            cache_dir=m.cache_dir, revision=m.model_revision, trust_remote_code=m.trust_remote_code,
        )
        return AutoModelForSequenceClassification.from_pretrained(
            model_path(m.model_name_or_path), config=config, cache_dir=m.cache_dir, revision=m.model_revision,
            trust_remote_code=m.trust_remote_code, ignore_mismatched_sizes=m.ignore_mismatched_sizes,
        )

    def collator(self, tokenizer, cfg, for_training: bool):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=cfg.data.pad_to_multiple_of)

    # ------------------------------------------------------------------ outputs
    def preprocess_logits(self, logits, labels):
        return logits.float()

    def compute_metrics(self, predictions: np.ndarray, label_ids: np.ndarray) -> dict:
        return classification_metrics(predictions, label_ids)

    def baseline(self, dataset):
        labels = [y for y in dataset["labels"] if y != -100] if dataset is not None else []
        if not labels:
            return None
        majority = max(set(labels), key=labels.count)
        return f"majority class accuracy {labels.count(majority) / len(labels):.4g}"

    def write_predictions(self, path, predictions: np.ndarray, prepared: PreparedData, model_config) -> None:
        write_prediction_file(path, predictions, prepared.test_ids, model_config.id2label)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def classification_metrics(logits: np.ndarray, label_ids: np.ndarray) -> dict:
    """accuracy, precision, recall, F1 (binary for 2 classes, macro otherwise) and Matthews correlation."""
    from sklearn.metrics import accuracy_score, matthews_corrcoef, precision_recall_fscore_support

    preds = logits.argmax(-1) if logits.ndim > 1 else logits
    mask = label_ids != -100
    preds, label_ids = preds[mask], label_ids[mask]
    num_classes = logits.shape[-1] if logits.ndim > 1 else int(max(preds.max(), label_ids.max())) + 1
    average = "binary" if num_classes == 2 else "macro"
    p, r, f1, _ = precision_recall_fscore_support(label_ids, preds, average=average, zero_division=0)
    return {
        "accuracy": float(accuracy_score(label_ids, preds)),
        "precision": float(p),
        "recall": float(r),
        "f1": float(f1),
        "matthews_correlation": float(matthews_corrcoef(label_ids, preds)),
    }


def write_prediction_file(path, logits: np.ndarray, ids, id2label: dict) -> None:
    """CSV: id, predicted label, and one probability column per label (as the tutorial's predict step)."""
    probs = softmax(logits.astype(np.float64))
    names = [id2label[i] if i in id2label else id2label[str(i)] for i in range(probs.shape[1])]
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "prediction"] + [f"prob_{n}" for n in names])
        for i, row in zip(ids, probs):
            w.writerow([i, names[int(row.argmax())]] + [f"{p:.6f}" for p in row])
    tmp.replace(path)
