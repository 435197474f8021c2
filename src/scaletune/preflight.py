"""Checks that need no model or data loading, before anything is built: bad input fails in seconds, and
nothing already written is touched. Ends by claiming the output dir (resume.py).

No torch import here (the `--help` and bad-input paths stay fast): a check that needs torch belongs to build.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from . import data, lora, resume
from .config import Config, ConfigError
from .distributed.backend import Backend
from .dropin import UserParts
from .eval_sets import set_names
from .model_source import check_sources
from .metric_names import best_metric, check_metric_for_best_model
from .tasks import get_task
from .tracking import check_report_to


def preflight(cfg: Config, user: Optional[UserParts] = None) -> Optional[resume.Resume]:
    """Returns the checkpoint this run continues, read once (None: a fresh start)."""
    t = cfg.training
    check_report_to(t.report_to)
    user = user or UserParts()
    d = cfg.data
    if not user.brings_data and d.dataset_name is None and d.train_file is None and not d.train_mixture and t.do_train:
        raise ConfigError("No training data: set dataset_name, train_file or train_mixture (or pass train_dataset to "
                          "run()).")
    if user.brings_data and d.train_mixture:
        raise ConfigError("train_mixture is set and run() was given datasets: the mixture would not be read; drop "
                          "one of them.")
    sets = set_names(cfg, user.eval_dataset)  # several evaluation sets: eval_<set>_<metric>
    # reduce_lr_on_plateau steps on the best metric even when unset (eval_loss, which several sets do not report).
    metric = t.metric_for_best_model or (best_metric(None) if sets and t.lr_scheduler_type == "reduce_lr_on_plateau"
                                         else None)
    if metric:  # a custom compute_metrics's names are only known later (the set part is now)
        check_metric_for_best_model(metric, get_task(cfg.data.task).metric_names
                                    if user.compute_metrics is None else None, cfg.data.task, sets)
    if t.on_nonfinite == "skip" and not Backend.requested().skips_nonfinite:
        raise ConfigError("on_nonfinite=skip is not possible under DeepSpeed, which applies the update inside "
                          "backward before the loss can be checked; use on_nonfinite=stop.")
    if t.use_liger_kernel and user.compute_loss_func is not None:
        raise ConfigError("use_liger_kernel=true computes the loss inside the model, so the compute_loss_func "
                          "passed to run() would not be used: drop one of them.")
    if user.model is not None and t.do_train and not cfg.peft.use_peft and not any(
            p.requires_grad for p in user.model.parameters()):
        raise ConfigError(f"The {type(user.model).__name__} passed to run() has no trainable parameters (all "
                          f"frozen), so training cannot change it: unfreeze some, or set do_train=false.")
    data.check_files(cfg)
    check_sources(cfg.model, needs_model=user.model is None,  # before the output dir is made
                  needs_tokenizer=not user.brings_tokenization)
    lora.preflight(cfg)
    return resume.preflight(t)


def run_config(cfg: Config, resumed: Optional[resume.Resume]) -> Config:
    """The config this run trains with: the one given, except that a resume on another process count keeps
    the checkpoint's global batch with the accumulation `resume.preflight` worked out. A new value, so the
    given config is never rewritten; everything built from it (the Accelerator, the DeepSpeed config, the plan,
    config.yaml, the model card, the trackers) sees the one accumulation that runs. A checkpoint whose run
    searched its batch sizes (auto_find_batch_size) gives them too: no new search."""
    if resumed is None:
        return cfg
    sizes = {**(resumed.batch_sizes or {}), "gradient_accumulation_steps": resumed.accumulation}
    if all(getattr(cfg.training, key) == value for key, value in sizes.items()):
        return cfg
    return dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, **sizes))
