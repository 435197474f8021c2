"""Before anything expensive (no torch): claim the output dir and decide what this run continues.

`preflight` locks the output dir for this run (lock.py), removes what interrupted writes left, resolves
`resume_from_checkpoint` (verifying `latest` and falling back past a damaged one, never silently), refuses
to clobber another run, and returns a `Resume`: the checkpoint's state and config read once, and the
gradient accumulation that keeps its global batch on this run's process count. Everything later
(the config comparison, the Accelerator's accumulation, the plan, `Checkpointer.load`) consumes that value;
nothing rewrites the training arguments.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

import yaml

from . import checkpoint
from .batch_search import reused_sizes
from .distributed.backend import Backend
from .errors import CheckpointError
from .lock import acquire_lock
from .model_weights import EXPORT_STAGING
from .state import STATE_FILE, TrainingState

if TYPE_CHECKING:
    from .config import TrainingArguments

# Keys that change what the saved data position, RNG and optimizer state mean: resuming with another value
# would not continue the same run (§16). Everything else may change on resume and is reported.
RESUME_BREAKING_KEYS = (
    "model_name_or_path", "config_name", "tokenizer_name", "task", "dataset_name", "dataset_config_name",
    "train_file", "validation_split_percentage", "max_train_samples", "text_column_names", "label_column_name",
    "text_column_name", "max_seq_length", "line_by_line", "mlm_probability", "seed", "data_seed",
    "per_device_train_batch_size", "gradient_accumulation_steps", "dataloader_drop_last",
    "use_peft", "lora_r", "lora_alpha", "lora_target_modules", "modules_to_save", "lora_bias",
)
# Keys that never say anything about the run itself.
_IGNORED_ON_RESUME = ("resume_from_checkpoint", "overwrite_output_dir", "output_dir")


@dataclass(frozen=True)
class Resume:
    """The checkpoint this run continues, read once (by `preflight`)."""

    path: Path
    saved: TrainingState
    """Its trainer_state.json."""
    saved_config: Optional[dict]
    """Its config.yaml (None for a v0.1 checkpoint, which stored none)."""
    world_size: int
    """This run's process count."""
    accumulation: int
    """gradient_accumulation_steps on `world_size` that keeps the checkpoint's global batch."""
    batch_sizes: Optional[dict] = None
    """The sizes auto_find_batch_size chose for the checkpoint's run, reused without a new search (or None)."""

    @property
    def same_world(self) -> bool:
        return self.saved.world_size == self.world_size


def _say(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # before the Accelerator exists: rank from the launcher's env
        print(f"scaletune: {message}", file=sys.stderr, flush=True)


def preflight(args: TrainingArguments, env: Mapping[str, str] = os.environ) -> Optional[Resume]:
    """Checks and claims the output dir before any model or data is loaded. Returns what to resume."""
    root = Path(args.output_dir)
    check_writable(root)
    if env.get("RANK", "0") == "0":
        acquire_lock(root, env)
        remove_leftovers(root)
    path = resolve_resume(root, args.resume_from_checkpoint)
    existing = checkpoint.list_checkpoints(root)
    if existing and path is None and not args.overwrite_output_dir:
        names = ", ".join(p.name for p in existing.values())
        raise CheckpointError(
            f"output_dir {str(root)!r} already holds checkpoints ({names}). Pass --resume_from_checkpoint latest "
            f"to continue that run, --overwrite_output_dir true to start over, or choose another --output_dir.")
    if path is None:
        return None
    check_trusted(path, root, args.trust_checkpoint, env)
    saved = checkpoint.read_trainer_state(path)
    config_file = path / checkpoint.CONFIG_FILE
    saved_config = (yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else None
    world = int(env.get("WORLD_SIZE", "1"))
    sizes = reused_sizes(args, saved_config)
    if sizes is not None:
        _say(f"auto_find_batch_size: {path.name}'s sizes are reused, no search: "
             + ", ".join(f"{key} {value}" for key, value in sizes.items()) + ".")
        args = dataclasses.replace(args, **sizes)  # its accumulation is the one rescaled below
    return Resume(path, saved, saved_config, world, accumulation_for(path.name, saved, args, world), sizes)


def check_writable(root: Path) -> None:
    probe = root / f".write-test-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
    except OSError as e:
        raise CheckpointError(f"output_dir {str(root)!r} is not writable ({e.strerror}); free space or choose "
                              f"another --output_dir.") from None
    finally:
        try:
            probe.unlink(missing_ok=True)  # also after a full disk: no leftover probe file
        except OSError:
            pass


def remove_leftovers(root: Path) -> None:
    """With the lock held, nothing else writes here: interrupted saves (`.checkpoint-N.partial`), interrupted
    deletions (`.checkpoint-N.deleting-PID`) and an interrupted export (`.export.partial`, an earlier export's
    `.adapter.old-export`) are garbage; they never count as checkpoints or as the model."""
    for path in root.glob(".checkpoint-*"):
        if path.is_dir() and (path.name.endswith(".partial") or ".deleting-" in path.name or path.name.endswith(".old")):
            shutil.rmtree(path, ignore_errors=True)
    for path in (root / EXPORT_STAGING, *root.glob(".*.old-export")):
        shutil.rmtree(path, ignore_errors=True)


def resolve_resume(root: Path, resume_from_checkpoint: Optional[str]) -> Optional[Path]:
    """`latest`/`true` -> the newest complete, intact checkpoint (§15), else None (a fresh start, said aloud);
    a damaged newest one is reported and skipped. An explicit path must be complete and intact."""
    if resume_from_checkpoint in (None, "", "false", "False"):
        return None
    if str(resume_from_checkpoint).lower() in ("latest", "true"):
        for step, path in reversed(checkpoint.list_checkpoints(root).items()):
            problem = checkpoint.verify(path)
            if problem is None:
                return path
            _say(f"checkpoint-{step} is damaged ({problem}); falling back to the previous checkpoint.")
        _say(f"no complete checkpoint in {str(root)!r}; starting fresh (resume_from_checkpoint=latest).")
        return None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"resume_from_checkpoint {str(path)!r} does not exist; use a checkpoint-N folder "
                              f"or 'latest'.")
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{str(path)!r} is not a complete checkpoint (no {STATE_FILE}): it may be an "
                              f"interrupted save. Resume from another checkpoint or 'latest'.")
    problem = checkpoint.verify(path)
    if problem:
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: {problem}. Resume from another checkpoint.")
    return path


