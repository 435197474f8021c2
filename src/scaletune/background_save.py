"""Checkpoints written in the background: training stalls only while the state is copied to host memory.

`stage()` (every rank, in the training thread) copies what `accelerator.save_state` would save -- model
weights, optimizer, scheduler, grad scaler, this rank's RNG state -- plus the loop state, then a writer thread
writes them under accelerate's file names (so `accelerator.load_state` resumes from them) into
`.checkpoint-N.partial/`, fsyncs them and checksums them. `finish()` (collective) waits for every rank's
writer, and only then does the main process write the manifest and `trainer_state.json` and rename the folder:
a checkpoint whose writes did not all complete is never picked up (§26). The Checkpointer finishes a
background save before the next one starts, before the best-model reload and export, and before a preempted
run exits.

Used for DDP and single-process runs; DeepSpeed and FSDP checkpoints are sharded by their engines and saved
synchronously.
"""

from __future__ import annotations

import copy
import random
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch

from . import checkpoint
from .state import TrainingState

if TYPE_CHECKING:
    from accelerate import Accelerator


def _to_host(tree):
    """A copy of every tensor in a (nested) state dict, on the CPU: training may change the originals next.
    Tensors that share storage (tied embeddings and output layers) stay shared in the copy, as safetensors and
    `load_state` expect them."""
    copies: dict = {}

    def one(x):
        if not isinstance(x, torch.Tensor):
            return copy.deepcopy(x)
        key = (x.untyped_storage().data_ptr(), x.storage_offset(), x.dtype, tuple(x.shape), tuple(x.stride()))
        if key not in copies:
            copies[key] = x.detach().to("cpu", copy=True)
        return copies[key]

    return torch.utils._pytree.tree_map(one, tree)


def rng_state(step: int) -> dict:
    """This process's RNG streams, as accelerate saves them (random_states_<rank>.pkl)."""
    states = {"step": step, "random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
              "torch_manual_seed": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["torch_cuda_manual_seed"] = torch.cuda.get_rng_state_all()
    return states


class BackgroundSave:
    """One checkpoint on its way to disk."""

    def __init__(self, accelerator: Accelerator, folder: Path, state: TrainingState,
                 write_extras: Callable[[Path], None], model_only: bool = False):
        """`model_only` (save_only_model): the weights alone, no optimizer, scheduler or RNG state."""
        from accelerate.utils import OPTIMIZER_NAME, RNG_STATE_NAME, SAFE_WEIGHTS_NAME, SCALER_NAME, SCHEDULER_NAME

        self.accelerator = accelerator
        self.folder = folder
        self.partial = folder.with_name(f".{folder.name}.partial")
        self.state = copy.deepcopy(state)  # the loop state of this step, not of the step when it is finished
        self.error: Optional[BaseException] = None
        self.hashed: dict[str, dict] = {}
        main = accelerator.is_main_process
        if main and self.partial.exists():
            shutil.rmtree(self.partial)  # a leftover of an interrupted save: none of its files may be reused
        accelerator.wait_for_everyone()
        # Staging: the only part that stalls training. Identical on every DDP rank: the main process writes it.
        model, = accelerator._models
        self.files: dict[str, object] = {}
        if main:
            self.files[SAFE_WEIGHTS_NAME] = _to_host(accelerator.get_state_dict(model, unwrap=False))
        if main and not model_only:
            self.files[f"{OPTIMIZER_NAME}.bin"] = _to_host(accelerator._optimizers[0].state_dict())
            if accelerator._schedulers:
                self.files[f"{SCHEDULER_NAME}.bin"] = copy.deepcopy(accelerator._schedulers[0].state_dict())
            if accelerator.scaler is not None:
                self.files[SCALER_NAME] = _to_host(accelerator.scaler.state_dict())
        if not model_only:
            self.files[f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl"] = rng_state(accelerator.step)
        self.write_extras = write_extras if main else None
        self.thread = threading.Thread(target=self._write, name=f"scaletune-save-{folder.name}", daemon=True)
        self.thread.start()

    def _write(self) -> None:
        from accelerate.utils import SAFE_WEIGHTS_NAME
        from safetensors.torch import save_file

        try:
            self.partial.mkdir(parents=True, exist_ok=True)
            for name, content in self.files.items():
                path = self.partial / name
                if name == SAFE_WEIGHTS_NAME:  # as accelerate.utils.save with safe_serialization
                    from accelerate.utils import clean_state_dict_for_safetensors

                    save_file(clean_state_dict_for_safetensors(content), str(path), metadata={"format": "pt"})
                else:
                    torch.save(content, path)
                self.hashed[name] = checkpoint.file_entry(path)  # fsync + checksum here, not in finish()
            if self.write_extras is not None:
                self.write_extras(self.partial)
        except BaseException as e:  # reported by finish(), on every rank
            self.error = e
        finally:
            self.files = {}  # the host copy is written: free it

    def finish(self) -> None:
        """Collective: wait for every rank's writer, then make the checkpoint complete (main process)."""
        from .distributed import all_agree

        self.thread.join()
        acc = self.accelerator
        if all_agree(acc, self.error is not None):
            # Judged before the partial folder is removed: a full disk is recognised by its free space too.
            error = (checkpoint.write_failed(self.error, self.partial) if self.error is not None else
                     checkpoint.CheckpointError(f"Writing {str(self.partial)!r} failed on another process; see its "
                                                f"error."))
            if acc.is_main_process:
                shutil.rmtree(self.partial, ignore_errors=True)  # give the space back; earlier checkpoints intact
            raise error
        if acc.is_main_process:
            checkpoint.complete(self.partial, self.folder, self.state, self.hashed)
        acc.wait_for_everyone()
