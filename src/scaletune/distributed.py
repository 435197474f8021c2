"""Everything that depends on the backend: Accelerator construction, DeepSpeed and FSDP2 set-up, cross-rank agreement.

The loop never branches on DDP vs DeepSpeed vs FSDP2 vs CPU; it asks this module (and `checkpoint.py` for the
backend-specific disk formats).

DeepSpeed is chosen by the Accelerate config (`distributed_type: DEEPSPEED`), which `accelerate launch` turns
into `ACCELERATE_USE_DEEPSPEED=true` plus the ZeRO settings in the environment. Here its config's "auto"
values (batch sizes, accumulation, clipping, precision) are filled from the training config, and an explicit
value that disagrees is an error naming both values, raised before the model is loaded.

FSDP2 is chosen the same way (`distributed_type: FSDP`, `fsdp_version: 2`: `ACCELERATE_USE_FSDP=true` plus
`FSDP_*` variables). accelerate 1.15 runs FSDP on GPUs only and silently falls back to DDP on CPU; with the
switch `SCALETUNE_FSDP_ON_CPU=1` (set by `./launch <fsdp preset> --cpu N`, never on a GPU launch) the
Accelerator is turned into a real FSDP2 one over gloo (`_fsdp_on_cpu`). Without the switch, FSDP on CPU is an
error rather than a DDP run that calls itself FSDP.

What `./launch` computes before a launch (topology, global batch size) is `launch_plan.py`'s.
"""

from __future__ import annotations

import copy
import os
from datetime import timedelta
from typing import TYPE_CHECKING, Mapping, Optional

from .config import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator

# torch / accelerate are imported inside the functions that need them: preflight checks and `./launch`'s plan
# use this module and should cost a YAML parse, not a torch import.

# --------------------------------------------------------------------------- pure decisions


def deepspeed_requested(env: Mapping[str, str] = os.environ) -> bool:
    """Whether `accelerate launch` was given a DeepSpeed config (it exports ACCELERATE_USE_DEEPSPEED)."""
    return env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def fsdp_requested(env: Mapping[str, str] = os.environ) -> bool:
    """Whether `accelerate launch` was given an FSDP config (it exports ACCELERATE_USE_FSDP)."""
    return env.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


FSDP_ON_CPU_SWITCH = "SCALETUNE_FSDP_ON_CPU"


def check_fsdp_launch(env: Mapping[str, str], cuda_available: bool) -> bool:
    """Whether this FSDP launch needs the CPU workaround; a launch that cannot give real FSDP2 is a ConfigError.

    Pure (the environment and whether a GPU is visible in, a decision out), so it is checked before anything
    is built: FSDP1 is not supported (its checkpoint and state-dict paths differ), and FSDP on CPU without the
    switch would silently be DDP.
    """
    if not fsdp_requested(env):
        return False
    version = env.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(f"The accelerate config asks for FSDP version {version}, but scaletune supports FSDP2 only: "
                          f"set fsdp_version: 2 in its fsdp_config (see accelerate_configs/fsdp2.yaml).")
    on_cpu = _as_bool(env.get("ACCELERATE_USE_CPU", "false")) or not cuda_available
    if on_cpu and env.get(FSDP_ON_CPU_SWITCH) != "1":
        raise ConfigError(f"FSDP was requested on CPU, where accelerate silently trains DDP instead: launch with "
                          f"`./launch <fsdp preset> --cpu N`, or set {FSDP_ON_CPU_SWITCH}=1 for real FSDP2 over gloo.")
    return on_cpu


def effective_mixed_precision(training, env: Mapping[str, str] = os.environ) -> str:
    """--bf16/--fp16 win; otherwise the Accelerate config's `mixed_precision` (exported by the launcher).

    The same rule `Accelerator(mixed_precision=None)` applies, so DeepSpeed and accelerate agree.
    """
    return training.mixed_precision or env.get("ACCELERATE_MIXED_PRECISION", "no").lower() or "no"


