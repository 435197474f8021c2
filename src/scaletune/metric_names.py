"""Metric names, written once: the `eval_` / `test_` prefixes (§8), the default best metric, the names of several
evaluation sets (`eval_<set>_<metric>`, Trainer's `metric_key_prefix=f"eval_{name}"`), and the check that
metric_for_best_model names a metric the evaluation reports.

A leaf (no torch, nothing of scaletune's but errors): config, schedule, evaluation, tracking and the entry point
all read these rules.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

from .errors import ConfigError, suggestion

SPLITS = ("eval", "test")
"""The prefixes of evaluation metric keys (`eval_loss`, `test_accuracy`); any other key is a training metric."""
DEFAULT_BEST_METRIC = "loss"
"""What decides the best checkpoint when metric_for_best_model is unset (as Trainer: eval_loss)."""


def metric_key(name: str) -> str:
    """§8: the evaluation metric key of a metric name -- an `eval_` prefix is added if missing."""
    return name if name.startswith("eval_") else f"eval_{name}"


def bare_name(name: str) -> str:
    """The metric without its `eval_` prefix (`eval_loss` -> `loss`)."""
    return name.removeprefix("eval_")


def best_metric(metric_for_best_model: Optional[str]) -> str:
    """The metric that decides the best checkpoint: metric_for_best_model, else the default (loss)."""
    return metric_for_best_model or DEFAULT_BEST_METRIC


def split_of(key: str) -> Optional[str]:
    """`eval` or `test` for an evaluation metric key (`eval_f1`, `test_loss`), None for a training one."""
    return next((split for split in SPLITS if key.startswith(split + "_")), None)


_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
"""An evaluation set's name: letters, digits, `_` and `-` (a `/` or a space would break the tracker keys: W&B
reads `/` as a section)."""


def eval_set_prefix(name: str) -> str:
    """The metric key prefix of the evaluation set `name`, as Trainer's `metric_key_prefix=f"eval_{name}"`."""
    return f"eval_{name}"


def check_eval_set_names(sets, source: str) -> None:
    """Refuse, in one line naming `source` (the config key or run() argument), a mapping of evaluation sets that
    is empty or has a name that would break or collide with metric keys."""
    if not isinstance(sets, dict) or not sets:
        raise ConfigError(f"{source} must map at least one set name to its data ({{name: ...}}); got {sets!r}.")
    for name in sets:
        if not isinstance(name, str) or not _SET_NAME.fullmatch(name):
            raise ConfigError(f"{source}: set name {name!r} would break the metric keys (eval_<name>_loss); use "
                              f"letters, digits, '_' and '-' only, starting with a letter or digit.")
        if name in SPLITS:
            raise ConfigError(f"{source}: set name {name!r} collides with the {name} split's metrics; rename it "
                              f"(e.g. {name}_set).")


def check_metric_for_best_model(name: str, known_metric_names: Optional[Iterable[str]], task: Optional[str] = None,
                                eval_sets: Optional[Iterable[str]] = None) -> None:
    """Refuse a metric_for_best_model (`eval_` prefix optional) that is not among `known_metric_names` (with or
    without the prefix): before the run from the task's metric names, after an evaluation from its metrics.
    With several evaluation sets (`eval_sets`), a metric is `eval_<set>_<metric>`; `known_metric_names` None (a
    user's compute_metrics, known only later) checks the set part alone."""
    sets = list(eval_sets or ())
    if sets and known_metric_names is None:
        if not any(metric_key(name).startswith(eval_set_prefix(s) + "_") for s in sets):
            raise ConfigError(f"metric_for_best_model={name!r} names no evaluation set; with several sets it is "
                              f"eval_<set>_<metric>, <set> one of {', '.join(sets)}.")
        return
    if known_metric_names is None:
        return
    known = ([f"{eval_set_prefix(s)}_{bare_name(m)}" for s in sets for m in known_metric_names] if sets
             else [metric_key(m) for m in known_metric_names])
    if metric_key(name) not in known:
        of = f" of the {task} task" if task else ""
        with_sets = f" with the evaluation sets {', '.join(sets)}" if sets else ""
        if sets and metric_key(name) == metric_key(DEFAULT_BEST_METRIC):
            # Trainer's default too (load_best_model_at_end, early stopping): it fails at the first evaluation.
            with_sets += " (eval_loss, the default, is a single set's)"
        raise ConfigError(f"metric_for_best_model={name!r} is not an evaluation metric{of}{with_sets}; choose one "
                          f"of {', '.join(known)}.{suggestion(metric_key(name), known)}")
