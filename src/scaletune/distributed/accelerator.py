"""The Accelerator of a run: gloo on CPU, every collective bounded by ddp_timeout, the DeepSpeed and FSDP2
plugins (FSDP2 on CPU included), the model's memory knobs before `prepare`, and the process group's lifetime.

What `./launch` computes before a launch (topology, global batch size) is `launch_plan.py`'s.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import TYPE_CHECKING, Optional

from ..errors import ConfigError
from .backend import Backend
from .collectives import release_host_group
from .deepspeed import build_deepspeed_plugin, deepspeed_unwrapping, skip_deepspeed_shm_op
from .fsdp import check_fsdp_launch, fsdp_layers_to_wrap, switch_to_fsdp_on_cpu, untie_fsdp_aliases

if TYPE_CHECKING:
    from accelerate import Accelerator

# torch / accelerate are imported inside the functions that need them: preflight checks and `./launch`'s plan
# use this package and should cost a YAML parse, not a torch import.


def build_accelerator(cfg) -> Accelerator:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    t = cfg.training
    backend = Backend.requested()
    deepspeed_unwrapping(backend.is_deepspeed)
    fsdp_on_cpu = check_fsdp_launch(os.environ, torch.cuda.is_available())
    plugin = build_deepspeed_plugin(t) if backend.is_deepspeed else None
    fsdp_plugin = None
    if backend.is_fsdp:
        from accelerate.utils import FullyShardedDataParallelPlugin

        fsdp_plugin = FullyShardedDataParallelPlugin()  # reads fsdp_config from the launcher's FSDP_* variables
    # CPU multi-process needs gloo (NCCL needs GPUs); DeepSpeed on CPU would otherwise ask for oneCCL.
    gloo = not torch.cuda.is_available() and (backend.world_size > 1 or backend.is_deepspeed)
    if gloo and backend.is_deepspeed:
        skip_deepspeed_shm_op()
    # Every collective waits at most ddp_timeout: a rank that died or hangs ends the others with an error
    # instead of a silent 30-minute wait.
    kwargs_handlers = [InitProcessGroupKwargs(backend="gloo" if gloo else None,
                                              timeout=timedelta(seconds=t.ddp_timeout))]
    if t.ddp_find_unused_parameters is not None:
        from accelerate.utils import DistributedDataParallelKwargs

        kwargs_handlers.append(DistributedDataParallelKwargs(find_unused_parameters=t.ddp_find_unused_parameters))
    dynamo = None  # None: the Accelerate config's dynamo_config decides
    # torch_compile compiles the step's forward + loss (fast_path) where the backend allows it; accelerate
    # compiles the model only under DeepSpeed and FSDP2, which own their forward.
    if t.torch_compile and not backend.compiles_step:
        from accelerate.utils import TorchDynamoPlugin

        dynamo = TorchDynamoPlugin(backend="inductor", mode=t.torch_compile_mode or "default")
    _forget_earlier_run()
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        # Must equal DeepSpeed's gradient_accumulation_steps; the loop handles the accumulation window itself
        # and compensates the 1/N that accelerate (or DeepSpeed) applies to the loss in backward.
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        # Same seeded sampler as Trainer: data order = f(seed, epoch), so resume can replay it exactly.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=t.resolved_data_seed),
        # The loop steps the scheduler once per update itself (and not after an fp16 overflow); accelerate's
        # default would step it num_processes times per update.
        step_scheduler_with_optimizer=False,
        deepspeed_plugin=plugin,
        fsdp_plugin=fsdp_plugin,
        # accelerate compiles in prepare(): engine.compile under DeepSpeed, torch.compile under FSDP2.
        dynamo_plugin=dynamo,
        kwargs_handlers=kwargs_handlers,
    )
    if fsdp_on_cpu:
        switch_to_fsdp_on_cpu(accelerator, fsdp_plugin)
    _hold_world_group()
    return accelerator


def _forget_earlier_run() -> None:
    """A run() after another in the same process (a second fine-tuning stage, a trial) gets its own settings.
    accelerate keeps one AcceleratorState and GradientState per process, and a second Accelerator refuses
    another mixed precision (ValueError), keeps the first one's DeepSpeed and dynamo plugins and refuses a new
    DeepSpeed plugin. Those two are reset; PartialState (the process group, ranks, device) is kept, so the
    launched processes stay one group."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


# The default process group's Python handle, held from the first Accelerator to the interpreter's exit.
_world_group: list = []


def _hold_world_group() -> None:
    """Keep the Python handle of the process group alive longer than any model that uses it.

    Otherwise DDP's Reducer holds the last reference when the run's locals go, and it destroys the gloo group
    while holding the GIL. The group's destructor joins its worker threads. If one of those threads is still
    freeing a finished collective's tensors, it waits for the GIL, and the rank hangs at exit (pytorch#56297;
    3 of 12 two-process drop-in runs without DeepSpeed's slow import on the way out, 0 of 35 with this handle).
    The handle's own destructor releases the GIL. The group outlives run(): the script goes on after it (another
    run(), its own collectives), so it is destroyed at the interpreter's exit, through this handle."""
    import atexit

    import torch.distributed as dist

    world = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    if world is not None and not _world_group:
        atexit.register(_destroy_world_group)  # once: later runs hold the same group (or one the script made)
    _world_group[:] = [world] if world is not None else []


def free_finished_run() -> None:
    """The end of `run()`: the run's model is freed now (`gc.collect` frees one kept in a reference cycle, and
    with it DDP's Reducer), so that a later run has the memory; the process group stays for the script."""
    import gc

    gc.collect()


def _destroy_world_group() -> None:
    """At exit: the models are gone, the group is destroyed (unless the script destroyed it itself), and the
    handle, its last owner, frees it with the GIL released."""
    import gc

    import torch.distributed as dist

    gc.collect()
    if _world_group and dist.is_initialized() and dist.group.WORLD is _world_group[0]:
        dist.destroy_process_group()  # every group: the host group of collectives.py too
    release_host_group()
    _world_group.clear()


def configure_model(model, training, accelerator: Optional[Accelerator] = None):
    """Memory knobs applied to the model before `prepare` (and, under the FSDP2 `accelerator`, its units).
    Returns the model."""
    plugin = accelerator.state.fsdp_plugin if accelerator is not None and Backend.of(accelerator).is_fsdp else None
    if plugin is not None:
        from accelerate.state import PartialState

        for name in untie_fsdp_aliases(model):
            PartialState().print(f"FSDP2: {name} is kept under the output layer's name only (a parameter can "
                                 f"belong to one FSDP unit); the export stores it once, as from_pretrained expects.")
        if plugin.transformer_cls_names_to_wrap is None:
            plugin.transformer_cls_names_to_wrap = fsdp_layers_to_wrap(model)
    if training.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"gradient_checkpointing=true, but {type(model).__name__} does not support it.")
        # Non-reentrant: works with DDP's no_sync, ZeRO-3's parameter gathering and inputs without grad.
        # (transformers 5 renamed gradient_checkpointing_enable; the old name warns.)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False  # a KV cache is useless in training and conflicts with recompute
    return model

