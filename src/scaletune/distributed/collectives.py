"""What every rank must do or decide together: agreeing on a host flag, failing a collective write the same way
on every rank, the first process's error line, and gradient clipping."""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..disk import write_failed
from ..errors import CheckpointError, ScaletuneError
from .backend import Backend

if TYPE_CHECKING:
    from accelerate import Accelerator


def all_agree(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank if any rank says True (stop decisions every rank must share). The flag is a host
    value, so it is agreed over a gloo group on host tensors: over NCCL, a device all-reduce and its `.item()`
    would make the host wait for all the GPU work queued so far (the preemption check runs after every update)."""
    if accelerator.num_processes == 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, group=_host_group())  # a collective on the host: no device sync
    return bool(t.item() > 0)


_HOST_GROUP: dict = {}  # the default group it was made for -> the host group


def _host_group():
    """The process group for host values: the default group when it is gloo (CPU runs), else one gloo group
    over the same ranks, made once per default group (every rank calls all_agree at the same points, so they
    make it together): a later run() in the same script reuses it, one after the script re-created the default
    group makes another."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    world = dist.group.WORLD
    if world not in _HOST_GROUP:
        _HOST_GROUP.clear()  # made for a default group the script destroyed: destroyed with it
        _HOST_GROUP[world] = dist.new_group(backend="gloo")
    return _HOST_GROUP[world]


def release_host_group() -> None:
    """At exit, after the default group is destroyed: no reference to it is left here."""
    _HOST_GROUP.clear()


def agree_on_write(accelerator: Accelerator, failed: Optional[BaseException], folder: Path) -> None:
    """Collective, once every rank has written its part of `folder`: if any rank failed, every rank raises the
    same one-line error and the main process removes `folder` (the space back; what was there before is
    untouched). A ScaletuneError (a refusal with its own words) is raised as it is."""
    if not all_agree(accelerator, failed is not None):
        return
    # Judged before the folder is removed: a full disk is recognised by its free space too.
    if isinstance(failed, ScaletuneError):
        error = failed
    elif failed is not None:
        error = write_failed(failed, folder)
    else:
        error = CheckpointError(f"Another process failed while writing {str(folder)!r}; see its error above.")
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
    raise error


ERROR_PRINTED_KEY = "scaletune/error_printed"


def wait_for_the_error_line(first: bool, wait_seconds: float = 30.0) -> None:
    """After a bad-input error that every process found (docs/semantics.md: one line, from the first process).

    The launcher stops all processes as soon as one exits, so a rank that exits first can take the first
    process down before its line is out (seen once, in a full test run). So the first process, once it
    has printed, says so in the launcher's key-value store (torchrun's agent store, at MASTER_ADDR:MASTER_PORT,
    there before any process group), and the others wait for that before they exit, for at most
    `wait_seconds`: an error only one rank saw must still end that rank."""
    if Backend.requested().world_size <= 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    import torch.distributed as dist

    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=wait_seconds))
        if first:
            store.set(ERROR_PRINTED_KEY, "1")
        else:
            store.wait([ERROR_PRINTED_KEY], timedelta(seconds=wait_seconds))
    except Exception:  # no store, or the first process never printed: exit anyway
        pass


def clip_gradients(accelerator: Accelerator, parameters, max_norm: float):
    """`accelerator.clip_grad_norm_` (returns the norm before clipping), less a pass over every gradient.

    torch multiplies every gradient by the clipping coefficient even when it is clamped to 1 -- a no-op that
    reads and writes all gradients (5 ms of a 440 ms MiniLM update on CPU) -- because testing the coefficient
    would make a GPU wait for the host. Where the gradients are plain host tensors (one process or DDP on CPU:
    not DeepSpeed, FSDP or a GPU) testing is free, so the multiplication is done only when it changes
    something. The coefficient is torch's own expression, so skipping it is exactly skipping a `mul_(1.0)`.
    Under DDP the gradients, hence the norm and the decision, are the same on every rank."""
    if not Backend.of(accelerator).host_clipping:
        return accelerator.clip_grad_norm_(parameters, max_norm)
    import torch

    accelerator.unscale_gradients()
    parameters = [p for p in parameters if p.grad is not None]
    total_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if (max_norm / (total_norm + 1e-6)).item() < 1.0:  # host tensor: no device sync
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
    return total_norm
