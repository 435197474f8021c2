"""Several evaluation sets: `validation_files: {name: file}` or `run(eval_dataset={name: dataset})`, as Trainer's
dict `eval_dataset`. Each set is prepared by the task as the validation split it would be alone, gets its own
loader, and is evaluated alone under `eval_<name>_` (`evaluation.Evaluator`), so under DDP each set's metrics are
a one-process evaluation of it. The name rules are `metric_names`'.

No torch import (preflight reads `set_names`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from .data import load_files
from .conll_format import is_conll_file
from .errors import ConfigError, DataError
from .metric_names import check_eval_set_names

RUN_ARGUMENT = "run(eval_dataset={...})"


def set_names(cfg, eval_dataset: Any) -> list[str]:
    """The names of this run's evaluation sets, checked ([] for one unnamed set): run()'s dict, else
    validation_files (whose names the config checked)."""
    if isinstance(eval_dataset, dict):
        check_eval_set_names(eval_dataset, RUN_ARGUMENT)
        for name, ds in eval_dataset.items():
            if hasattr(ds, "__len__") and len(ds) == 0:
                raise DataError(f"{RUN_ARGUMENT}: the set {name!r} is empty; drop it or give it rows.")
        return list(eval_dataset)
    files = cfg.data.validation_files or {}
    if any(is_conll_file(p) for p in files.values()) and cfg.data.task == "token_classification":
        # tasks/conll.py re-reads the split files as sentences, and knows train/validation/test only.
        raise ConfigError("validation_files cannot hold CoNLL files yet; give each set as JSON/JSONL (tokens and "
                          "tags columns), or use validation_file for one CoNLL set.")
    return list(files)


def load_validation_sets(cfg, streaming: bool = False) -> Optional[dict]:
    """validation_files as {name: raw dataset}, each cut to max_eval_samples as data.load_raw_datasets cuts the
    validation split (None without them). One load per file: a set name need not be a `datasets` split name."""
    d = cfg.data
    if not d.validation_files:
        return None
    sets = {}
    for name, path in d.validation_files.items():
        ds = load_files({"validation": path}, cfg.model.cache_dir, streaming)["validation"]
        if d.max_eval_samples is not None and d.task not in ("mlm", "clm"):  # the LM tasks count blocks
            ds = ds.take(d.max_eval_samples) if streaming else ds.select(range(min(d.max_eval_samples, len(ds))))
        if not streaming and len(ds) == 0:
            raise DataError(f"The validation set {name!r} is empty; check validation_files[{name!r}] {path!r}.")
        sets[name] = ds
    return sets


def prepare_with_sets(task, raw, sets: dict, tokenizer, cfg, main_process_first: Callable):
    """The task's `PreparedData` for `raw` (train / test) with `validation` the {name: prepared set}. The first
    set is prepared with the other splits; each further one next to train alone, because the task reads what it
    needs (the label set, the text column) from train: a set lacking a label keeps the label ids."""
    names = list(sets)
    prepared = task.prepare_data(type(raw)({**raw, "validation": sets[names[0]]}), tokenizer, cfg,
                                 main_process_first)
    validation = {names[0]: prepared.validation}
    train = {"train": raw["train"]} if "train" in raw else {}
    for name in names[1:]:
        alone = task.prepare_data(type(raw)({**train, "validation": sets[name]}), tokenizer, cfg,
                                  main_process_first)
        validation[name] = alone.validation
    prepared.validation = validation
    return prepared


def as_dict(eval_loader: Any) -> dict[Optional[str], Any]:
    """The evaluation loader(s) as {name: loader}; one unnamed set (or none) under None."""
    return eval_loader if isinstance(eval_loader, dict) else {None: eval_loader}


def from_dict(loaders: dict[Optional[str], Any]) -> Any:
    """`as_dict`'s inverse."""
    return loaders[None] if None in loaders else loaders
