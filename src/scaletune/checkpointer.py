"""The checkpoints of a running run, owned in one place (what to resume is decided before, in resume.py).

During training (`Checkpointer`): save + rotate (the best checkpoint is a step, never deleted), load.
At the end: reload the best weights, the final rotation, export, and the final `trainer_state.json`.

The disk format of one checkpoint (atomic write, manifest, load, ZeRO-3 details) is `checkpoint.py`'s.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from . import checkpoint, lora, model_weights, schedule
from .disk import remove_folder
from .distributed.backend import Backend
from .errors import CheckpointError
from .state import TrainingState, checkpoint_name

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

    from .background_save import BackgroundSave, HostStaging
    from .config import TrainingArguments
    from .resume import Resume


# Called on every rank, once per checkpoint, when that checkpoint is complete on disk (after a background save's
# completion): `(folder, state)`. The one use is an engine that must hear of each checkpoint (scaletune.ray).
OnSaved = Callable[[Path, TrainingState], None]


class Checkpointer:
    """Saves, rotates, loads and reloads the best checkpoint of one run. Collective methods: every rank calls."""

    def __init__(self, accelerator: Accelerator, args: TrainingArguments, model: torch.nn.Module,
                 tokenizer: Optional[PreTrainedTokenizerBase], config_yaml: str, on_saved: Optional[OnSaved] = None):
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
        self.on_saved = on_saved
        # DeepSpeed, FSDP and LoRA checkpoints are written by their engines' own (collective) code: synchronous.
        engine_saves = Backend.of(accelerator).engine_saves or lora.is_peft(accelerator.unwrap_model(model))
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
                remove_folder(path)
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
        self._completed(folder, state, step, state.best_checkpoint_step)

    def flush(self) -> None:
        """Collective: complete the background save in flight, if any (before the next save, the best-model
        reload, the export, and before a preempted or failed run exits)."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        pending.finish()
        self._completed(pending.folder, pending.state, *self.pending_rotation)  # the state of the saved step

    def _completed(self, folder: Path, state: TrainingState, step: int, best_step: Optional[int]) -> None:
        if self.on_saved is not None:
            self.on_saved(folder, state)
        self._rotate(step, best_step)

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

    def load(self, resume: Resume) -> TrainingState:
        """Collective: the checkpoint's tensors and RNG into the prepared objects; returns its loop state on this
        run's process count."""
        path = resume.path
        if self.background and not (path / "optimizer.bin").is_file() and (path / "model.safetensors").is_file():
            raise CheckpointError(f"{path.name} holds the model only (saved with save_only_model): it has no optimizer, "
                                  f"scheduler or RNG state to resume from. Start a new run from its weights "
                                  f"(--model_name_or_path {path}).")
        from .zero_universal import loadable

        saved_world, world = resume.saved.world_size, resume.world_size
        with loadable(self.accelerator, self.model, path, saved_world, self.root) as folder:
            # A copy: the Resume value stays as read.
            state = checkpoint.load_checkpoint(self.accelerator, folder, self.model, copy.deepcopy(resume.saved))
        self.resumed_from = path
        if not resume.same_world:
            # The same samples of the global order were consumed: batch k of rank r is global batch k*world+r.
            state.batches_in_epoch = state.batches_in_epoch * saved_world // world
            if world > saved_world:
                self.accelerator.print(f"scaletune: processes {saved_world}..{world - 1} start with a fresh "
                                       f"random state (the checkpoint has {saved_world}).")
            else:
                self.accelerator.print(f"scaletune: the random state of processes {world}..{saved_world - 1} "
                                       f"is dropped (the checkpoint has {saved_world}, this run has {world}).")
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