def check_trusted(path: Path, root: Path, trusted: bool, env: Mapping[str, str]) -> None:
    """DeepSpeed resumes by unpickling its checkpoint files: only from this run's own output dir, unless the
    user vouches for the source (trust_checkpoint). Other backends load with torch.load(weights_only=True)."""
    if trusted or not Backend.requested(env).unpickles_checkpoints or path.resolve().parent == root.resolve():
        return
    raise CheckpointError(f"{str(path)!r} is outside this run's output_dir, and DeepSpeed resumes by unpickling "
                          f"(code in a checkpoint from an untrusted source would run): copy it into "
                          f"{str(root)!r}, or pass --trust_checkpoint true if you trust its source.")


def rescaled_accumulation(accumulation: int, saved_world: int, world: int) -> Optional[int]:
    """Pure: the accumulation that keeps the global batch (per-device batch x accumulation x processes) when a
    run saved on `saved_world` processes resumes on `world`; None when no whole number does."""
    total = accumulation * saved_world
    return total // world if total % world == 0 else None


def accumulation_for(name: str, saved: TrainingState, args: TrainingArguments, world: int) -> int:
    """Resume on another number of processes (DDP, FSDP2 whose checkpoints reshard on load, DeepSpeed through
    its universal checkpoint, zero_universal.py): the data position is a number of samples of the global
    order (a function of data_seed and epoch), so it carries over; the global batch is kept by rescaling
    gradient_accumulation_steps, said aloud. Anything that cannot be carried over exactly is an error."""
    given = args.gradient_accumulation_steps
    if saved.world_size == world:
        return given
    where = f"{name} was written by {saved.world_size} process(es) and this run has {world}"
    accumulation = rescaled_accumulation(given, saved.world_size, world)
    if accumulation is None:
        raise CheckpointError(
            f"{where}: keeping its global batch needs gradient_accumulation_steps x {saved.world_size} / {world} to "
            f"be a whole number, and gradient_accumulation_steps is {given}; resume on a process count that "
            f"divides {given * saved.world_size}.")
    if (saved.batches_in_epoch * saved.world_size) % world:
        raise CheckpointError(f"{where}: its position ({saved.batches_in_epoch} batches into the epoch on each of "
                              f"{saved.world_size} processes) is not a whole number of batches on {world}; resume "
                              f"on {saved.world_size}.")
    if accumulation != given:
        _say(f"{where}: gradient_accumulation_steps {given} -> {accumulation} keeps the global batch of the "
             f"checkpoint's run.")
    return accumulation


def config_differences(saved: Mapping, current: Mapping) -> tuple[list[str], list[str]]:
    """Pure: (keys whose change breaks an exact resume, keys that may change), each as 'key: old -> new'."""
    breaking, allowed = [], []
    for key in sorted(set(saved) | set(current)):
        if key in _IGNORED_ON_RESUME or saved.get(key) == current.get(key):
            continue
        line = f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
        (breaking if key in RESUME_BREAKING_KEYS else allowed).append(line)
    return breaking, allowed


def check_resume_compatible(resume: Resume, config: Mapping) -> None:
    """After the data is read (so a data error is reported as such), before the model loads: the checkpoint
    continues exactly only with the same data-defining settings and global batch (§16). `config` is this
    run's effective config, whose accumulation is `resume.accumulation`."""
    if resume.saved_config is None:
        return  # written by v0.1, which stored no config in checkpoints
    saved = resume.saved_config
    if not resume.same_world and resume.accumulation == rescaled_accumulation(
            saved.get("gradient_accumulation_steps", resume.accumulation), resume.saved.world_size,
            resume.world_size):
        saved = {**saved, "gradient_accumulation_steps": resume.accumulation}  # the same global batch
    breaking, allowed = config_differences(saved, config)
    if breaking:
        raise CheckpointError(f"Cannot resume {resume.path.name} exactly: " + "; ".join(breaking) + ". Use the "
                              "checkpoint's values (its config.yaml), or start a new run in another output_dir.")
    if allowed:
        _say(f"resuming {resume.path.name} with changed settings: " + "; ".join(allowed) + ".")
