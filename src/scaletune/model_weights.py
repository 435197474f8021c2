"""A model's weights in and out of checkpoints and the export, under every backend.

`save_state` writes each backend's own format; next to it this module writes the form read without the
backend (`model.safetensors` consolidated from ZeRO-3 / FSDP2 shards, or the LoRA `adapter/` folder), reloads
the best weights one parameter at a time without any optimizer state, and exports the final model.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import shutil
from pathlib import Path

from . import lora
from .disk import fsync_dir, fsync_file, readable_as_umask_allows
from .distributed.backend import Backend
from .distributed.collectives import agree_on_write
from .errors import CheckpointError

# --------------------------------------------------------------------------- backend formats
#
# What `save_state` writes for the model depends on the backend: DDP a `model.safetensors`, DeepSpeed its
# engine checkpoint (`pytorch_model/`), FSDP2 a torch.distributed.checkpoint folder (`pytorch_model_fsdp_0/`,
# one shard per rank). Every checkpoint also gets the form a user (and the best-model reload) reads without
# the backend: a consolidated `model.safetensors`, or with LoRA the `adapter/` folder.


@contextlib.contextmanager
def frozen_base_left_out(accelerator, model, loading: bool):
    """While saving or loading a LoRA model's state: the frozen pretrained weights stay out of the checkpoint,
    which then holds the adapter and its optimizer state only. Yields extra `save_state` / `load_state`
    arguments. Without LoRA: nothing changes."""
    if not lora.is_peft(accelerator.unwrap_model(model)):
        yield {}
        return
    backend = Backend.of(accelerator)
    if backend.is_deepspeed:
        # The engine checkpoint then holds the trainable parameters only; loading it must not ask for the rest.
        if loading:
            yield {"load_module_strict": False}
            return
        # DeepSpeed leaves out the frozen names that `named_parameters()` lists, which names a tied parameter
        # once: an MLM decoder tied to the word embeddings (30,522 x hidden) stayed in under its second name.
        frozen = [n for n, p in model.module.named_parameters(remove_duplicate=False) if not p.requires_grad]
        engine_state_dict = model.module_state_dict

        def without_frozen(*args, **kwargs):
            state = engine_state_dict(*args, **kwargs)
            for name in frozen if kwargs.get("exclude_frozen_parameters") else ():
                state.pop(name, None)
            return state

        model.module_state_dict = without_frozen  # the engine's save calls it through the instance
        try:
            yield {"exclude_frozen_parameters": True}
        finally:
            del model.module_state_dict
        return
    if backend.is_fsdp:
        # accelerate's FSDP checkpoint functions can save and load the adapter alone (adapter_only), but save_state
        # / load_state never ask them to: ask for them while this state is saved or loaded.
        import accelerate.accelerator as module

        name = "load_fsdp_model" if loading else "save_fsdp_model"
        original = getattr(module, name)
        if "adapter_only" not in inspect.signature(original).parameters:
            raise CheckpointError(f"accelerate {_version('accelerate')} cannot checkpoint a LoRA adapter alone under "
                                  f"FSDP2 ({name} has no adapter_only): install accelerate>=1.15,<2.")
        setattr(module, name, functools.partial(original, adapter_only=True))
        try:
            yield {}
        finally:
            setattr(module, name, original)
        return
    # DDP / one process: accelerate would write (or read) the whole model; the adapter folder replaces it.
    if loading:
        handle = accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())
    else:
        handle = accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    try:
        yield {}
    finally:
        handle.remove()


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def save_model_weights(accelerator, model, folder: str | Path) -> None:
    """Collective. The model in a form read without the backend, next to what `save_state` wrote: with LoRA
    the `adapter/` folder (gathered from every backend); under DeepSpeed and FSDP2 a consolidated
    `model.safetensors` with the parameter names accelerate writes for DDP (gathered from the ZeRO-3 / FSDP2
    shards), so the checkpoint loads with `from_pretrained` and the best-model reload reads weights only."""
    from accelerate.utils import clean_state_dict_for_safetensors

    unwrapped = accelerator.unwrap_model(model)
    if lora.is_peft(unwrapped):
        save_adapter(accelerator, model, Path(folder) / lora.ADAPTER_DIR)
        return
    backend = Backend.of(accelerator)
    if not backend.engine_saves:
        return  # accelerate's save_state already wrote model.safetensors
    # ZeRO-3 and FSDP2 gather the shards with collectives (every rank); with ZeRO-1/2 every rank holds the model.
    needed = backend.shards_parameters or accelerator.is_main_process
    state_dict = accelerator.get_state_dict(model) if needed else None
    if accelerator.is_main_process:
        accelerator.save(clean_state_dict_for_safetensors(state_dict), str(Path(folder) / "model.safetensors"),
                         safe_serialization=True)


def load_model_weights(accelerator, model, path: str | Path) -> None:
    """Weights only (no optimizer state): the best-model reload at the end (cf. transformers issue 25027). With
    LoRA: the adapter (and modules trained whole) from `adapter/`."""
    from safetensors.torch import load_file

    unwrapped = accelerator.unwrap_model(model)
    if lora.is_peft(unwrapped):
        load_adapter(accelerator, model, Path(path) / lora.ADAPTER_DIR)
        return
    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{str(path)!r} has no model.safetensors to reload the best model from.")
    if Backend.of(accelerator).shards_parameters:
        missing = _load_sharded(accelerator, unwrapped, weights)
        if missing:
            raise CheckpointError(f"Best checkpoint {str(path)!r} does not match the model (missing {missing[:3]}).")
        return
    state = load_file(str(weights), device="cpu")
    missing, unexpected = unwrapped.load_state_dict(state, strict=False)
    # safetensors stores tied tensors once (an MLM decoder is the word embedding matrix): a "missing"
    # key sharing storage with a loaded one has been loaded.
    storage = {k: v.data_ptr() for k, v in unwrapped.state_dict(keep_vars=True).items()}
    loaded = {storage[k] for k in state if k in storage}
    missing = [k for k in missing if storage.get(k) not in loaded and not k.endswith("position_ids")]
    if unexpected or missing:
        raise CheckpointError(f"Best checkpoint {str(path)!r} does not match the model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]}).")


# --------------------------------------------------------------------------- one parameter at a time
#
# ZeRO-3 and FSDP2 hold a shard of each parameter per rank. Reading or writing weights in the plain layout
# goes one parameter at a time: rank 0 holds at most one whole tensor, and no rank loads optimizer state.


def _reshard(accelerator, module) -> None:
    """FSDP2 leaves a root's parameters gathered after a forward without backward (an evaluation); shard them
    again, so every parameter is the DTensor shard the reads and writes below expect."""
    if not Backend.of(accelerator).is_fsdp:
        return
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _is_sharded(accelerator, p) -> bool:
    from torch.distributed.tensor import DTensor

    return Backend.of(accelerator).is_zero3 or isinstance(p, DTensor)


def _gather(accelerator, p):
    """Collective: the whole parameter, on the CPU of the main process (None elsewhere)."""
    import torch
    from torch.distributed.tensor import DTensor

    main = accelerator.is_main_process
    with torch.no_grad():
        if Backend.of(accelerator).is_zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                return p.data.detach().to("cpu", copy=True) if main else None
        if isinstance(p, DTensor):
            local = p.to_local()
            mesh_device = p.device_mesh.device_type
            if local.device.type != mesh_device:  # CPU-offloaded shards: gather on the mesh's device
                p = DTensor.from_local(local.to(mesh_device), p.device_mesh, p.placements, shape=p.shape,
                                       stride=p.stride())
            full = p.full_tensor()
            return full.detach().to("cpu", copy=True) if main else None
        return p.detach().to("cpu", copy=True) if main else None


def _scatter(accelerator, p, full) -> None:
    """Collective: copy a whole tensor into a parameter. `full` is needed on the main process, and on every
    rank when the parameter is not sharded (each DDP / ZeRO-1/2 replica copies it)."""
    import torch
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if Backend.of(accelerator).is_zero3:
            import deepspeed

            # Only the compute weights change: the optimizer's fp32 master copy stays, which is fine for the
            # reloads this serves (no update follows the best-model reload; a resume restores both).
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if accelerator.is_main_process:
                    p.data.copy_(full)
            return
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            src = full if accelerator.is_main_process else torch.empty(p.shape, dtype=p.dtype)
            shard = distribute_tensor(src.to(device=mesh.device_type, dtype=p.dtype), mesh, p.placements,
                                      src_data_rank=0)
            p.to_local().copy_(shard.to_local())
            return
        p.data.copy_(full)


def _load_sharded(accelerator, module, weights: Path) -> list[str]:
    """Collective. Copy a safetensors file into ZeRO-3- or FSDP2-sharded parameters one at a time: rank 0 reads
    the tensor and the backend re-shards it, so no rank holds the whole model or any optimizer state
    (transformers issue 25027). Returns the parameter names not found in the file."""
    from safetensors import safe_open

    _reshard(accelerator, module)
    aliases: dict[int, list[str]] = {}  # a tied parameter is saved under one of its names
    for name, p in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    missing = []
    with safe_open(str(weights), framework="pt", device="cpu") as f:  # every rank: the header only
        keys = set(f.keys())
        for name, p in module.named_parameters():
            key = next((n for n in aliases[id(p)] if n in keys), None)
            if key is None:
                missing.append(name)
                continue
            needed = accelerator.is_main_process or not _is_sharded(accelerator, p)
            _scatter(accelerator, p, f.get_tensor(key) if needed else None)
        for name, buf in module.named_buffers():  # not sharded: every rank loads its own copy
            if name in keys:
                buf.data.copy_(f.get_tensor(name))
    return missing


# --------------------------------------------------------------------------- LoRA adapters


def save_adapter(accelerator, model, folder: str | Path) -> None:
    """Collective: the adapter (and the modules trained whole) in peft's format, gathered from every backend."""
    unwrapped = accelerator.unwrap_model(model)
    _reshard(accelerator, unwrapped)
    tensors, gathered = {}, {}
    for key, p in lora.adapter_parameters(unwrapped).items():  # the same order on every rank
        if id(p) not in gathered:
            gathered[id(p)] = _gather(accelerator, p)
        tensors[key] = gathered[id(p)]
    if accelerator.is_main_process:
        lora.write_adapter(unwrapped, tensors, folder)


