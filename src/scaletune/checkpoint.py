"""Checkpoints on disk: the format of one checkpoint folder (atomic save, integrity, load).

Layout (Trainer's names): `output_dir/checkpoint-{step}/` holds the model (`model.safetensors` +
`config.json`, loadable with `from_pretrained`), the optimizer, scheduler, grad scaler, sampler and every
rank's RNG state (all by `accelerator.save_state`), the tokenizer, the run's `config.yaml`, a
`trainer_state.json` and a `manifest.json` (the size and SHA-256 of every other file). Under DeepSpeed and FSDP2,
`save_state` writes the backend's sharded format (`pytorch_model/`, `pytorch_model_fsdp_0/` + `optimizer_0/`)
and `model.safetensors` is consolidated from the shards. With LoRA (`use_peft`) a checkpoint holds
`adapter/` (peft's format) and the adapter's optimizer state instead: never the frozen pretrained weights.

Atomicity (§26): everything is written into `.checkpoint-{step}.partial/`; when every rank has finished,
the main process writes `trainer_state.json`, then the manifest, fsyncs the files and the folder, and renames
the folder. A crash mid-save leaves a `.partial` folder that is never picked up. Deleting a checkpoint first
renames it out of the `checkpoint-N` namespace, so a kill during deletion never leaves a half-deleted
folder that `latest` would pick. A resume checks every file against the manifest and the state files against
each other (the step in the folder name, trainer_state.json, the scheduler; the processes and RNG files).

The lifecycle (when to save, rotation, resume resolution, best reload) is `checkpointer.Checkpointer`'s; the
weights under each backend (consolidation, adapters, best-weights reload, export) are `model_weights.py`'s.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Optional

from . import lora
from .disk import fsync_dir, fsync_file, readable_as_umask_allows, remove_folder, write_failed, write_text_atomically
from .distributed.backend import Backend
from .distributed.collectives import agree_on_write
from .errors import CheckpointError
from .model_weights import frozen_base_left_out, load_adapter, save_model_weights
from .state import STATE_FILE, TrainingState

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_RNG_RE = re.compile(r"^random_states_(\d+)\.pkl$")  # accelerate's RNG_STATE_NAME, one file per process
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
    write_text_atomically(Path(folder, STATE_FILE), json.dumps(state.state_dict(), indent=2))


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
    """Every file of the checkpoint but the manifest itself (`trainer_state.json` included)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE
                  and not p.name.endswith(".tmp"))


def file_entry(path: Path) -> dict:
    """A file's manifest entry, after it is fsynced: on disk before the rename that publishes it."""
    fsync_file(path)
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def write_manifest(folder: Path, known: Optional[dict] = None) -> None:
    """Every file's size and SHA-256 (`known`: entries a background writer already computed), before the
    folder is marked complete."""
    known = known or {}
    entries = {}
    for p in _files(folder):
        name = str(p.relative_to(folder))
        entries[name] = known[name] if name in known else file_entry(p)
    write_text_atomically(folder / MANIFEST_FILE, json.dumps({"files": entries}, indent=1))


def verify(folder: str | Path) -> Optional[str]:
    """None if the checkpoint is intact, else the first problem (naming the file). Every version of scaletune
    (0.1.0, never released without it) writes a manifest: a checkpoint without one is damaged, since nothing
    can tell which of its files are whole."""
    folder = Path(folder)
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return f"{str(manifest)!r} is missing"
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
    for p in _files(folder):
        if str(p.relative_to(folder)) not in entries:
            return f"{str(p)!r} is not in {str(manifest)!r} (added after the save)"
    if STATE_FILE not in entries:
        return f"{str(manifest)!r} does not cover {STATE_FILE}"
    try:
        state = read_trainer_state(folder)
    except CheckpointError as e:
        return str(e)
    return _disagreement(folder, state)


def _disagreement(folder: Path, state: TrainingState) -> Optional[str]:
    """What the state files of a checksummed checkpoint say that cannot be true together (no torch: the
    scheduler's own step count is compared when it loads, `check_schedule`)."""
    m = _CKPT_RE.match(folder.name)
    if m and int(m.group(1)) != state.global_step:
        return f"{str(folder / STATE_FILE)!r} says global step {state.global_step} in {folder.name}"
    ranks = sorted(int(r.group(1)) for r in map(_RNG_RE.match, (p.name for p in folder.iterdir())) if r)
    if ranks and ranks != list(range(state.world_size)):
        return (f"{str(folder / STATE_FILE)!r} says {state.world_size} process(es) wrote it, and it holds the random "
                f"state of {len(ranks)}")
    return None


