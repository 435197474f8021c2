"""Checkpoints on disk: the format of one checkpoint folder (atomic save, integrity, load, export).

Layout (Trainer's names): `output_dir/checkpoint-{step}/` holds the model (`model.safetensors` +
`config.json`, loadable with `from_pretrained`), the optimizer, scheduler, grad scaler, sampler and every
rank's RNG state (all by `accelerator.save_state`), the tokenizer, the run's `config.yaml`, a
`manifest.json` (every file's size and SHA-256) and `trainer_state.json`.

Atomicity (§26): everything is written into `.checkpoint-{step}.partial/`; when every rank has finished,
the main process writes the manifest and `trainer_state.json`, fsyncs the files and the folder, and renames
the folder. A crash mid-save leaves a `.partial` folder that is never picked up. Deleting a checkpoint first
renames it out of the `checkpoint-N` namespace, so a kill during deletion never leaves a half-deleted
folder that `latest` would pick.

The lifecycle (when to save, rotation, resume resolution, best reload) is `checkpointer.Checkpointer`'s.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from .distributed import zero_stage
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


def write_manifest(folder: Path) -> None:
    """Every file's size and SHA-256, fsynced with the files themselves, before the folder is marked complete."""
    entries = {}
    for p in _files(folder):
        with open(p, "rb") as f:
            os.fsync(f.fileno())  # data on disk before the rename that publishes it
        entries[str(p.relative_to(folder))] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    tmp = folder / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps({"files": entries}, indent=1))
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


def out_of_space(e: OSError, path: Path) -> CheckpointError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointError(f"No space left on the device while writing {str(path)!r}: free disk space (or "
                               f"lower save_total_limit) and resume with --resume_from_checkpoint latest; "
                               f"earlier checkpoints are intact.")
    return CheckpointError(f"Could not write {str(path)!r}: {e.strerror or e}.")


# --------------------------------------------------------------------------- save / load


def save_checkpoint(accelerator, folder: Path, state: TrainingState, model, tokenizer, config_yaml: str) -> None:
    """Collective: every rank must call it. Writes the checkpoint of `state` to `folder` atomically."""
    partial = folder.with_name(f".{folder.name}.partial")
    failed = None
    try:
        if accelerator.is_main_process and partial.exists():
            shutil.rmtree(partial)  # leftover of an interrupted save
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))  # model, optimizer, scheduler, scaler, sampler, RNG of every rank
        save_deepspeed_weights(accelerator, model, partial)  # collective; no-op outside DeepSpeed
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.config.save_pretrained(partial)  # with model.safetensors: loadable by from_pretrained
            if tokenizer is not None:
                tokenizer.save_pretrained(partial)
            (partial / CONFIG_FILE).write_text(config_yaml)  # resume compares against it
    except OSError as e:
        failed = e
    from .distributed import all_agree

    if all_agree(accelerator, failed is not None):  # collective: every rank fails the same way
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)  # give the space back; earlier checkpoints are untouched
        raise out_of_space(failed, partial) if failed is not None else CheckpointError(
            f"Another process failed while writing {str(partial)!r}; see its error above.")
    if accelerator.is_main_process:
        try:
            write_manifest(partial)
            write_trainer_state(partial, state)  # written last: marks the checkpoint complete
            fsync_dir(partial)
        except OSError as e:
            shutil.rmtree(partial, ignore_errors=True)
            raise out_of_space(e, partial) from None
        if folder.exists():  # the same step saved again (e.g. after a resume): replace it atomically
            remove_folder(folder)
        partial.rename(folder)
        fsync_dir(folder.parent)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, path: str | Path) -> TrainingState:
    """Collective: restore model, optimizer, scheduler, scaler, RNG; return the loop state."""
    path = Path(path)
    state = read_trainer_state(path)
    try:
        accelerator.load_state(str(path))
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


def load_model_weights(accelerator, model, path: str | Path) -> None:
    """Weights only (no optimizer state): the best-model reload at the end (cf. transformers issue 25027)."""
    from safetensors.torch import load_file

    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{str(path)!r} has no model.safetensors to reload the best model from.")
    unwrapped = accelerator.unwrap_model(model)
    if zero_stage(accelerator) == 3:
        missing = _load_into_zero3(unwrapped, weights, accelerator.is_main_process)
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


def save_deepspeed_weights(accelerator, model, folder: str | Path) -> None:
    """Collective. Under DeepSpeed, `save_state` writes only DeepSpeed's sharded format: add the
    `model.safetensors` that accelerate writes for DDP (same parameter names), consolidated from the ZeRO-3
    shards, so the checkpoint loads with `from_pretrained` and the best-model reload reads weights only."""
    from accelerate.utils import clean_state_dict_for_safetensors

    stage = zero_stage(accelerator)
    if stage is None:
        return  # accelerate's save_state already wrote model.safetensors
    # ZeRO-3 gathers the shards with collectives (every rank); with ZeRO-1/2 every rank holds the whole model.
    state_dict = accelerator.get_state_dict(model) if stage == 3 or accelerator.is_main_process else None
    if accelerator.is_main_process:
        accelerator.save(clean_state_dict_for_safetensors(state_dict), str(Path(folder) / "model.safetensors"),
                         safe_serialization=True)


def _load_into_zero3(module, weights: Path, is_main: bool) -> list[str]:
    """Collective. Copy a safetensors file into ZeRO-3-partitioned parameters, one parameter at a time: rank 0
    reads the tensor and GatheredParameters re-shards it, so no rank holds the whole model or any optimizer
    state (transformers issue 25027). Only the 16-bit/compute weights change: the optimizer's fp32 master
    copy is left as is, which is fine for the end-of-training reload (no update follows). Returns the
    parameter names not found in the file."""
    import deepspeed
    from safetensors import safe_open

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
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if is_main:
                    p.data.copy_(f.get_tensor(key))
        for name, buf in module.named_buffers():  # not partitioned: every rank loads its own copy
            if name in keys:
                buf.data.copy_(f.get_tensor(name))
    return missing


def export_model(accelerator, model, tokenizer, output_dir: str | Path) -> None:
    """Collective: the final model as a `save_pretrained` folder (safetensors) with its tokenizer."""
    state_dict = accelerator.get_state_dict(model)  # all ranks: consolidates ZeRO-3 shards
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
    accelerator.wait_for_everyone()
