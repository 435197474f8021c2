"""Label columns as the classification-family tasks read them: missing values, feature kinds, which job a
label column means, and row names for error messages."""

from __future__ import annotations

import math
from typing import Optional

from ..errors import ConfigError

_SHOWN_ROWS = 5  # row indices named in an error message
ID_COLUMNS = ("id", "idx", "guid")
"""Columns that name a row (written next to each prediction, and in error messages)."""


def is_missing(value) -> bool:
    """No label: None (an empty CSV cell, a JSON null) or NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def is_list_feature(feature) -> bool:
    return isinstance(feature, (list, tuple)) or type(feature).__name__ in ("List", "LargeList", "Sequence")


def _dtype(feature) -> str:
    return str(getattr(feature, "dtype", ""))


def is_float_feature(feature) -> bool:
    return _dtype(feature).startswith("float")


def is_numeric_feature(feature) -> bool:
    return _dtype(feature).startswith(("int", "uint", "float")) and not hasattr(feature, "names")


def is_string_feature(feature) -> bool:
    return _dtype(feature) in ("string", "large_string")


def check_no_label_smoothing(cfg, task: str) -> None:
    """Label smoothing mixes class targets with the uniform distribution; a number or a label set has none."""
    factor = cfg.training.label_smoothing_factor
    if factor:
        raise ConfigError(f"label_smoothing_factor={factor} applies to classification only; set it to 0 for "
                          f"the {task} task.")


def labelled_splits(raw, col: str):
    """(split, dataset) for every split whose label column holds at least one label.

    A test split with no label at all (a JSON null column, GLUE's hidden labels) is predicted without
    metrics, so its column's type says nothing about the task.
    """
    for split, ds in raw.items():
        if col in ds.column_names and any(not is_missing(v) for v in ds[col]):
            yield split, ds


def label_source(raw):
    """The split the label set comes from: train, else validation (evaluation-only runs)."""
    return raw["train"] if "train" in raw else raw["validation"] if "validation" in raw else next(iter(raw.values()))


def detect_label_kind(raw, cfg) -> str:
    """`classification`, `regression` or `multilabel`, from the label column of the train split.

    Floats are regression (as run_glue.py) unless every value is a whole number: a CSV integer column with
    blank cells reads as floats, and those are still class labels.
    """
    col = cfg.data.label_column_name
    ds = label_source(raw)
    if col not in ds.column_names:
        return "classification"  # the missing column is reported by prepare_data
    feature = ds.features[col]
    if is_list_feature(feature) or (cfg.data.label_delimiter and is_string_feature(feature)):
        return "multilabel"
    if is_float_feature(feature):
        values = [v for v in ds[col] if not is_missing(v)]
        if values and all(float(v).is_integer() for v in values):
            return "classification"
        return "regression"
    return "classification"


def id_column(column_names) -> Optional[str]:
    """The column that identifies a row (`id`, `idx` or `guid`, the first present), or None."""
    return next((c for c in ID_COLUMNS if c in column_names), None)


def row_names(ds, rows: list[int]) -> str:
    """How an error names rows: by the id column when there is one, else by 0-based index in the split."""
    id_col = id_column(ds.column_names)
    shown = rows[:_SHOWN_ROWS]
    more = ", ..." if len(rows) > _SHOWN_ROWS else ""
    if id_col:
        ids = ds.select(shown)[id_col]
        return f"{id_col} " + ", ".join(str(i) for i in ids) + more
    return "0-based rows " + ", ".join(str(i) for i in shown) + more
