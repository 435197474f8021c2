"""AdamW with Trainer's parameter groups, and the learning-rate schedule."""

from __future__ import annotations

import torch
from torch import nn

# Trainer.get_decay_parameter_names' patterns: no weight decay on biases and norm weights.
_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def build_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    from transformers.trainer_pt_utils import get_parameter_names

    decay = set(get_parameter_names(model, [nn.LayerNorm], _NO_DECAY_PATTERNS))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # Same group order as Trainer (decay first), so optimizer state lines up for parity checks.
    groups = [
        {"params": [p for n, p in params if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
    ]
    # fused=True: Trainer's default optimizer (optim="adamw_torch_fused"). The unfused kernel rounds differently,
    # so this keeps runs bit-identical to Trainer's (tests/test_parity_loss.py) -- and it is faster on GPU.
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon, fused=True)


def build_scheduler(optimizer, args, plan):
    from transformers import get_scheduler

    return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=plan.warmup_steps,
                         num_training_steps=plan.max_steps)
