"""auto_find_batch_size: the largest micro-batch that fits, found before the run is built, with the run unchanged.

Trainer halves the batch on out-of-memory and restarts its loop, which halves the global batch (another run,
silently) and breaks under DeepSpeed and FSDP. Here the search is a probe inside build, before `prepare`: a
forward + backward of the model on a worst-case batch (the longest example, repeated), halving the micro-batch
and multiplying the accumulation by the same factor on out-of-memory, so the global batch, the schedule and the
losses are the same; then an evaluation forward (no grad) at the eval batch size. Every rank probes and the
out-of-memory flag is agreed (`all_agree`): one rank's OOM moves every rank. The result is a new Config
(`dataclasses.replace`, as `preflight.run_config`), and everything downstream (loaders, DeepSpeed engine, plan,
config.yaml, trackers) is built from it; only the Accelerator, made before the model, is told the new values.

What the probe measures: parameters, gradients and activations of the unsharded model on the training
device, not the optimizer state (allocated at the first update) nor DDP's gradient buckets. Under FSDP2 the
model is not sharded yet, so the answer is conservative (it may pick a smaller micro-batch than would fit).
Under ZeRO-3 the parameters are partitioned at load time and cannot be run before the engine exists: refused.
A resumed run reuses the checkpoint's chosen sizes (`reused_sizes`, read in resume.preflight) without a search.

No torch import at module level: resume.py (no torch) reads `reused_sizes`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Mapping, Optional, TypeVar

from .config import Config, ConfigError
from .distributed.backend import Backend
from .distributed.collectives import all_agree
from .distributed.deepspeed import refill_batch

SEARCHED_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size")
# Test hook (tests only): the model's forward raises torch.OutOfMemoryError for a batch of more rows than this,
# on every rank or only on the rank in TEST_OOM_RANK. Registered by build only when the variable is set.
TEST_OOM_ROWS = "SCALETUNE_TEST_OOM_ABOVE_ROWS"
TEST_OOM_RANK = "SCALETUNE_TEST_OOM_RANK"

Size = TypeVar("Size")


def smaller_micro_batch(micro: int, accumulation: int) -> Optional[tuple[int, int]]:
    """Pure: the next (micro-batch, accumulation) with the same product: half the micro-batch, or for an odd
    one its largest divisor below half (12 -> 6 -> 3 -> 1). None when the micro-batch is already 1."""
    for smaller in range(micro // 2, 0, -1):
        if micro % smaller == 0:
            return smaller, accumulation * (micro // smaller)
    return None


def smaller_eval_batch(size: int) -> Optional[int]:
    """Pure: half the eval batch (its size changes no metric); None at 1."""
    return size // 2 if size > 1 else None


def settle(size: Size, oom: Callable[[Size], bool], agree: Callable[[bool], bool],
           smaller: Callable[[Size], Optional[Size]], give_up: Callable[[], Exception]) -> Size:
    """The first size, from `size` down by `smaller`, that no rank runs out of memory on. `oom` probes this
    rank; `agree` makes it every rank's answer (a collective: every rank walks the same sizes)."""
    while agree(oom(size)):
        size = smaller(size)
        if size is None:
            raise give_up()
    return size


def give_up_error(what: str) -> ConfigError:
    return ConfigError(f"auto_find_batch_size: even a {what} of 1 runs out of memory; free memory, or make the model "
                       f"smaller: gradient_checkpointing=true, bf16, a shorter max_seq_length, or a sharded backend "
                       f"(FSDP2, ZeRO).")


def reused_sizes(training, saved_config: Optional[Mapping]) -> Optional[dict]:
    """Pure: the sizes a resumed run takes from its checkpoint's config.yaml (searched by the run that wrote it),
    or None (no search asked, or the checkpoint's run searched none)."""
    if not training.auto_find_batch_size or not saved_config or not saved_config.get("auto_find_batch_size"):
        return None
    if any(key not in saved_config for key in SEARCHED_KEYS):
        return None
    return {key: saved_config[key] for key in SEARCHED_KEYS}


def install_test_oom_hook(model) -> None:
    """Test hook: a forward pre-hook that raises torch.OutOfMemoryError above TEST_OOM_ROWS rows. It stays for
    the real run, so a run that would use a searched-away size fails."""
    import torch

    limit = int(os.environ[TEST_OOM_ROWS])
    only = os.environ.get(TEST_OOM_RANK)
    if only is not None and os.environ.get("RANK", "0") != only:
        return

    def hook(module, args, kwargs):
        rows = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[0]
        if rows > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. (test hook: {rows} rows > {limit})")

    model.register_forward_pre_hook(hook, with_kwargs=True)


