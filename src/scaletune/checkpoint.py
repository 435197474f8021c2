"""Checkpoints on disk: the format of one checkpoint folder (atomic save, integrity, load, export).

Layout (Trainer's names): `output_dir/checkpoint-{step}/` holds the model (`model.safetensors` +
`config.json`, loadable with `from_pretrained`), the optimizer, scheduler, grad scaler, sampler and every
rank's RNG state (all by `accelerator.save_state`), the tokenizer, the run's `config.yaml`, a
`manifest.json` (every file's size and SHA-256) and `trainer_state.json`. Under DeepSpeed and FSDP2,
`save_state` writes the backend's sharded format (`pytorch_model/`, `pytorch_model_fsdp_0/` + `optimizer_0/`)
and `model.safetensors` is consolidated from the shards. With LoRA (`use_peft`) a checkpoint holds
`adapter/` (peft's format) and the adapter's optimizer state instead: never the frozen pretrained weights.

Atomicity (§26): everything is written into `.checkpoint-{step}.partial/`; when every rank has finished,
the main process writes the manifest and `trainer_state.json`, fsyncs the files and the folder, and renames
the folder. A crash mid-save leaves a `.partial` folder that is never picked up. Deleting a checkpoint first
renames it out of the `checkpoint-N` namespace, so a kill during deletion never leaves a half-deleted
folder that `latest` would pick.

The lifecycle (when to save, rotation, resume resolution, best reload) is `checkpointer.Checkpointer`'s.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from . import lora
from .distributed import is_deepspeed, is_fsdp, zero_stage
from .errors import CheckpointError
from .state import STATE_FILE, TrainingState

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.yaml"


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def list_checkpoints(output_dir: str | Path) -> dict[int, Path]:
    """Complete checkpoints by step (ordered by step, not file time)."""
    out = {}
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def write_trainer_state(folder: str | Path, state: TrainingState) -> None:
    """The one writer of trainer_state.json. Atomic: a reader sees the old file or the new one."""
    tmp = Path(folder, STATE_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(state.state_dict(), indent=2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, Path(folder, STATE_FILE))


def read_trainer_state(folder: str | Path) -> TrainingState:
    try:
        return TrainingState.load(folder)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{str(Path(folder) / STATE_FILE)!r} is unreadable ({type(e).__name__}: {e}); "
                              f"resume from another checkpoint.") from None


# --------------------------------------------------------------------------- integrity


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST_FILE, STATE_FILE)
                  and not p.name.endswith(".tmp"))


def file_entry(path: Path) -> dict:
    """A file's manifest entry, after it is fsynced: on disk before the rename that publishes it."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def write_manifest(folder: Path, known: Optional[dict] = None) -> None:
    """Every file's size and SHA-256 (`known`: entries a background writer already computed), before the
    folder is marked complete."""
    known = known or {}
    entries = {}
    for p in _files(folder):
        name = str(p.relative_to(folder))
        entries[name] = known[name] if name in known else file_entry(p)
    tmp = folder / (MANIFEST_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps({"files": entries}, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST_FILE)


def verify(folder: str | Path) -> Optional[str]:
    """None if the checkpoint is intact, else the first problem (naming the file)."""
    folder = Path(folder)
    try:
        read_trainer_state(folder)
    except CheckpointError as e:
        return str(e)
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return None  # written by v0.1 (no manifest): nothing to check against
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{str(manifest)!r} is unreadable ({e})"
    for name, meta in entries.items():
        p = folder / name
        if not p.is_file():
            return f"{str(p)!r} is missing"
        if p.stat().st_size != meta["size"]:
            return f"{str(p)!r} has {p.stat().st_size} bytes, {meta['size']} were written"
        if _sha256(p) != meta["sha256"]:
            return f"{str(p)!r} is corrupt (checksum differs from the one written)"
    return None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_folder(path: Path) -> None:
    """Rename out of the checkpoint namespace first, then delete: a kill mid-delete leaves a hidden folder."""
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}.deleting-{os.getpid()}")
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def disk_full(e: BaseException, path: Path) -> bool:
    """Whether a failed write ran out of space. safetensors and torch.save report a full disk in their own words
    (`SafetensorError`, `RuntimeError: ... unexpected pos`), so the free space itself is asked too."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left" in str(e):
        return True
    try:
        return shutil.disk_usage(path.parent).free < 1 << 20
    except OSError:
        return False


def write_failed(e: BaseException, path: Path) -> CheckpointError:
    """One line for a checkpoint write that failed: a full disk says so and names the path."""
    if disk_full(e, path):
        return CheckpointError(f"No space left on the device while writing {str(path)!r}: free disk space (or "
                               f"lower save_total_limit) and resume with --resume_from_checkpoint latest; "
                               f"earlier checkpoints are intact.")
    detail = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
    return CheckpointError(f"Could not write {str(path)!r}: {detail}.")


# --------------------------------------------------------------------------- save / load


def save_checkpoint(accelerator, folder: Path, state: TrainingState, model, tokenizer, config_yaml: str) -> None:
    """Collective: every rank must call it. Writes the checkpoint of `state` to `folder` atomically."""
    partial = folder.with_name(f".{folder.name}.partial")
    failed = None
    try:
        if accelerator.is_main_process and partial.exists():
            shutil.rmtree(partial)  # leftover of an interrupted save
        accelerator.wait_for_everyone()
        with _frozen_base_left_out(accelerator, model, loading=False) as kwargs:
            # model (or adapter), optimizer, scheduler, scaler, sampler, RNG of every rank
            accelerator.save_state(str(partial), **kwargs)
        save_model_weights(accelerator, model, partial)  # collective: the from_pretrained / adapter form
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.config.save_pretrained(partial)  # with model.safetensors: loadable by from_pretrained
            if tokenizer is not None:
                tokenizer.save_pretrained(partial)
            (partial / CONFIG_FILE).write_text(config_yaml)  # resume compares against it
    except Exception as e:  # a full disk surfaces as OSError, SafetensorError or RuntimeError
        failed = e
    from .distributed import all_agree

    if all_agree(accelerator, failed is not None):  # collective: every rank fails the same way
        # Judged before the partial folder is removed: a full disk is recognised by its free space too.
        error = write_failed(failed, partial) if failed is not None else CheckpointError(
            f"Another process failed while writing {str(partial)!r}; see its error above.")
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)  # give the space back; earlier checkpoints are untouched
        raise error
    if accelerator.is_main_process:
        complete(partial, folder, state)
    accelerator.wait_for_everyone()


def complete(partial: Path, folder: Path, state: TrainingState, known: Optional[dict] = None) -> None:
    """Main process, once every rank's files are on disk: manifest, trainer_state.json last, fsync, rename."""
    try:
        write_manifest(partial, known)
        write_trainer_state(partial, state)  # written last: marks the checkpoint complete
        fsync_dir(partial)
    except Exception as e:
        error = write_failed(e, partial)
        shutil.rmtree(partial, ignore_errors=True)
        raise error from None
    if folder.exists():  # the same step saved again (e.g. after a resume): replace it atomically
        remove_folder(folder)
    partial.rename(folder)
    fsync_dir(folder.parent)


