"""DeepSpeed set-up: its config's "auto" values filled from the training config, the plugin accelerate would
build from the launcher's environment, and the CPU-only adjustments.

`accelerate launch` turns the Accelerate config's DeepSpeed section into `ACCELERATE_USE_DEEPSPEED=true` plus
the ZeRO settings in the environment. The config's "auto" values (batch sizes, accumulation, clipping,
precision) are filled from the training config, and an explicit value that disagrees is an error naming both
values, raised before the model is loaded.
"""

from __future__ import annotations

import copy
import os
from typing import Mapping

from ..errors import ConfigError
from .backend import Backend, as_bool, cpu_requested, effective_mixed_precision

# torch / accelerate / deepspeed are imported inside the functions that need them.


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return as_bool(a) == as_bool(b)
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
            t.global_batch_size(world_size),
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


def build_deepspeed_plugin(training, env: Mapping[str, str] = os.environ):
    """The DeepSpeed plugin accelerate would build from the launcher's environment, with "auto" filled."""
    import_deepspeed(with_mlflow="mlflow" in training.report_to)
    from accelerate.utils import DeepSpeedPlugin

    if cpu_requested(env):
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
    filled = fill_deepspeed_config(plugin.deepspeed_config, training, Backend.requested(env).world_size,
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


def refill_batch(plugin, training, world_size: int) -> None:
    """auto_find_batch_size chose another micro-batch and accumulation after the plugin was built (the model
    is needed to search): the plugin's batch values follow, before `prepare` builds the engine from them. The
    global batch is unchanged, so an explicit train_batch_size still holds."""
    plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=training.per_device_train_batch_size,
                                   gradient_accumulation_steps=training.gradient_accumulation_steps,
                                   train_batch_size=training.global_batch_size(world_size))
    plugin.gradient_accumulation_steps = training.gradient_accumulation_steps


def import_deepspeed(with_mlflow: bool) -> None:
    """Import DeepSpeed, without mlflow unless the run logs to it. DeepSpeed imports mlflow whenever it is
    installed, for its autotuner (which a run never uses): 1.4 s of CPU per process, and mlflow's telemetry
    runs `uname -p` in a subprocess. mlflow is hidden for the one import, then importable again."""
    import importlib
    import sys

    hide = not with_mlflow and "mlflow" not in sys.modules and "deepspeed" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError: DeepSpeed's autotuner goes without
    try:
        importlib.import_module("deepspeed")
    finally:
        if hide:
            del sys.modules["mlflow"]


def skip_deepspeed_shm_op() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce op at init (minutes on 2 cores, once per
    machine). gloo does the collectives as well for the sizes a CPU run sees; mark the op unavailable."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


_DEEPSPEED_AVAILABLE = None  # accelerate's own check, kept while a run without DeepSpeed replaces it


def deepspeed_unwrapping(use_deepspeed: bool) -> None:
    """accelerate's `unwrap_model` imports DeepSpeed whenever it is installed, to recognise its engine: 0.4 s and
    a "Setting accelerator to CPU" warning line in every process of a run that has no engine to recognise. A run
    whose config does not ask for DeepSpeed tells accelerate it is not there (a later DeepSpeed run in the
    same process gets accelerate's own check back)."""
    global _DEEPSPEED_AVAILABLE
    import accelerate.utils.other as other

    if _DEEPSPEED_AVAILABLE is None:
        _DEEPSPEED_AVAILABLE = other.is_deepspeed_available
    other.is_deepspeed_available = _DEEPSPEED_AVAILABLE if use_deepspeed else (lambda: False)

