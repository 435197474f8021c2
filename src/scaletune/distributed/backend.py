"""The backend a run trains under, as one object every module asks (as torchtitan's ParallelDims).

`Backend.requested()` answers before the Accelerator exists, from what `accelerate launch` exports (no torch
import: preflight checks and `./launch` use it); `Backend.of(accelerator)` answers after, from the Accelerator
that was built. Its properties name the reasons a module branches on the backend, so no module compares
accelerate's distributed types or reads the launcher's variables itself.

DeepSpeed is chosen by the Accelerate config (`distributed_type: DEEPSPEED`), which `accelerate launch` turns
into `ACCELERATE_USE_DEEPSPEED=true`; FSDP2 the same way (`distributed_type: FSDP`, `fsdp_version: 2`:
`ACCELERATE_USE_FSDP=true`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

KINDS = ("single", "ddp", "deepspeed", "fsdp2")


def as_bool(value) -> bool:
    """A boolean as accelerate writes it into the environment (and DeepSpeed configs may): "true"/"True"/True."""
    return str(value).lower() == "true"


def cpu_requested(env: Mapping[str, str] = os.environ) -> bool:
    """`--cpu` (`use_cpu: true`): accelerate runs on the CPU even where a GPU is visible."""
    return as_bool(env.get("ACCELERATE_USE_CPU", "false"))


def effective_mixed_precision(training, env: Mapping[str, str] = os.environ) -> str:
    """--bf16/--fp16 win; otherwise the Accelerate config's `mixed_precision` (exported by the launcher).

    The same rule `Accelerator(mixed_precision=None)` applies, so DeepSpeed and accelerate agree.
    """
    return training.mixed_precision or env.get("ACCELERATE_MIXED_PRECISION", "no").lower() or "no"


@dataclass(frozen=True)
class Backend:
    kind: str  # "single" | "ddp" | "deepspeed" | "fsdp2"
    world_size: int
    zero_stage: Optional[int] = None  # DeepSpeed only; None from `requested` (the stage is in its config)
    device_type: Optional[str] = "cpu"  # None from `requested`: the device is known once torch is imported

    def __post_init__(self):
        if self.kind not in KINDS:  # a programming error, never user input
            raise ValueError(f"Backend kind {self.kind!r} is not one of {KINDS}")

    @classmethod
    def requested(cls, env: Mapping[str, str] = os.environ) -> Backend:
        """The backend the launcher asked for. With both DeepSpeed and FSDP asked, DeepSpeed (as accelerate)."""
        world_size = int(env.get("WORLD_SIZE", "1"))
        if as_bool(env.get("ACCELERATE_USE_DEEPSPEED", "false")):
            kind = "deepspeed"
        elif as_bool(env.get("ACCELERATE_USE_FSDP", "false")):
            kind = "fsdp2"  # FSDP1 is refused before anything is built (fsdp.check_fsdp_launch)
        else:
            kind = "ddp" if world_size > 1 else "single"
        return cls(kind, world_size, device_type=None)

    @classmethod
    def of(cls, accelerator) -> Backend:
        """The backend of a built Accelerator (FSDP2 on CPU included: `fsdp.switch_to_fsdp_on_cpu`)."""
        from accelerate.utils import DistributedType

        world_size, device_type = accelerator.num_processes, accelerator.device.type
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            config = accelerator.state.deepspeed_plugin.deepspeed_config
            return cls("deepspeed", world_size, int(config["zero_optimization"].get("stage", 0)), device_type)
        if getattr(accelerator, "is_fsdp2", False):
            return cls("fsdp2", world_size, device_type=device_type)
        return cls("ddp" if world_size > 1 else "single", world_size, device_type=device_type)

    @property
    def is_deepspeed(self) -> bool:
        return self.kind == "deepspeed"

    @property
    def is_fsdp(self) -> bool:
        """FSDP2 (`fully_shard`): parameters are DTensor shards, state dicts go through torch.distributed.checkpoint."""
        return self.kind == "fsdp2"

    @property
    def is_zero3(self) -> bool:
        """DeepSpeed ZeRO-3: a parameter is whole only inside `deepspeed.zero.GatheredParameters`."""
        return self.zero_stage == 3

    @property
    def shards_parameters(self) -> bool:
        """No rank holds the whole model (ZeRO-3, FSDP2): reading or writing weights is a collective."""
        return self.is_zero3 or self.is_fsdp

    @property
    def engine_saves(self) -> bool:
        """DeepSpeed and FSDP2 write their own (collective, sharded) checkpoints, a LoRA adapter's weights
        included: no background writer, and no separate adapter load on resume."""
        return self.is_deepspeed or self.is_fsdp

    @property
    def compiles_step(self) -> bool:
        """Whether scaletune's fast path may compile the step (forward + loss). DeepSpeed's engine and FSDP2's
        sharded modules own their forward (hooks that gather parameters, engine bookkeeping), so accelerate
        compiles them its way (`engine.compile`, `torch.compile` of the sharded model); one process or DDP
        compiles the step (DDP's module under dynamo's DDP optimizer: graphs split at gradient buckets)."""
        return self.kind in ("single", "ddp")

    @property
    def host_clipping(self) -> bool:
        """The gradients are plain host tensors (one process or DDP on CPU), so testing the clipping
        coefficient on the host costs no device sync (`collectives.clip_gradients`)."""
        return self.kind in ("single", "ddp") and self.device_type == "cpu"

    @property
    def skips_nonfinite(self) -> bool:
        """Whether a non-finite update can be left unapplied (on_nonfinite=skip): not under DeepSpeed, which
        applies the update inside backward, before the loss can be checked."""
        return not self.is_deepspeed

    @property
    def unpickles_checkpoints(self) -> bool:
        """DeepSpeed resumes by unpickling its engine checkpoint (the others load with weights_only=True), so
        a checkpoint from elsewhere is loaded only when trusted."""
        return self.is_deepspeed

    @property
    def accumulates_in_engine(self) -> bool:
        """DeepSpeed's engine accumulates the micro-batches' gradients and reduces them at the boundary it is
        told about (`sync_gradients`); the others need accelerate's `no_sync` before the last micro-batch."""
        return self.is_deepspeed

    @property
    def runs_fp16_itself(self) -> bool:
        """DeepSpeed runs fp16 in its engine (loss scaling included), not through accelerate's autocast."""
        return self.is_deepspeed

