"""Everything that depends on the backend: Accelerator construction, DeepSpeed config, cross-rank agreement.

The loop never branches on DDP vs DeepSpeed vs CPU; it asks this module (and `checkpoint.py` for the
backend-specific disk formats).

DeepSpeed is chosen by the Accelerate config (`distributed_type: DEEPSPEED`), which `accelerate launch` turns
into `ACCELERATE_USE_DEEPSPEED=true` plus the ZeRO settings in the environment. Here its config's "auto"
values (batch sizes, accumulation, clipping, precision) are filled from the training config, and an explicit
value that disagrees is an error naming both values, raised before the model is loaded.

`python -m scaletune.distributed plan ...` is what `./launch` calls to resolve the training config (and fail
fast on a bad one), the topology and the global batch size: see `plan` and `launch_plan` at the bottom.
"""

from __future__ import annotations

import copy
from datetime import timedelta
import os
import shutil
import subprocess
import sys
from typing import TYPE_CHECKING, Mapping, Optional

from .config import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator

# torch / accelerate are imported inside the functions that need them: `./launch` runs `plan` below before
# every launch, and it should cost a YAML parse, not a torch import.

# --------------------------------------------------------------------------- pure decisions


def deepspeed_requested(env: Mapping[str, str] = os.environ) -> bool:
    """Whether `accelerate launch` was given a DeepSpeed config (it exports ACCELERATE_USE_DEEPSPEED)."""
    return env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


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
    plugin = build_deepspeed_plugin(t) if use_deepspeed else None
    # CPU multi-process needs gloo (NCCL needs GPUs); DeepSpeed on CPU would otherwise ask for oneCCL.
    gloo = not torch.cuda.is_available() and (_world_size() > 1 or use_deepspeed)
    if gloo and use_deepspeed:
        _skip_deepspeed_shm_op()
    # Every collective waits at most ddp_timeout: a rank that died or hangs ends the others with an error
    # instead of a silent 30-minute wait.
    kwargs_handlers = [InitProcessGroupKwargs(backend="gloo" if gloo else None,
                                              timeout=timedelta(seconds=t.ddp_timeout))]
    return Accelerator(
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
        # accelerate compiles in prepare(): torch.compile for DDP, engine.compile under DeepSpeed. None: the
        # Accelerate config's dynamo_config decides.
        dynamo_backend="inductor" if t.torch_compile else None,
        kwargs_handlers=kwargs_handlers,
    )


def configure_model(model, training):
    """Memory knobs applied to the model before `prepare`. Returns the model."""
    if training.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"gradient_checkpointing=true, but {type(model).__name__} does not support it.")
        # Non-reentrant: works with DDP's no_sync, ZeRO-3's parameter gathering and inputs without grad.
        # (transformers 5 renamed gradient_checkpointing_enable; the old name warns.)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False  # a KV cache is useless in training and conflicts with recompute
    return model


# --------------------------------------------------------------------------- queries for the loop / checkpoint