def global_batch_size(training, world_size: int) -> int:
    """Examples per optimizer update: per-device micro-batch x accumulation steps x processes."""
    return training.global_batch_size(world_size)


def _as_bool(value) -> bool:
    return str(value).lower() == "true"


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return _as_bool(a) == _as_bool(b)
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return a == b


def fill_deepspeed_config(ds_config: dict, training, world_size: int, mixed_precision: str) -> dict:
    """DeepSpeed config with its training-derived values filled from the training config.

    Pure: returns a new dict. A value that is "auto" or absent is filled; an explicit value that disagrees
    with the training config is a ConfigError listing every disagreement with both values. Values that depend
    on the model (`reduce_bucket_size`, `stage3_*` "auto") are left for accelerate, which fills them from
    `model.config.hidden_size` in `prepare`.
    """
    cfg = copy.deepcopy(ds_config)
    if "zero_optimization" not in cfg:
        raise ConfigError('The DeepSpeed config has no "zero_optimization" section: add one with a "stage".')
    for section in ("optimizer", "scheduler"):
        if section in cfg:
            raise ConfigError(
                f'The DeepSpeed config has a "{section}" section, but scaletune builds AdamW and the learning-rate '
                f"schedule from the training config (learning_rate, weight_decay, adam_*, lr_scheduler_type, "
                f'warmup_steps): remove "{section}" from the DeepSpeed config.'
            )
    if str(cfg["zero_optimization"].get("stage", 0)) == "auto":
        raise ConfigError('zero_optimization.stage cannot be "auto": set 0, 1, 2 or 3.')
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"mixed_precision={mixed_precision!r} is not supported with DeepSpeed; use no, bf16 or fp16.")

    t = training
    # ds key -> (value from the training config, where that value comes from, how to change it)
    wanted = {
        "train_micro_batch_size_per_gpu": (t.per_device_train_batch_size, "per_device_train_batch_size"),
        "gradient_accumulation_steps": (t.gradient_accumulation_steps, "gradient_accumulation_steps"),
        "train_batch_size": (
            global_batch_size(t, world_size),
            f"per_device_train_batch_size x gradient_accumulation_steps x processes = "
            f"{t.per_device_train_batch_size} x {t.gradient_accumulation_steps} x {world_size}",
        ),
        # DeepSpeed clips inside its step (0 = off); accelerator.clip_grad_norm_ only reports its norm.
        "gradient_clipping": (float(t.max_grad_norm), "max_grad_norm"),
        "fp16.enabled": (mixed_precision == "fp16", f"mixed precision {mixed_precision!r} (--fp16 / mixed_precision)"),
        "bf16.enabled": (mixed_precision == "bf16", f"mixed precision {mixed_precision!r} (--bf16 / mixed_precision)"),
    }
    mismatches = []
    for key, (value, source) in wanted.items():
        node, leaf = cfg, key
        if "." in key:
            section, leaf = key.split(".", 1)
            if not isinstance(cfg.get(section, {}), dict):
                raise ConfigError(f'DeepSpeed config "{section}" must be a mapping.')
            node = cfg.setdefault(section, {})
        current = node.get(leaf, "auto")
        if current == "auto":
            node[leaf] = value
        elif not _same(current, value):
            mismatches.append(f"  - DeepSpeed {key}={current!r} but the training config gives {value!r} ({source})")
    if mismatches:
        raise ConfigError(
            "The DeepSpeed config disagrees with the training config:\n" + "\n".join(mismatches) +
            '\nSet these DeepSpeed values to "auto" (or remove them from the accelerate/DeepSpeed config) so they '
            "follow the training config, or change the training options to match."
        )

    zero = cfg["zero_optimization"]
    if int(zero.get("stage", 0)) == 3:
        # The exported model and every checkpoint's model.safetensors are consolidated from the shards, which
        # DeepSpeed only allows with this flag (accelerate's default is false).
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return cfg


