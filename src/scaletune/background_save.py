"""Checkpoints written in the background: training stalls only while the state is copied to host memory.

`stage()` (every rank, in the training thread) copies what `accelerator.save_state` would save -- model
weights, optimizer, scheduler, grad scaler, this rank's RNG state -- plus the loop state, then a writer thread
writes them under accelerate's file names (so `accelerator.load_state` resumes from them) into
`.checkpoint-N.partial/`, fsyncs them and checksums them. `finish()` (collective) waits for every rank's
writer, and only then does the main process write `trainer_state.json` and the manifest and rename the folder:
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
from .distributed.collectives import agree_on_write
from .state import TrainingState

if TYPE_CHECKING:
    from accelerate import Accelerator


def _storage_key(x: torch.Tensor) -> tuple:
    return (x.untyped_storage().data_ptr(), x.storage_offset(), x.dtype, tuple(x.shape), tuple(x.stride()))


class HostStaging:
    """Host memory for the writer's copy of the state, kept from one save to the next (torchtitan's
    `async_with_pinned_mem` does the same): most of a fresh copy's time goes to faulting in new pages, so a
    reused buffer makes the stall a plain memcpy. The cost is one host copy of the state held for the run.
    A buffer is overwritten only after the writer of the previous save has finished with it: the
    Checkpointer completes a background save before it stages the next one."""

    def __init__(self):
        self.buffers: dict[str, tuple[object, list]] = {}  # file name -> (tree structure, leaf buffers)

    def copy(self, name: str, tree):
        """A host copy of every tensor in a (nested) state dict: training may change the originals next.
        Tensors that share storage (tied embeddings and output layers) stay shared in the copy, as safetensors
        and `load_state` expect them."""
        leaves, spec = torch.utils._pytree.tree_flatten(tree)
        cached = self.buffers.get(name)
        if cached is None or cached[0] != spec or not all(
                (b.shape, b.dtype) == (x.shape, x.dtype) if isinstance(x, torch.Tensor) else b is None
                for b, x in zip(cached[1], leaves)):
            cached = self.buffers[name] = (spec, self._allocate(leaves))
        copied, out, on_gpu = set(), [], False
        for buffer, leaf in zip(cached[1], leaves):
            if buffer is None:
                out.append(copy.deepcopy(leaf))
                continue
            if id(buffer) not in copied:  # a tied tensor is copied once
                buffer.copy_(leaf.detach(), non_blocking=leaf.is_cuda)
                copied.add(id(buffer))
                on_gpu |= leaf.is_cuda
            out.append(buffer)
        if on_gpu:
            torch.cuda.synchronize()  # host-device sync: the non-blocking copies must land before the writer reads
        return torch.utils._pytree.tree_unflatten(out, spec)

    @staticmethod
    def _allocate(leaves: list) -> list:
        shared: dict = {}
        buffers = []
        for x in leaves:
            if not isinstance(x, torch.Tensor):
                buffers.append(None)
                continue
            key = _storage_key(x)
            if key not in shared:
                shared[key] = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=x.is_cuda)
            buffers.append(shared[key])
        return buffers


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
                 write_extras: Callable[[Path], None], staging: HostStaging, model_only: bool = False):
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
            self.files[SAFE_WEIGHTS_NAME] = staging.copy(SAFE_WEIGHTS_NAME, accelerator.get_state_dict(
                model, unwrap=False))
        if main and not model_only:
            self.files[f"{OPTIMIZER_NAME}.bin"] = staging.copy(OPTIMIZER_NAME, accelerator._optimizers[0].state_dict())
            if accelerator._schedulers:
                self.files[f"{SCHEDULER_NAME}.bin"] = copy.deepcopy(accelerator._schedulers[0].state_dict())
            if accelerator.scaler is not None:
                self.files[SCALER_NAME] = copy.deepcopy(accelerator.scaler.state_dict())
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
        self.thread.join()
        acc = self.accelerator
        agree_on_write(acc, self.error, self.partial)  # collective: every rank fails the same way
        if acc.is_main_process:
            checkpoint.complete(self.partial, self.folder, self.state, self.hashed)
        acc.wait_for_everyone()