def load_adapter(accelerator, model, folder: str | Path) -> None:
    """Collective: load `folder/adapter_model.safetensors` into the adapter's parameters (weights only)."""
    from safetensors import safe_open

    weights = Path(folder) / lora.ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{str(folder)!r} has no {lora.ADAPTER_WEIGHTS} to load the LoRA adapter from.")
    unwrapped = accelerator.unwrap_model(model)
    _reshard(accelerator, unwrapped)
    params = lora.adapter_parameters(unwrapped)
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        missing = sorted(set(params) - set(f.keys()))
        if missing:  # every rank reads the same header: all fail before the first collective
            raise CheckpointError(f"{str(weights)!r} does not match this LoRA model (missing {missing[:3]}): use "
                                  f"the lora_r, lora_target_modules and modules_to_save it was trained with.")
        done = set()
        for key, p in params.items():
            if id(p) in done:
                continue
            done.add(id(p))
            needed = accelerator.is_main_process or not _is_sharded(accelerator, p)
            _scatter(accelerator, p, f.get_tensor(key) if needed else None)


# --------------------------------------------------------------------------- export


EXPORT_STAGING = ".export.partial"  # removed as a leftover by the next run (checkpointer.remove_leftovers)


def export_model(accelerator, model, tokenizer, output_dir: str | Path) -> None:
    """Collective: the final model as a `save_pretrained` folder (safetensors) with its tokenizer. With LoRA:
    the adapter in `output_dir/adapter/` and, unless merge_adapters_at_export is off, the merged model in
    `output_dir`, built on the main process from the gathered weights (the training model is not changed).
    Written whole into `output_dir/.export.partial/` first and then moved into place, weights last: an abort
    or a full disk never leaves half a model where one is read (the output dir also holds the checkpoints,
    so it cannot be renamed itself)."""
    out = Path(output_dir)
    staging = out / EXPORT_STAGING
    failed = None
    try:
        if accelerator.is_main_process and staging.exists():
            shutil.rmtree(staging)
        _write_export(accelerator, model, tokenizer, staging)
        if accelerator.is_main_process:
            for p in staging.rglob("*"):  # on disk before the renames that publish them
                if p.is_file():
                    fsync_file(p)
    except Exception as e:  # a full disk surfaces as OSError, SafetensorError or RuntimeError
        failed = e
    if isinstance(failed, CheckpointError) and accelerator.is_main_process:
        _publish(staging, out)  # the LoRA merge was refused (main process): the adapter is whole, publish it
    agree_on_write(accelerator, failed, staging)  # collective: every rank stops the same way
    if accelerator.is_main_process:
        _publish(staging, out)
    accelerator.wait_for_everyone()