def adjust_for_cpu_only(ds_config: dict) -> dict:
    """DeepSpeed on a machine without a GPU (tests, laptops): avoid ops that JIT-compile for minutes.

    With offloading, DeepSpeed swaps AdamW for its C++ CPUAdam, compiled on first use (~2-6 min on 2 cores).
    On a CPU-only machine the parameters are on the CPU anyway, so torch's AdamW is kept. An explicit
    `zero_force_ds_cpu_optimizer` in the config is respected.
    """
    cfg = copy.deepcopy(ds_config)
    offload = cfg.get("zero_optimization", {}).get("offload_optimizer", {}) or {}
    if str(offload.get("device", "none")).lower() not in ("none", "") and "zero_force_ds_cpu_optimizer" not in cfg:
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


# --------------------------------------------------------------------------- construction


def _world_size(env: Mapping[str, str] = os.environ) -> int:
    return int(env.get("WORLD_SIZE", "1"))


def build_deepspeed_plugin(training, env: Mapping[str, str] = os.environ):
    """The DeepSpeed plugin accelerate would build from the launcher's environment, with "auto" filled."""
    from accelerate.utils import DeepSpeedPlugin

    if _as_bool(env.get("ACCELERATE_USE_CPU", "false")):
        raise ConfigError(
            "DeepSpeed was requested but ACCELERATE_USE_CPU=true (or --cpu) is set, which makes accelerate silently "
            "train without DeepSpeed. DeepSpeed runs on CPU without it (scaletune uses gloo there): unset "
            "ACCELERATE_USE_CPU, or use `./launch <deepspeed preset> --cpu N`."
        )
    config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file and config_file != "none" and not os.path.isfile(config_file):
        raise ConfigError(
            f"DeepSpeed config file {config_file!r} (deepspeed_config_file in the accelerate config) does not exist "
            f"relative to {os.getcwd()!r}: launch from the repository root, give an absolute path, or use ./launch."
        )
    import torch

    plugin = DeepSpeedPlugin()  # reads the zero stage, offload, config file, ... from the environment
    filled = fill_deepspeed_config(plugin.deepspeed_config, training, _world_size(env),
                                   effective_mixed_precision(training, env))
    if not torch.cuda.is_available():
        filled = adjust_for_cpu_only(filled)
    # The plugin, its HfDeepSpeedConfig and accelerate all hold this same dict: replace its content in place.
    plugin.deepspeed_config.clear()
    plugin.deepspeed_config.update(filled)
    plugin.hf_ds_config.set_stage_and_offload()
    plugin.gradient_accumulation_steps = filled["gradient_accumulation_steps"]
    plugin.gradient_clipping = filled["gradient_clipping"]
    if int(filled["zero_optimization"].get("stage", 0)) == 3:
        plugin.zero3_save_16bit_model = True
    return plugin


def _skip_deepspeed_shm_op() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce op at init (minutes on 2 cores, once per
    machine). gloo does the collectives as well for the sizes a CPU run sees; mark the op unavailable."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_accelerator(cfg) -> Accelerator:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    t = cfg.training
    use_deepspeed = deepspeed_requested()
    _deepspeed_unwrapping(use_deepspeed)
    fsdp_on_cpu = check_fsdp_launch(os.environ, torch.cuda.is_available())
    plugin = build_deepspeed_plugin(t) if use_deepspeed else None
    fsdp_plugin = None
    if fsdp_requested():
        from accelerate.utils import FullyShardedDataParallelPlugin

        fsdp_plugin = FullyShardedDataParallelPlugin()  # reads fsdp_config from the launcher's FSDP_* variables
    # CPU multi-process needs gloo (NCCL needs GPUs); DeepSpeed on CPU would otherwise ask for oneCCL.
    gloo = not torch.cuda.is_available() and (_world_size() > 1 or use_deepspeed)
    if gloo and use_deepspeed:
        _skip_deepspeed_shm_op()
    # Every collective waits at most ddp_timeout: a rank that died or hangs ends the others with an error
    # instead of a silent 30-minute wait.
    kwargs_handlers = [InitProcessGroupKwargs(backend="gloo" if gloo else None,
                                              timeout=timedelta(seconds=t.ddp_timeout))]
    if t.ddp_find_unused_parameters is not None:
        from accelerate.utils import DistributedDataParallelKwargs

        kwargs_handlers.append(DistributedDataParallelKwargs(find_unused_parameters=t.ddp_find_unused_parameters))
    dynamo = None  # None: the Accelerate config's dynamo_config decides
    # torch_compile compiles the step's forward + loss (fast_path); accelerate compiles the model only under
    # DeepSpeed and FSDP2, which own their forward.
    from .fast_path import compiles_step

    if t.torch_compile and not compiles_step(t):
        from accelerate.utils import TorchDynamoPlugin

        dynamo = TorchDynamoPlugin(backend="inductor", mode=t.torch_compile_mode or "default")
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
        _fsdp_on_cpu(accelerator, fsdp_plugin)
    _hold_world_group()
    return accelerator


