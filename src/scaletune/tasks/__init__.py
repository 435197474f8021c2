"""Task registry: `task: classification | mlm` picks one module here."""

from __future__ import annotations

import importlib

from .base import PreparedData, Task

# name -> "module:Class"; a new task is one module plus one line here.
TASKS = {
    "classification": "scaletune.tasks.classification:ClassificationTask",
    "mlm": "scaletune.tasks.mlm:MaskedLMTask",
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; choose one of {', '.join(TASKS)}.")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["PreparedData", "Task", "TASKS", "get_task"]
