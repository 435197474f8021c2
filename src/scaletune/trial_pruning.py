"""A search trial's side of pruning (`python -m scaletune.search`): the run reports each evaluation to the study
and stops when Optuna says the trial is worse than the others at that step.

A trial is an ordinary run in its own process(es); the search names it through the environment (the study's
storage, name and pruner, the trial id, the metric). Rank 0 opens the trial from the shared storage
(`optuna.trial.Trial(study, trial_id)`, Optuna's way to report from another process), reports, and asks
`should_prune`; every rank then agrees on the answer through a collective, so they stop at the same update.
Without those variables no Pruner is built and nothing here imports Optuna.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Mapping, Optional

from .distributed.collectives import all_agree
from .errors import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator

ENV_STORAGE = "SCALETUNE_SEARCH_STORAGE"
ENV_STUDY = "SCALETUNE_SEARCH_STUDY"
ENV_TRIAL_ID = "SCALETUNE_SEARCH_TRIAL_ID"
ENV_METRIC = "SCALETUNE_SEARCH_METRIC"
ENV_PRUNER = "SCALETUNE_SEARCH_PRUNER"
PRUNERS = ("median", "hyperband", "none")
PRUNED_AT = "pruned_at_step"
"""The trial's user attribute the run sets when it stops pruned: the search reads why the run ended from it."""


def make_pruner(name: str):
    """Optuna's pruner for `--pruner`: the search and each trial build the same one (a pruner is not stored)."""
    import optuna

    if name == "median":
        # Pruning from the first finished trial and the first evaluation: trials are whole runs, few and costly.
        return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner {name!r} is not one of {', '.join(PRUNERS)}.")


class Pruner:
    """`report(step, metrics) -> bool`: collective; True on every rank when the trial should stop (pruned)."""

    def __init__(self, accelerator: Accelerator, trial, metric: str):
        self.accelerator = accelerator
        self.trial = trial  # an optuna Trial on the main process, None on the others
        self.metric = metric

    def report(self, step: int, metrics: dict) -> bool:
        prune = False
        if self.trial is not None and self.metric in metrics:
            self.trial.report(float(metrics[self.metric]), step)
            prune = self.trial.should_prune()
            if prune:
                self.trial.set_user_attr(PRUNED_AT, step)
        return all_agree(self.accelerator, prune)


def from_env(accelerator: Accelerator, env: Mapping[str, str] = os.environ) -> Optional[Pruner]:
    """The Pruner of a run started by the search, or None for any other run."""
    if not env.get(ENV_TRIAL_ID):
        return None
    trial = None
    if accelerator.is_main_process:
        import optuna

        study = optuna.load_study(study_name=env[ENV_STUDY], storage=env[ENV_STORAGE],
                                  pruner=make_pruner(env.get(ENV_PRUNER, "median")))
        trial = optuna.trial.Trial(study, int(env[ENV_TRIAL_ID]))
    return Pruner(accelerator, trial, env[ENV_METRIC])
