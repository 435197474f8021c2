"""Metric names, written once: the `eval_` / `test_` prefixes (§8), the default best metric, and the check that
metric_for_best_model names a metric the evaluation reports.

A leaf (no torch, nothing of scaletune's but errors): config, schedule, evaluation, tracking and the entry point
all read these rules.
"""

from __future__ import annotations

from typing import Iterable, Optional

from .errors import ConfigError

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


def check_metric_for_best_model(name: str, known_metric_names: Iterable[str], task: Optional[str] = None) -> None:
    """Refuse a metric_for_best_model (`eval_` prefix optional) that is not among `known_metric_names` (with or
    without the prefix): before the run from the task's metric names, after an evaluation from its metrics."""
    known = [metric_key(m) for m in known_metric_names]
    if metric_key(name) not in known:
        of = f" of the {task} task" if task else ""
        raise ConfigError(f"metric_for_best_model={name!r} is not an evaluation metric{of}; choose one of "
                          f"{', '.join(known)}.")