def load_checkpoint(accelerator, path: str | Path, model=None) -> TrainingState:
    """Collective: restore model (or adapter), optimizer, scheduler, scaler, RNG; return the loop state.
    `model`: the prepared model (default: the one the Accelerator prepared)."""
    path = Path(path)
    state = read_trainer_state(path)
    model = model if model is not None else accelerator._models[0]
    peft = lora.is_peft(accelerator.unwrap_model(model))
    has_adapter = (path / lora.ADAPTER_DIR).is_dir()
    if peft != has_adapter:
        raise CheckpointError(
            f"{path.name} was written {'with' if has_adapter else 'without'} LoRA and this run has use_peft="
            f"{str(peft).lower()}: resume with use_peft={str(has_adapter).lower()}, or start a new run in another "
            f"output_dir.")
    try:
        with _frozen_base_left_out(accelerator, model, loading=True) as kwargs:
            accelerator.load_state(str(path), **kwargs)
        if peft and not _backend_saves_adapter(accelerator):
            load_adapter(accelerator, model, path / lora.ADAPTER_DIR)
    except Exception as e:
        problem = verify(path)
        if problem:
            raise CheckpointError(f"Could not restore checkpoint {str(path)!r}: {problem}. Resume another "
                                  f"checkpoint or start fresh.") from e
        raise CheckpointError(f"Could not restore checkpoint {str(path)!r} ({type(e).__name__}: {e}); its files "
                              f"are intact, so it was written by a different model or distributed setup.") from e
    return state


