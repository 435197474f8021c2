"""The checkpoint lifecycle, owned in one place.

Before anything expensive (`preflight`, no torch): lock the output dir for this run (lock.py), resolve
`resume_from_checkpoint` (verifying `latest` and falling back past a damaged one, never silently) and refuse
to clobber another run. Before the model loads: compare the checkpoint's training config with this one.
During training (`Checkpointer`): save + rotate (the best checkpoint is a step, never deleted), load.
At the end: reload the best weights, the final rotation, export, and the final `trainer_state.json`.

The disk format of one checkpoint (atomic write, manifest, load, ZeRO-3 details) is `checkpoint.py`'s.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

import yaml

from . import checkpoint, model_weights, schedule
from .errors import CheckpointError
from .lock import acquire_lock
from .state import STATE_FILE, TrainingState, checkpoint_name

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

    from .background_save import BackgroundSave, HostStaging
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


def _say(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # before the Accelerator exists: rank from the launcher's env
        print(f"scaletune: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- preflight (no torch)


def preflight(args: TrainingArguments, env: Mapping[str, str] = os.environ) -> Optional[Path]:
    """Checks and claims the output dir before any model or data is loaded. Returns the checkpoint to resume."""
    root = Path(args.output_dir)
    check_writable(root)
    if env.get("RANK", "0") == "0":
        acquire_lock(root, env)
        remove_leftovers(root)
    resume = resolve_resume(root, args.resume_from_checkpoint)
    if resume is not None:
        check_trusted(resume, root, args.trust_checkpoint, env)
        adapt_to_world_size(resume, args, int(env.get("WORLD_SIZE", "1")), env)
    existing = checkpoint.list_checkpoints(root)
    if existing and resume is None and not args.overwrite_output_dir:
        names = ", ".join(p.name for p in existing.values())
        raise CheckpointError(
            f"output_dir {str(root)!r} already holds checkpoints ({names}). Pass --resume_from_checkpoint latest "
            f"to continue that run, --overwrite_output_dir true to start over, or choose another --output_dir.")
    return resume


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
    from .distributed import deepspeed_requested

    if trusted or not deepspeed_requested(env) or path.resolve().parent == root.resolve():
        return
    raise CheckpointError(f"{str(path)!r} is outside this run's output_dir, and DeepSpeed resumes by unpickling "
                          f"(code in a checkpoint from an untrusted source would run): copy it into "
                          f"{str(root)!r}, or pass --trust_checkpoint true if you trust its source.")


def rescaled_accumulation(accumulation: int, saved_world: int, world: int) -> Optional[int]:
    """Pure: the accumulation that keeps the global batch (per-device batch x accumulation x processes) when a
    run saved on `saved_world` processes resumes on `world`; None when no whole number does."""
    total = accumulation * saved_world
    return total // world if total % world == 0 else None


def adapt_to_world_size(path: Path, args: TrainingArguments, world: int, env: Mapping[str, str]) -> None:
    """Resume on another number of processes (DDP, FSDP2 whose checkpoints reshard on load, DeepSpeed through
    its universal checkpoint, zero_universal.py): the data position is a number of samples of the global
    order (a function of data_seed and epoch), so it carries over; the global batch is kept by rescaling
    gradient_accumulation_steps, said aloud. Anything that cannot be carried over exactly is an error."""
    state = checkpoint.read_trainer_state(path)
    saved = state.world_size
    if saved == world:
        return
    where = f"{path.name} was written by {saved} process(es) and this run has {world}"
    accumulation = rescaled_accumulation(args.gradient_accumulation_steps, saved, world)
    if accumulation is None:
        raise CheckpointError(
            f"{where}: keeping its global batch needs gradient_accumulation_steps x {saved} / {world} to be a whole "
            f"number, and gradient_accumulation_steps is {args.gradient_accumulation_steps}; resume on a process "
            f"count that divides {args.gradient_accumulation_steps * saved}.")
    if (state.batches_in_epoch * saved) % world:
        raise CheckpointError(f"{where}: its position ({state.batches_in_epoch} batches into the epoch on each of "
                              f"{saved} processes) is not a whole number of batches on {world}; resume on {saved}.")
    if accumulation != args.gradient_accumulation_steps:
        _say(f"{where}: gradient_accumulation_steps {args.gradient_accumulation_steps} -> {accumulation} keeps "
             f"the global batch of the checkpoint's run.")
        args.gradient_accumulation_steps = accumulation


def config_differences(saved: Mapping, current: Mapping) -> tuple[list[str], list[str]]:
    """Pure: (keys whose change breaks an exact resume, keys that may change), each as 'key: old -> new'."""
    breaking, allowed = [], []
    for key in sorted(set(saved) | set(current)):
        if key in _IGNORED_ON_RESUME or saved.get(key) == current.get(key):
            continue
        line = f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
        (breaking if key in RESUME_BREAKING_KEYS else allowed).append(line)
    return breaking, allowed


def check_resume_compatible(path: Path, config: Mapping, world_size: int) -> None:
    """Before the model loads (after the data is read, so a data error is reported as such): the checkpoint
    continues exactly only with the same data-defining settings and global batch (§16). A different process
    count was adapted to in `preflight` (accumulation rescaled); here it must match that adaptation."""
    state = checkpoint.read_trainer_state(path)
    accumulation = config.get("gradient_accumulation_steps")
    saved_file = path / checkpoint.CONFIG_FILE
    if not saved_file.is_file():
        return  # written by v0.1, which stored no config in checkpoints
    saved = yaml.safe_load(saved_file.read_text()) or {}
    if state.world_size != world_size and accumulation == rescaled_accumulation(
            saved.get("gradient_accumulation_steps", accumulation), state.world_size, world_size):
        saved = {**saved, "gradient_accumulation_steps": accumulation}  # the same global batch, on another count
    breaking, allowed = config_differences(saved, config)
    if breaking:
        raise CheckpointError(f"Cannot resume {path.name} exactly: " + "; ".join(breaking) + ". Use the "
                              "checkpoint's values (its config.yaml), or start a new run in another output_dir.")
    if allowed:
        _say(f"resuming {path.name} with changed settings: " + "; ".join(allowed) + ".")


# --------------------------------------------------------------------------- one run per output dir


def remove_leftovers(root: Path) -> None:
    """With the lock held, nothing else writes here: interrupted saves (`.checkpoint-N.partial`), interrupted
    deletions (`.checkpoint-N.deleting-PID`) and an interrupted export (`.export.partial`, an earlier export's
    `.adapter.old-export`) are garbage; they never count as checkpoints or as the model."""
    for path in root.glob(".checkpoint-*"):
        if path.is_dir() and (path.name.endswith(".partial") or ".deleting-" in path.name or path.name.endswith(".old")):
            shutil.rmtree(path, ignore_errors=True)
    for path in (root / model_weights.EXPORT_STAGING, *root.glob(".*.old-export")):
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- during and after training


class Checkpointer:
    """Saves, rotates, loads and reloads the best checkpoint of one run. Collective methods: every rank calls."""

    def __init__(self, accelerator: Accelerator, args: TrainingArguments, model: torch.nn.Module,
                 tokenizer: Optional[PreTrainedTokenizerBase], config_yaml: str):
        self.accelerator = accelerator
        self.args = args
        self.root = Path(args.output_dir)
        self.model = model
        self.tokenizer = tokenizer
        self.config_yaml = config_yaml
        self.pending: Optional[BackgroundSave] = None
        self.staging: Optional[HostStaging] = None  # the background writer's host memory, made at its first save
        self.resumed_from: Optional[Path] = None
        self.pending_rotation: tuple[int, Optional[int]] = (0, None)
        # DeepSpeed, FSDP and LoRA checkpoints are written by their engines' own (collective) code: synchronous.
        from . import lora
        from .distributed import is_deepspeed, is_fsdp

        engine_saves = is_deepspeed(accelerator) or is_fsdp(accelerator) or lora.is_peft(accelerator.unwrap_model(model))
        if args.save_only_model and engine_saves:
            raise CheckpointError("save_only_model works with DDP and single-process runs; DeepSpeed, FSDP and LoRA "
                                  "checkpoints need their optimizer state: unset save_only_model.")
        # save_only_model uses the background writer's model-only form even when writing in the foreground.
        self.background = (args.save_in_background or args.save_only_model) and not engine_saves

    def start_fresh(self) -> None:
        """overwrite_output_dir: the earlier run's checkpoints go before this run's first save, so a later
        `resume_from_checkpoint latest` can never resume the old run. Done once everything is built, so a
        bad config or data file costs nothing already written."""
        if self.accelerator.is_main_process:
            for path in checkpoint.list_checkpoints(self.root).values():
                checkpoint.remove_folder(path)
        self.accelerator.wait_for_everyone()

    def save(self, state: TrainingState) -> None:
        """Write the checkpoint of this step: in the background where possible (training stalls only while the
        state is copied to host memory), after the previous background save is complete."""
        step = state.global_step
        if state.best_global_step == step:
            state.best_checkpoint_step = step
        state.world_size = self.accelerator.num_processes
        self.flush()
        folder = checkpoint.checkpoint_path(self.root, step)
        if self.background:
            from .background_save import BackgroundSave, HostStaging  # torch: not imported by preflight

            self.staging = self.staging or HostStaging()
            self.pending = BackgroundSave(self.accelerator, folder, state, self._write_extras, self.staging,
                                          model_only=self.args.save_only_model)
            self.pending_rotation = (step, state.best_checkpoint_step)
            return
        checkpoint.save_checkpoint(self.accelerator, folder, state, self.model, self.tokenizer, self.config_yaml)
        self._rotate(step, state.best_checkpoint_step)

    def flush(self) -> None:
        """Collective: complete the background save in flight, if any (before the next save, the best-model
        reload, the export, and before a preempted or failed run exits)."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        pending.finish()
        self._rotate(*self.pending_rotation)

    def _rotate(self, step: int, best_step: Optional[int]) -> None:
        steps = list(checkpoint.list_checkpoints(self.root))
        checkpoint.delete_checkpoints(self.accelerator, self.root, schedule.checkpoints_to_delete(
            steps, self.args.save_total_limit, best_step, step))
        self.accelerator.wait_for_everyone()

    def _write_extras(self, folder: Path) -> None:
        """Main process, in the writer thread: what makes the folder a `from_pretrained` model and a resumable
        run besides the tensors."""
        self.accelerator.unwrap_model(self.model).config.save_pretrained(folder)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        (folder / checkpoint.CONFIG_FILE).write_text(self.config_yaml)

    def load(self, path: Path) -> TrainingState:
        if self.background and not (path / "optimizer.bin").is_file() and (path / "model.safetensors").is_file():
            raise CheckpointError(f"{path.name} holds the model only (saved with save_only_model): it has no optimizer, "
                                  f"scheduler or RNG state to resume from. Start a new run from its weights "
                                  f"(--model_name_or_path {path}).")
        from .zero_universal import loadable

        world, saved_world = self.accelerator.num_processes, checkpoint.read_trainer_state(path).world_size
        with loadable(self.accelerator, self.model, path, saved_world, self.root) as folder:
            state = checkpoint.load_checkpoint(self.accelerator, folder, self.model)
        self.resumed_from = path
        if state.world_size != world:
            # The same samples of the global order were consumed: batch k of rank r is global batch k*world+r.
            state.batches_in_epoch = state.batches_in_epoch * state.world_size // world
            if world > state.world_size:
                self.accelerator.print(f"scaletune: processes {state.world_size}..{world - 1} start with a fresh "
                                       f"random state (the checkpoint has {state.world_size}).")
            else:
                self.accelerator.print(f"scaletune: the random state of processes {world}..{state.world_size - 1} "
                                       f"is dropped (the checkpoint has {state.world_size}, this run has {world}).")
            state.world_size = world
        return state

    def latest_name(self) -> Optional[str]:
        steps = checkpoint.list_checkpoints(self.root)
        return checkpoint_name(max(steps)) if steps else None

    def best_path(self, state: TrainingState) -> Optional[Path]:
        """The best checkpoint, found relative to this run's output dir (so a moved or copied output dir works);
        a run resumed from a checkpoint in another folder may find its best checkpoint next to that one."""
        name = checkpoint_name(state.best_checkpoint_step)
        if name is None:
            return None
        here = self.root / name
        if not here.is_dir() and self.resumed_from is not None and (self.resumed_from.parent / name).is_dir():
            return self.resumed_from.parent / name
        return here

    def reload_best(self, state: TrainingState) -> None:
        """load_best_model_at_end: the best weights (not optimizer state), then the final rotation (§11)."""
        self.flush()
        best = self.best_path(state)
        if not self.args.load_best_model_at_end or best is None:
            return
        self.accelerator.print(f"Loading best model from {best} (score: {state.best_metric}).")
        model_weights.load_model_weights(self.accelerator, self.model, best)
        steps = list(checkpoint.list_checkpoints(self.root))
        checkpoint.delete_checkpoints(self.accelerator, self.root, schedule.final_checkpoints_to_delete(
            steps, self.args.save_total_limit, state.best_checkpoint_step))

    def export(self) -> None:
        model_weights.export_model(self.accelerator, self.model, self.tokenizer, self.root)

    def write_final_state(self, state: TrainingState) -> None:
        if self.accelerator.is_main_process:
            checkpoint.write_trainer_state(self.root, state)