def is_deepspeed(accelerator: Accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> Optional[int]:
    """ZeRO stage under DeepSpeed, None otherwise."""
    if not is_deepspeed(accelerator):
        return None
    return int(accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"].get("stage", 0))


def all_agree(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank if any rank says True (stop decisions every rank must share)."""
    if accelerator.num_processes == 1:
        return flag
    import torch

    # Host-device sync point: one scalar all-reduce.
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def visible_gpus(env: Mapping[str, str] = os.environ) -> int:
    """GPUs this launch may use, without importing torch: CUDA_VISIBLE_DEVICES if set, else nvidia-smi."""
    mask = env.get("CUDA_VISIBLE_DEVICES")
    if mask is not None:
        ids = [d for d in mask.split(",") if d.strip()]
        return 0 if not ids or ids[0].strip() == "-1" else len(ids)
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


class LaunchError(ConfigError):
    """A launcher option or accelerate config that `./launch` cannot turn into a command."""


def _whole(name: str, value) -> Optional[int]:
    if value is None or value == "":
        return None
    if not str(value).isdigit():
        raise LaunchError(f"{name} must be a whole number, got '{value}'.")
    return int(value)


def launch_plan(opts: Mapping[str, Optional[str]], training, env: Mapping[str, str] = os.environ,
                gpus: Optional[int] = None) -> dict:
    """Every value `./launch` needs for its `accelerate launch` command, decided in one place.

    `opts`: the launcher options by name (accelerate_config, repo, cpu, num_processes, mixed_precision,
    num_machines, machine_rank, main_process_ip, main_process_port; None when not given). Unset topology falls
    back to SLURM_NNODES / SLURM_NODEID / MASTER_ADDR / MASTER_PORT (empty counts as unset), then to the
    accelerate config, read with yaml.safe_load. A combination that cannot run is a LaunchError naming the fix.
    """
    import yaml

    def first(*values):
        return next((v for v in values if v is not None and v != ""), None)

    cpu, nproc = _whole("--cpu", opts.get("cpu")), _whole("--num_processes", opts.get("num_processes"))
    mixed = opts.get("mixed_precision")
    if mixed is not None and mixed not in ("no", "bf16", "fp16"):
        raise LaunchError(f"--mixed_precision must be no, bf16 or fp16, got '{mixed}'.")
    config_file = opts["accelerate_config"]
    try:
        with open(config_file) as f:
            acc = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise LaunchError(f"cannot read the accelerate config {config_file}: {' '.join(str(e).split())}") from None
    if not isinstance(acc, dict):
        raise LaunchError(f"the accelerate config {config_file} must be a YAML mapping (distributed_type: ...).")
    # YAML reads an unquoted NO as false; accelerate means "no distribution" by either spelling.
    distributed_type = "NO" if acc.get("distributed_type") is False else str(acc.get("distributed_type", ""))
    if cpu is not None and cpu < 1:
        raise LaunchError("--cpu needs at least 1 process.")
    if cpu is not None and nproc is not None and nproc != cpu:
        raise LaunchError("give either --cpu N or --num_processes N, not both.")

    machines = _whole("--num_machines", first(opts.get("num_machines"), env.get("SLURM_NNODES"),
                                              acc.get("num_machines"), 1))
    if machines < 1:
        raise LaunchError("--num_machines must be at least 1.")
    multi_machine, rank, ip = machines > 1, 0, None
    # One machine: port 0 lets accelerate pick a free one, so two launches on a machine do not collide.
    port = _whole("--main_process_port", first(opts.get("main_process_port"), env.get("MASTER_PORT"),
                                               acc.get("main_process_port") if multi_machine else 0))
    if multi_machine:
        rank = _whole("--machine_rank", first(opts.get("machine_rank"), env.get("SLURM_NODEID"), 0))
        ip = first(opts.get("main_process_ip"), env.get("MASTER_ADDR"), acc.get("main_process_ip"))
        if rank >= machines:
            raise LaunchError(f"--machine_rank {rank} is not below --num_machines {machines}.")
        if ip is None:
            raise LaunchError("multi-machine launch needs --main_process_ip (the host of machine_rank 0) or "
                              "MASTER_ADDR.")
        if port is None:
            raise LaunchError("multi-machine launch needs --main_process_port or MASTER_PORT.")

    gpus = visible_gpus(env) if gpus is None else gpus
    preset = os.path.splitext(os.path.basename(config_file))[0]
    per_machine = first(cpu, nproc, (1 if distributed_type == "NO" else gpus) if gpus > 0 else None)
    if per_machine is None:
        raise LaunchError(f"no GPU is visible. Use --cpu N to run N processes on CPU "
                          f"(e.g. ./launch {preset} --cpu 2 ...).")
    if per_machine < 1:
        raise LaunchError("--num_processes must be at least 1.")
    if cpu is None and 0 < gpus < per_machine:
        raise LaunchError(f"--num_processes {per_machine} is more than the {gpus} visible GPU(s).")
    if distributed_type == "NO" and per_machine > 1:
        raise LaunchError(f"preset '{preset}' runs one process; use multi_gpu (or a deepspeed_* preset) for "
                          f"{per_machine} processes.")
    if distributed_type == "MULTI_GPU" and per_machine == 1 and not multi_machine:
        raise LaunchError(f"preset '{preset}' needs at least 2 processes (found 1); use single_gpu for one process.")

    # A relative DeepSpeed JSON path: from the working directory, else from the repository (the presets' own
    # JSON). Made absolute, so ./launch works from any directory.
    ds_file = (acc.get("deepspeed_config") or {}).get("deepspeed_config_file") or "none"
    if ds_file != "none":
        found = next((p for p in (ds_file, os.path.join(opts.get("repo") or ".", ds_file)) if os.path.isfile(p)), None)
        if found is None:
            raise LaunchError(f"the DeepSpeed config file '{ds_file}' named in {config_file} does not exist.")
    total = per_machine * machines
    return {
        "DISTRIBUTED_TYPE": distributed_type, "VISIBLE_GPUS": gpus, "PROCESSES_PER_MACHINE": per_machine,
        "NUM_MACHINES": machines, "NUM_PROCESSES": total, "MULTI_MACHINE": int(multi_machine),
        "MACHINE_RANK": rank, "MAIN_PROCESS_IP": ip or "", "MAIN_PROCESS_PORT": port,
        # accelerate's CPU mode (gloo); not under DeepSpeed, which it would silently drop (scaletune runs
        # DeepSpeed on CPU over gloo by itself).
        "USE_CPU": int(cpu is not None and distributed_type != "DEEPSPEED"), "MIXED_PRECISION": mixed or "",
        "DEEPSPEED_CONFIG_FILE": os.path.abspath(found) if ds_file != "none" else "",
        "PER_DEVICE": training.per_device_train_batch_size, "ACCUMULATION": training.gradient_accumulation_steps,
        "GLOBAL_BATCH_SIZE": training.global_batch_size(total),
    }


def plan(argv: list[str]) -> int:
    """`plan --accelerate_config FILE [--repo DIR] [launcher options] -- [CONFIG] [--key value ...]`: what
    ./launch runs first. Resolves the training config as `scaletune.train` would and the topology
    (`launch_plan`), and prints every value the launch command needs as shell assignments (NAME='value').
    A bad config or an impossible topology is one `error:` line on stderr and exit code 2; no torch import."""
    import argparse
    import shlex

    from .config import load_config

    sep = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m scaletune.distributed plan")
    parser.add_argument("--accelerate_config", required=True)
    for name in ("repo", "cpu", "num_processes", "mixed_precision", "num_machines", "machine_rank",
                 "main_process_ip", "main_process_port"):
        parser.add_argument(f"--{name}")
    opts = vars(parser.parse_args(argv[:sep]))
    try:
        values = launch_plan(opts, load_config(argv[sep + 1:]).training)
    except LaunchError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"scaletune: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(f"{name}={shlex.quote(str(value))}" for name, value in values.items()))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["plan"]:
        print("usage: python -m scaletune.distributed plan --accelerate_config FILE [launcher options] -- "
              "[CONFIG] [--key value ...]", file=sys.stderr)
        sys.exit(2)
    sys.exit(plan(sys.argv[2:]))