def delete_checkpoints(accelerator, output_dir: str | Path, steps: list[int]) -> None:
    if not accelerator.is_main_process:
        return
    ckpts = list_checkpoints(output_dir)
    for s in steps:
        if s in ckpts:
            remove_folder(ckpts[s])


# --------------------------------------------------------------------------- backend formats
#
# What `save_state` writes for the model depends on the backend: DDP a `model.safetensors`, DeepSpeed its
# engine checkpoint (`pytorch_model/`), FSDP2 a torch.distributed.checkpoint folder (`pytorch_model_fsdp_0/`,
# one shard per rank). Every checkpoint also gets the form a user (and the best-model reload) reads without
# the backend: a consolidated `model.safetensors`, or with LoRA the `adapter/` folder.


def _backend_saves_adapter(accelerator) -> bool:
    """Whether `save_state` / `load_state` handle a LoRA model's trainable weights themselves (DeepSpeed's engine
    checkpoint, FSDP2's sharded one); under DDP the adapter folder is the model's only copy."""
    return is_deepspeed(accelerator) or is_fsdp(accelerator)


@contextlib.contextmanager
def _frozen_base_left_out(accelerator, model, loading: bool):
    """While saving or loading a LoRA model's state: the frozen pretrained weights stay out of the checkpoint,
    which then holds the adapter and its optimizer state only. Yields extra `save_state` / `load_state`
    arguments. Without LoRA: nothing changes."""
    if not lora.is_peft(accelerator.unwrap_model(model)):
        yield {}
        return
    if is_deepspeed(accelerator):
        # The engine checkpoint then holds the trainable parameters only; loading it must not ask for the rest.
        yield {"load_module_strict": False} if loading else {"exclude_frozen_parameters": True}
        return
    if is_fsdp(accelerator):
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
    stage = zero_stage(accelerator)
    if stage is None and not is_fsdp(accelerator):
        return  # accelerate's save_state already wrote model.safetensors
    # ZeRO-3 and FSDP2 gather the shards with collectives (every rank); with ZeRO-1/2 every rank holds the model.
    sharded = stage == 3 or is_fsdp(accelerator)
    state_dict = accelerator.get_state_dict(model) if sharded or accelerator.is_main_process else None
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
    if zero_stage(accelerator) == 3 or is_fsdp(accelerator):
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
    if not is_fsdp(accelerator):
        return
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _is_sharded(accelerator, p) -> bool:
    from torch.distributed.tensor import DTensor

    return zero_stage(accelerator) == 3 or isinstance(p, DTensor)


def _gather(accelerator, p):
    """Collective: the whole parameter, on the CPU of the main process (None elsewhere)."""
    import torch
    from torch.distributed.tensor import DTensor

    main = accelerator.is_main_process
    with torch.no_grad():
        if zero_stage(accelerator) == 3:
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
        if zero_stage(accelerator) == 3:
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


def export_model(accelerator, model, tokenizer, output_dir: str | Path) -> None:
    """Collective: the final model as a `save_pretrained` folder (safetensors) with its tokenizer. With LoRA:
    the adapter in `output_dir/adapter/` and, unless merge_adapters_at_export is off, the merged model in
    `output_dir`, built on the main process from the gathered weights (the training model is not changed)."""
    unwrapped = accelerator.unwrap_model(model)
    if lora.is_peft(unwrapped):
        save_adapter(accelerator, model, Path(output_dir) / lora.ADAPTER_DIR)
        if lora.merge_at_export(unwrapped):
            state_dict = accelerator.get_state_dict(model)  # all ranks: consolidates ZeRO-3 / FSDP2 shards
            if accelerator.is_main_process:
                try:
                    merged = lora.merged_model(unwrapped, state_dict)
                except ValueError as e:
                    raise CheckpointError(f"Could not merge the LoRA adapter for the export: {e}. The adapter is "
                                          f"in {str(Path(output_dir) / lora.ADAPTER_DIR)!r}.") from None
                del state_dict
                merged.save_pretrained(output_dir, safe_serialization=True)
    else:
        state_dict = accelerator.get_state_dict(model)  # all ranks: consolidates ZeRO-3 / FSDP2 shards
        if accelerator.is_main_process:
            unwrapped.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
    if accelerator.is_main_process and tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    accelerator.wait_for_everyone()
