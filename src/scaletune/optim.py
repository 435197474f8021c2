"""The optimizer (Trainer's names and parameter groups) and the learning-rate schedule.

The optimizer classes and their arguments come from transformers' own optimizer handlers
(`transformers.trainer_optimizer`), so `optim: adafactor` or `optim: sgd` with `optim_args` build exactly what
Trainer builds; only the parameter groups are ours (Trainer's rule: no weight decay on biases and norms).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError

# Trainer.get_decay_parameter_names' patterns: no weight decay on biases and norm weights.
_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]

# Schedules that step on an evaluation metric, not once per update (Trainer steps them in evaluate()).
METRIC_SCHEDULES = ("reduce_lr_on_plateau",)


def build_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS, OptimizerContext, _parse_optim_args
    from transformers.trainer_pt_utils import get_parameter_names
    from transformers.training_args import OptimizerNames

    decay = set(get_parameter_names(model, [nn.LayerNorm], _NO_DECAY_PATTERNS))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # Same group order as Trainer (decay first), so optimizer state lines up for parity checks.
    groups = [
        {"params": [p for n, p in params if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
    ]
    # An empty group (LoRA on weights only: no trainable bias or norm) goes: DeepSpeed drops it from the
    # optimizer it wraps, and a scheduler built with the empty group then has one rate too many. (An
    # evaluation-only run of a frozen model keeps one empty group: torch refuses an optimizer without any.)
    groups = [g for g in groups if g["params"]] or groups[:1]
    # Trainer's handlers read `args.optim`: ours has the same name and values. The default, fused AdamW, is
    # Trainer's default too; the unfused kernel rounds differently (tests/parity/test_parity_loss.py).
    context = OptimizerContext(args=args, model=model, optimizer_kwargs={"lr": args.learning_rate},
                               adam_kwargs={"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon},
                               optim_args=_parse_optim_args(args.optim_args))
    optimizer_cls, kwargs = _OPTIMIZER_HANDLERS[OptimizerNames(args.optim)](context)
    try:
        return optimizer_cls(groups, **kwargs)
    except TypeError as e:  # an optim_args key the optimizer does not take
        raise ConfigError(f"optim={args.optim} does not accept these arguments ({e}); fix optim_args.") from None


def build_scheduler(optimizer, args, plan):
    from transformers import get_scheduler

    try:
        return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=plan.warmup_steps,
                             num_training_steps=plan.max_steps,
                             scheduler_specific_kwargs=dict(args.lr_scheduler_kwargs or {}))
    except TypeError as e:  # an lr_scheduler_kwargs key the schedule does not take
        raise ConfigError(f"lr_scheduler_type={args.lr_scheduler_type} does not accept lr_scheduler_kwargs="
                          f"{args.lr_scheduler_kwargs} ({e}).") from None


def reapply_schedule(scheduler, args) -> None:
    """After a resume: the schedule of *this* config, at the restored step. `load_state` restores the old
    run's base rates and each group's current rate, so a changed learning_rate or max_steps (allowed on resume,
    and reported) would otherwise be ignored until the schedule's end."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps it
    lambdas = getattr(inner, "lr_lambdas", None)
    if lambdas is None:  # reduce_lr_on_plateau: its rate follows the metric, not the step
        return
    inner.base_lrs = [args.learning_rate for _ in inner.base_lrs]
    rates = [base * fn(inner.last_epoch) for base, fn in zip(inner.base_lrs, lambdas)]
    for group, rate in zip(inner.optimizer.param_groups, rates):
        group["lr"] = rate
    inner._last_lr = rates