# The default process group's Python handle, held from the Accelerator's construction to the end of `run()`.
_world_group: list = []


def _hold_world_group() -> None:
    """Keep the Python handle of the process group alive longer than the model that uses it.

    Otherwise DDP's Reducer holds the last reference when the run's locals go, and it destroys the gloo group
    while holding the GIL. The group's destructor joins its worker threads. If one of those threads is still
    freeing a finished collective's tensors, it waits for the GIL, and the rank hangs at exit (pytorch#56297;
    3 of 12 two-process drop-in runs without DeepSpeed's slow import on the way out, 0 of 35 with this handle).
    The handle's own destructor releases the GIL."""
    import torch.distributed as dist

    _world_group[:] = [dist.group.WORLD] if dist.is_available() and dist.is_initialized() else []


def release_world_group() -> None:
    """The end of `run()`: the model is gone (`gc.collect` frees one kept in a reference cycle), so this
    handle is the group's last owner and destroys it with the GIL released."""
    if _world_group:
        import gc

        gc.collect()
        _world_group.clear()
    _HOST_GROUP.clear()  # a later run() gets groups of its own


_DEEPSPEED_AVAILABLE = None  # accelerate's own check, kept while a run without DeepSpeed replaces it


def _deepspeed_unwrapping(use_deepspeed: bool) -> None:
    """accelerate's `unwrap_model` imports DeepSpeed whenever it is installed, to recognise its engine: 0.4 s and
    a "Setting accelerator to CPU" warning line in every process of a run that has no engine to recognise. A run
    whose config does not ask for DeepSpeed tells accelerate it is not there (a later DeepSpeed run in the
    same process gets accelerate's own check back)."""
    global _DEEPSPEED_AVAILABLE
    import accelerate.utils.other as other

    if _DEEPSPEED_AVAILABLE is None:
        _DEEPSPEED_AVAILABLE = other.is_deepspeed_available
    other.is_deepspeed_available = _DEEPSPEED_AVAILABLE if use_deepspeed else (lambda: False)


