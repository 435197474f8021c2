"""Checkpoints on disk: atomic save, latest complete, rotation, resume, best-weights reload, export.

Layout (Trainer's names): `output_dir/checkpoint-{step}/` holds the model
(`model.safetensors` + `config.json`, loadable with `from_pretrained`), the
optimizer, scheduler, grad scaler, sampler and every rank's RNG state (all by
`accelerator.save_state`), the tokenizer, and `trainer_state.json`.

Atomicity: everything is written into `.checkpoint-{step}.partial/`, and only
when every rank has finished does the main process write `trainer_state.json`
and rename the folder. A crash mid-save leaves a `.partial` folder that is
never picked up (and is cleaned on the next save of that step).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

from .distributed import zero_stage
from .errors import CheckpointError
from .state import STATE_FILE, TrainingState

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")




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


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    ckpts = list_checkpoints(output_dir)
    return ckpts[max(ckpts)] if ckpts else None


def resolve_resume(output_dir: str | Path, resume_from_checkpoint: Optional[str]) -> Optional[Path]:
    """`latest`/`true` -> highest complete checkpoint or None (fresh start, §15); a path must be complete."""
    if resume_from_checkpoint in (None, "", "false", "False"):
        return None
    if str(resume_from_checkpoint).lower() in ("latest", "true"):
        return latest_checkpoint(output_dir)
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"resume_from_checkpoint {str(path)!r} does not exist; use a checkpoint-N folder "
                              f"or 'latest'.")
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{str(path)!r} is not a complete checkpoint (no {STATE_FILE}): it may be an "
                              f"interrupted save. Resume from another checkpoint or 'latest'.")
    return path


def check_output_dir(output_dir: str | Path, resuming: bool, overwrite: bool) -> None:
    """Before any expensive work: the output dir is writable and we will not clobber another run."""
    root = Path(output_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"output_dir {str(root)!r} is not writable ({e.strerror}); choose another "
                              f"--output_dir.") from None
    existing = list_checkpoints(root)
    if existing and not resuming and not overwrite:
        names = ", ".join(p.name for p in existing.values())
        raise CheckpointError(
            f"output_dir {str(root)!r} already holds checkpoints ({names}). Pass --resume_from_checkpoint latest "
            f"to continue that run, --overwrite_output_dir true to start over, or choose another --output_dir."
        )


def save_checkpoint(accelerator, output_dir: str | Path, state: TrainingState, model, tokenizer) -> Path:
    """Collective: every rank must call it. Returns the final checkpoint path."""
    final = checkpoint_path(output_dir, state.global_step)
    partial = Path(output_dir) / f".{final.name}.partial"
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
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state.save(partial)  # written last: marks the checkpoint complete
        if final.exists():  # the same step saved again (e.g. after a resume): replace it atomically
            trash = final.with_name(f".{final.name}.old")
            shutil.rmtree(trash, ignore_errors=True)
            final.rename(trash)
            partial.rename(final)
            shutil.rmtree(trash)
        else:
            partial.rename(final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | Path) -> TrainingState:
    """Collective: restore model, optimizer, scheduler, scaler, RNG; return the loop state."""
    path = Path(path)
    try:
        accelerator.load_state(str(path))
    except Exception as e:
        raise CheckpointError(f"Could not restore checkpoint {str(path)!r}: {e}. Was it written by a run with the "
                              f"same model and distributed setup? Resume another checkpoint or start fresh.") from e
    return TrainingState.load(path)


def delete_checkpoints(accelerator, output_dir: str | Path, steps: list[int]) -> None:
    if not accelerator.is_main_process:
        return
    ckpts = list_checkpoints(output_dir)
    for s in steps:
        if s in ckpts:
            shutil.rmtree(ckpts[s], ignore_errors=True)


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