def find_batch_sizes(cfg: Config, accelerator, model, prepared, collator: Callable[[bool], Callable]) -> Config:
    """Collective. The config with the micro-batch, accumulation and eval batch that fit on every rank (the
    global batch kept); the Accelerator (and the DeepSpeed config) take the new values. The model is left as
    it was (device, mode, no gradients); the caller re-seeds (the probe draws dropout and masking randomness)."""
    import torch
    from accelerate.utils.memory import clear_device_cache

    t = cfg.training
    if Backend.of(accelerator).is_zero3:
        raise ConfigError("auto_find_batch_size is not possible under DeepSpeed ZeRO-3 (its parameters are "
                          "partitioned before the engine can run a probe): set per_device_train_batch_size and "
                          "gradient_accumulation_steps yourself, or use ZeRO-2 or FSDP2.")
    device, was_training = next(model.parameters()).device, model.training
    model.to(accelerator.device)

    def oom(rows: list, size: int, training: bool) -> bool:
        batch = {k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v
                 for k, v in collator(training)(rows * size).items()}
        model.train(training)
        try:
            with accelerator.autocast(), torch.set_grad_enabled(training):
                out = model(**{k: v for k, v in batch.items() if k != "labels"})
                if training:
                    (out.logits if hasattr(out, "logits") else out[0]).float().sum().backward()
            return False
        except Exception as e:
            if not (isinstance(e, torch.OutOfMemoryError) or _is_oom(e)):
                raise
            return True
        finally:
            out = batch = None
            model.zero_grad(set_to_none=True)
            clear_device_cache(garbage_collection=True)

    def agree(flag: bool) -> bool:
        return all_agree(accelerator, flag)  # Host-device sync point: once per candidate size

    train, evaluate = prepared.train if t.do_train else None, _eval_sets(prepared, t)
    micro, accumulation = t.per_device_train_batch_size, t.gradient_accumulation_steps
    if train is not None:
        rows = [_longest(train)]
        micro, accumulation = settle((micro, accumulation), lambda s: oom(rows, s[0], True), agree,
                                     lambda s: smaller_micro_batch(*s), lambda: give_up_error("training micro-batch"))
    eval_size = t.per_device_eval_batch_size
    if evaluate:
        rows = [max((_longest(ds) for ds in evaluate), key=_length)]
        eval_size = settle(eval_size, lambda s: oom(rows, s, False), agree, smaller_eval_batch,
                           lambda: give_up_error("evaluation batch"))
    model.train(was_training)
    model.to(device)
    found = dataclasses.replace(t, per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
                                per_device_eval_batch_size=eval_size)
    accelerator.print(f"scaletune: auto_find_batch_size: {describe(t, found, accelerator.num_processes)}", flush=True)
    accelerator.gradient_accumulation_steps = found.gradient_accumulation_steps
    if Backend.of(accelerator).is_deepspeed:
        refill_batch(accelerator.state.deepspeed_plugin, found, accelerator.num_processes)
    return dataclasses.replace(cfg, training=found)


def describe(given, found, world_size: int) -> str:
    """Pure: the chosen sizes as one line (what changed, and the global batch that did not)."""
    parts = [f"{key} {getattr(given, key)} -> {getattr(found, key)}" if getattr(given, key) != getattr(found, key)
             else f"{key} {getattr(found, key)}" for key in SEARCHED_KEYS]
    return ", ".join(parts) + f" (global batch {found.global_batch_size(world_size)})"


def _is_oom(error: Exception) -> bool:
    from accelerate.utils.memory import should_reduce_batch_size

    return should_reduce_batch_size(error)


def _eval_sets(prepared, t) -> list:
    from .eval_sets import as_dict

    sets = list(as_dict(prepared.validation).values()) if prepared.validation is not None else []
    return sets + ([prepared.test] if prepared.test is not None and t.do_predict else [])


def _length(example: Mapping) -> int:
    ids = example.get("input_ids")
    return len(ids) if ids is not None else 0


def _longest(dataset) -> Mapping:
    """The example with the most tokens (the worst case a batch of it repeated stands for); a stream's first."""
    if not hasattr(dataset, "__len__") or "input_ids" not in (getattr(dataset, "column_names", None) or ()):
        return next(iter(dataset))
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return dataset[max(range(len(lengths)), key=lengths.__getitem__)]