def _fsdp_on_cpu(accelerator: Accelerator, plugin) -> None:
    """Make a CPU Accelerator a real FSDP2 one (only behind SCALETUNE_FSDP_ON_CPU=1, i.e. `./launch --cpu`).

    accelerate 1.15 decides the distributed type once, in the shared state, and never picks FSDP on CPU
    (MULTI_CPU: plain DDP). `fully_shard` itself runs on CPU over gloo, so the decision is overridden where
    accelerate reads it: PartialState's shared dict (operations, barriers) and AcceleratorState's, which
    copied it at construction (`prepare`, `save_state`, `get_state_dict`). The plugin is attached as
    AcceleratorState would on a GPU, with the same mixed-precision policy. Must run before `prepare`.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if accelerator.num_processes < 2:
        raise ConfigError("FSDP on CPU needs at least 2 processes (it shards over them): use `./launch <fsdp preset> "
                          "--cpu 2`, or single_gpu --cpu 1 for one process.")
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    from torch.distributed.fsdp import CPUOffloadPolicy

    if isinstance(plugin.cpu_offload, CPUOffloadPolicy) and plugin.cpu_offload.pin_memory:
        # Pinned host memory is for copies to a GPU and needs one; on CPU the shards stay where they are.
        plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)
    if accelerator.state.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.state.mixed_precision)


def configure_model(model, training):
    """Memory knobs applied to the model before `prepare` (and FSDP2's layer choice). Returns the model."""
    plugin = _active_fsdp_plugin()
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


def _active_fsdp_plugin():
    """The FSDP plugin of the Accelerator built for this run, or None (read from accelerate's shared state: the
    model is configured between `build_accelerator` and `prepare`, without the Accelerator at hand)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    state = AcceleratorState._shared_state
    return state.get("fsdp_plugin") if state.get("distributed_type") == DistributedType.FSDP else None


def fsdp_layers_to_wrap(model) -> list[str]:
    """The module classes FSDP2 shards as units (TRANSFORMER_BASED_WRAP): the model's `_no_split_modules`, minus
    any that holds the input embedding.

    accelerate 1.15 gives the input embedding (with a tied output layer) a unit of its own after the
    auto-wrap; when a wrapped parent already owns it (BERT and RoBERTa list BertEmbeddings /
    RobertaEmbeddings in `_no_split_modules`), `fully_shard` fails in `prepare`. An explicit
    `fsdp_transformer_layer_cls_to_wrap` in the accelerate config is used as is.
    """
    names = list(getattr(model, "_no_split_modules", None) or [])
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    path = next((n for n, m in model.named_modules() if m is embedding), None) if embedding is not None else None
    if path is None:
        return names
    holders = {type(m).__name__ for n, m in model.named_modules() if n == "" or path.startswith(n + ".")}
    return [n for n in names if n not in holders]


def _embedding_aliases(model) -> list[str]:
    """Names of parameters registered outside the input/output embedding modules but shared with them."""
    embeddings = [m for m in (getattr(model, "get_input_embeddings", lambda: None)(),
                              getattr(model, "get_output_embeddings", lambda: None)()) if m is not None]
    inside = {id(m) for e in embeddings for m in e.modules()}
    shared = {id(p) for e in embeddings for p in e.parameters()}
    return [f"{owner_name}.{name}" if owner_name else name
            for owner_name, owner in model.named_modules() if id(owner) not in inside
            for name, p in owner.named_parameters(recurse=False) if id(p) in shared]


def untie_fsdp_aliases(model) -> list[str]:
    """Drops the second registration of an embedding parameter that another module also holds, so FSDP2 can
    shard the model; returns the dropped names.

    BERT's and RoBERTa's MLM output bias is registered twice: `cls.predictions.bias` is
    `cls.predictions.decoder.bias`. accelerate 1.15 gives the embeddings (with the tied decoder) a unit of
    their own and leaves the head module in the root unit, so the one tensor would belong to two units, which
    `fully_shard` refuses. The head's own name is never read in a forward (the decoder adds the bias), so the
    parameter stays registered on the decoder only, and the model's tie map forgets the pair, or
    `tie_weights()` (accelerate calls it while sharding) would register it again. The export then stores the
    bias once, under the decoder's name, which `from_pretrained` ties back (it ties in either direction).
    """
    aliases = _embedding_aliases(model)
    if not aliases:
        return []
    for full_name in aliases:
        owner_name, _, name = full_name.rpartition(".")
        del model.get_submodule(owner_name)._parameters[name]
    for attribute in ("_tied_weights_keys", "all_tied_weights_keys"):
        mapping = getattr(model, attribute, None)
        if isinstance(mapping, dict):
            setattr(model, attribute, {target: source for target, source in mapping.items()
                                       if target not in aliases and source not in aliases})
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # what accelerate will do: a tie map this did not understand shows up now
    if _embedding_aliases(model):
        raise ConfigError(
            f"FSDP2 cannot shard {type(model).__name__}: {', '.join(aliases)} is tied to a parameter of its "
            f"embedding layers, and accelerate puts the two in different FSDP units; train this model with "
            f"deepspeed_zero3 (or multi_gpu).")
    return aliases


# --------------------------------------------------------------------------- queries for the loop / checkpoint


def is_deepspeed(accelerator: Accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_fsdp(accelerator: Accelerator) -> bool:
    """FSDP2 (`fully_shard`): parameters are DTensor shards, state dicts go through torch.distributed.checkpoint."""
    return bool(getattr(accelerator, "is_fsdp2", False))


def zero_stage(accelerator: Accelerator) -> Optional[int]:
    """ZeRO stage under DeepSpeed, None otherwise."""
    if not is_deepspeed(accelerator):
        return None
    return int(accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"].get("stage", 0))


def all_agree(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank if any rank says True (stop decisions every rank must share). The flag is a host
    value, so it is agreed over a gloo group on host tensors: over NCCL, a device all-reduce and its `.item()`
    would make the host wait for all the GPU work queued so far (the preemption check runs after every update)."""
    if accelerator.num_processes == 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, group=_host_group())  # a collective on the host: no device sync
    return bool(t.item() > 0)