def _publish(staging: Path, out: Path) -> None:
    """Main process: move what `staging` holds into `out`, the weights last (a reader that finds the new
    weights finds the config and tokenizer that go with them)."""
    readable_as_umask_allows(staging.rglob("*"))
    for p in sorted(staging.iterdir(), key=lambda p: (".safetensors" in p.name, p.name)):
        target = out / p.name
        if p.is_dir() and target.is_dir():  # an earlier export's adapter/: out of the way first
            old = out / f".{p.name}.old-export"
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            p.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(p, target)
    staging.rmdir()
    fsync_dir(out)


def _write_export(accelerator, model, tokenizer, folder: Path) -> None:
    """Collective: what `export_model` publishes, written into `folder`."""
    unwrapped = accelerator.unwrap_model(model)
    if lora.is_peft(unwrapped):
        save_adapter(accelerator, model, folder / lora.ADAPTER_DIR)
        if lora.merge_at_export(unwrapped):
            state_dict = accelerator.get_state_dict(model)  # all ranks: consolidates ZeRO-3 / FSDP2 shards
            if accelerator.is_main_process:
                try:
                    merged = lora.merged_model(unwrapped, state_dict)
                except ValueError as e:
                    raise CheckpointError(f"Could not merge the LoRA adapter for the export: {e}. The adapter is "
                                          f"in {str(folder.parent / lora.ADAPTER_DIR)!r}.") from None  # published
                del state_dict
                merged.save_pretrained(folder, safe_serialization=True)
    else:
        state_dict = accelerator.get_state_dict(model)  # all ranks: consolidates ZeRO-3 / FSDP2 shards
        if accelerator.is_main_process:
            unwrapped.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    if accelerator.is_main_process and tokenizer is not None:
        tokenizer.save_pretrained(folder)