def check_schedule(folder: Path, state: TrainingState) -> None:
    """The learning-rate schedule in `scheduler.bin` has stepped once per applied update (§18): a schedule of
    another step would resume with the wrong learning rates. An fp16 overflow skips a step of the schedule
    too, which is not counted: where one can happen (a grad scaler's `scaler.pt`, or DeepSpeed's engine
    checkpoint `pytorch_model/`, whose fp16 loss scaling is its own) the schedule may only lag."""
    path = folder / "scheduler.bin"
    if not path.is_file():
        return  # DeepSpeed keeps it in its engine checkpoint; save_only_model has none
    import torch

    try:
        saved = torch.load(path, weights_only=True)
    except Exception:  # a scheduler whose state is not plain data: load_state reads it, or says why not
        return
    if not isinstance(saved, dict) or "lr_lambdas" not in saved:
        return  # a metric-driven schedule (reduce_lr_on_plateau) steps on evaluations
    applied = state.global_step - state.skipped_updates
    stepped = saved["last_epoch"]
    overflow_skips = (folder / "scaler.pt").is_file() or (folder / "pytorch_model").is_dir()
    if stepped > applied or (stepped < applied and not overflow_skips):
        raise CheckpointError(f"{str(path)!r} has stepped the learning-rate schedule {stepped} time(s), and "
                              f"{str(folder / STATE_FILE)!r} says {applied} updates were applied: its files are of "
                              f"different steps. Resume from another checkpoint.")


# --------------------------------------------------------------------------- save / load


def save_checkpoint(accelerator, folder: Path, state: TrainingState, model, tokenizer, config_yaml: str) -> None:
    """Collective: every rank must call it. Writes the checkpoint of `state` to `folder` atomically."""
    partial = folder.with_name(f".{folder.name}.partial")
    failed = None
    try:
        if accelerator.is_main_process and partial.exists():
            shutil.rmtree(partial)  # leftover of an interrupted save
        accelerator.wait_for_everyone()
        with frozen_base_left_out(accelerator, model, loading=False) as kwargs:
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
    agree_on_write(accelerator, failed, partial)  # collective: every rank fails the same way
    if accelerator.is_main_process:
        complete(partial, folder, state)
    accelerator.wait_for_everyone()


def complete(partial: Path, folder: Path, state: TrainingState, known: Optional[dict] = None) -> None:
    """Main process, once every rank's files are on disk: trainer_state.json, the manifest, fsync, rename."""
    readable_as_umask_allows(partial.rglob("*"))
    try:
        write_trainer_state(partial, state)
        write_manifest(partial, known)  # every file, trainer_state.json included; the rename publishes them
        fsync_dir(partial)
    except Exception as e:
        error = write_failed(e, partial)
        shutil.rmtree(partial, ignore_errors=True)
        raise error from None
    if folder.exists():  # the same step saved again (e.g. after a resume): replace it atomically
        remove_folder(folder)
    partial.rename(folder)
    fsync_dir(folder.parent)


def load_checkpoint(accelerator, path: str | Path, model=None, state: Optional[TrainingState] = None) -> TrainingState:
    """Collective: restore model (or adapter), optimizer, scheduler, scaler, RNG; return the loop state.
    `model`: the prepared model (default: the one the Accelerator prepared); `state`: the loop state already
    read from the checkpoint (when the resume was resolved), else read here."""
    path = Path(path)
    state = state if state is not None else read_trainer_state(path)
    check_schedule(path, state)
    model = model if model is not None else accelerator._models[0]
    peft = lora.is_peft(accelerator.unwrap_model(model))
    has_adapter = (path / lora.ADAPTER_DIR).is_dir()
    if peft != has_adapter:
        raise CheckpointError(
            f"{path.name} was written {'with' if has_adapter else 'without'} LoRA and this run has use_peft="
            f"{str(peft).lower()}: resume with use_peft={str(has_adapter).lower()}, or start a new run in another "
            f"output_dir.")
    try:
        with frozen_base_left_out(accelerator, model, loading=True) as kwargs:
            accelerator.load_state(str(path), **kwargs)
        if peft and not Backend.of(accelerator).engine_saves:  # the engine's checkpoint held the adapter
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
