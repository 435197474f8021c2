"""Everything that depends on the backend: Accelerator construction, DeepSpeed config, cross-rank agreement.

The loop never branches on DDP vs DeepSpeed vs CPU; it asks this module.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs


def build_accelerator(cfg) -> Accelerator:
    t = cfg.training
    kwargs_handlers = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # CPU multi-process (and DeepSpeed on CPU) needs gloo; NCCL needs GPUs.
        kwargs_handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(
        mixed_precision=t.mixed_precision,
        # Must equal DeepSpeed's gradient_accumulation_steps; the loop handles the accumulation window itself
        # and compensates the 1/N that accelerate (or DeepSpeed) applies to the loss in backward.
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        # Same seeded sampler as Trainer: data order = f(seed, epoch), so resume can replay it exactly.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=t.data_seed if t.data_seed is not None else t.seed),
        # The loop steps the scheduler once per update itself (and not after an fp16 overflow); accelerate's
        # default would step it num_processes times per update.
        step_scheduler_with_optimizer=False,
        kwargs_handlers=kwargs_handlers,
    )


def all_agree(accelerator: Accelerator, flag: bool) -> bool:
    """True if any rank says True. Host-device sync point (one scalar all-reduce)."""
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)