_HOST_GROUP: list = []


def _host_group():
    """The process group for host values: the default group when it is gloo (CPU runs), else one gloo group
    over the same ranks, made once (every rank calls all_agree at the same points, so they make it together)."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    if not _HOST_GROUP:
        _HOST_GROUP.append(dist.new_group(backend="gloo"))
    return _HOST_GROUP[0]


ERROR_PRINTED_KEY = "scaletune/error_printed"


def wait_for_the_error_line(first: bool, wait_seconds: float = 30.0) -> None:
    """After a bad-input error that every process found (docs/semantics.md: one line, from the first process).

    The launcher stops all processes as soon as one exits, so a rank that exits first can take the first
    process down before its line is out (seen once, in a full test run). So the first process, once it
    has printed, says so in the launcher's key-value store (torchrun's agent store, at MASTER_ADDR:MASTER_PORT,
    there before any process group), and the others wait for that before they exit, for at most
    `wait_seconds`: an error only one rank saw must still end that rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    import torch.distributed as dist

    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=wait_seconds))
        if first:
            store.set(ERROR_PRINTED_KEY, "1")
        else:
            store.wait([ERROR_PRINTED_KEY], timedelta(seconds=wait_seconds))
    except Exception:  # no store, or the first process never printed: exit anyway
        pass


def clip_gradients(accelerator: Accelerator, parameters, max_norm: float):
    """`accelerator.clip_grad_norm_` (returns the norm before clipping), less a pass over every gradient.

    torch multiplies every gradient by the clipping coefficient even when it is clamped to 1 -- a no-op that
    reads and writes all gradients (5 ms of a 440 ms MiniLM update on CPU) -- because testing the coefficient
    would make a GPU wait for the host. Where the gradients are plain host tensors (one process or DDP on CPU:
    not DeepSpeed, FSDP or a GPU) testing is free, so the multiplication is done only when it changes
    something. The coefficient is torch's own expression, so skipping it is exactly skipping a `mul_(1.0)`.
    Under DDP the gradients, hence the norm and the decision, are the same on every rank."""
    from accelerate.utils import DistributedType

    if (accelerator.device.type != "cpu"
            or accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU)):
        return accelerator.clip_grad_norm_(parameters, max_norm)
    import torch

    accelerator.unscale_gradients()
    parameters = [p for p in parameters if p.grad is not None]
    total_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if (max_norm / (total_norm + 1e-6)).item() < 1.0:  # host tensor: no device sync
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
    return total_norm
