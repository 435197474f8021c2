"""Task registry: `task: classification | regression | multilabel | mlm | token_classification | clm` picks one
module here."""

from __future__ import annotations

import importlib
from typing import Optional

from ..errors import ConfigError
from .base import PreparedData, Task

# name -> "module:Class"; a new task is one module plus one line here.
TASKS = {
    "classification": "scaletune.tasks.classification:ClassificationTask",
    "regression": "scaletune.tasks.regression:RegressionTask",
    "multilabel": "scaletune.tasks.multilabel:MultiLabelTask",
    "mlm": "scaletune.tasks.mlm:MaskedLMTask",
    "token_classification": "scaletune.tasks.token_classification:TokenClassificationTask",
    "clm": "scaletune.tasks.clm:CausalLMTask",
}

# transformers' `config.problem_type` of an exported sequence-classification model -> the task that reads it.
PROBLEM_TYPES = {
    None: "classification",
    "single_label_classification": "classification",
    "regression": "regression",
    "multi_label_classification": "multilabel",
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"Unknown task {name!r}; choose one of {', '.join(TASKS)}.")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def task_for_problem_type(problem_type: Optional[str]) -> str:
    """The task name for an exported model's `config.problem_type` (what `predict` needs to write its file)."""
    if problem_type not in PROBLEM_TYPES:
        raise ConfigError(f"The model's problem_type {problem_type!r} is not one scaletune predicts; expected one "
                          f"of {', '.join(str(p) for p in PROBLEM_TYPES)}.")
    return PROBLEM_TYPES[problem_type]


__all__ = ["PreparedData", "Task", "TASKS", "PROBLEM_TYPES", "get_task", "task_for_problem_type"]
