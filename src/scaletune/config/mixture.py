"""The rules of `train_mixture` (several weighted training sources) that need no data: each source's shape, its
weight, the names its counts are logged under. The loading and mixing is `scaletune.mixture`'s.

No torch, no datasets: checked when the config is built.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

from ..errors import ConfigError

SOURCE_KEYS = ("path", "name", "config", "weight", "columns")
EXAMPLE = "train_mixture: [{path: a.csv, weight: 0.7}, {name: packaged:rotten_tomatoes, weight: 0.3}]"


def check_train_mixture(sources, data) -> None:
    """Each source a mapping with `path` or `name` (not both), a positive `weight`, optional `config` (with a
    `name`) and `columns` ({old: new}); the mixture is the training data, so not with train_file / dataset_name.
    YAML/JSON only: a list of mappings has no command-line form that the CLI parser's style could carry."""
    if isinstance(sources, str):
        raise ConfigError(f"train_mixture={sources!r} is not a list of sources; it is set in a YAML/JSON config "
                          f"file (no command-line form), e.g. {EXAMPLE}.")
    if not isinstance(sources, list) or not sources:
        raise ConfigError(f"train_mixture must be a non-empty list of sources, e.g. {EXAMPLE}.")
    for i, source in enumerate(sources):
        _check_source(i, source)
    for key in ("train_file", "dataset_name"):
        if getattr(data, key) is not None:
            raise ConfigError(f"train_mixture and {key} are both set: the mixture is the training data; add "
                              f"{getattr(data, key)!r} to train_mixture as a source, or drop train_mixture.")


def _check_source(i: int, source) -> None:
    where = f"train_mixture[{i}]"
    if not isinstance(source, dict):
        raise ConfigError(f"{where}={source!r} is not a mapping: give each source as {{path: FILE, weight: W}} or "
                          f"{{name: DATASET, weight: W}}.")
    unknown = [k for k in source if k not in SOURCE_KEYS]
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; a source takes "
                          f"{', '.join(SOURCE_KEYS)}.")
    has_path, has_name = source.get("path") is not None, source.get("name") is not None
    if has_path == has_name:
        raise ConfigError(f"{where} has {'both path and name' if has_path else 'neither path nor name'}: give "
                          f"one, `path: FILE` (a local file) or `name: DATASET` (as dataset_name takes).")
    for key in ("path", "name", "config"):
        if source.get(key) is not None and not isinstance(source[key], str):
            raise ConfigError(f"{where}.{key}={source[key]!r} is not a string (in YAML, put it in quotes).")
    if source.get("config") is not None and not has_name:
        raise ConfigError(f"{where}.config is set without name: config is the Hub dataset's configuration "
                          f"(as dataset_config_name); drop it for a file.")
    weight = source.get("weight")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise ConfigError(f"{where}.weight={weight!r} must be a positive number (weights are relative: 0.7 and "
                          f"0.3, or 7 and 3).")
    columns = source.get("columns")
    if columns is not None and not (isinstance(columns, dict) and columns and all(
            isinstance(k, str) and isinstance(v, str) and k and v for k, v in columns.items())):
        raise ConfigError(f"{where}.columns={columns!r} must map the source's column names to the ones the run "
                          f"reads, e.g. {{review: text, stars: label}}.")


def source_names(sources: list[dict]) -> list[str]:
    """The name each source's counts are logged under (`mixture_<name>_samples`): the file's stem or the
    dataset's name (without `packaged:`), letters, digits, `_` and `-` only; a repeated name gets `_2`, `_3`."""
    names: list[str] = []
    for source in sources:
        raw = Path(source["path"]).stem if source.get("path") else source["name"].split(":", 1)[-1]
        if source.get("config"):
            raw += f"_{source['config']}"
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", raw).strip("_") or "source"
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.append(name)
    return names


def probabilities(sources: list[dict]) -> list[float]:
    """The weights as sampling probabilities (they need not sum to 1)."""
    total = float(sum(s["weight"] for s in sources))
    return [s["weight"] / total for s in sources]


def stopping_strategy(stop: Optional[str], samples: Optional[int]) -> str:
    """datasets' stopping_strategy: the given rule; a fixed number of samples draws from every source until each
    was used up at least once (a source used up starts again) and is then cut."""
    if samples is not None:
        return "all_exhausted"
    return stop or "first_exhausted"
