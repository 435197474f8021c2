"""Resume a DeepSpeed ZeRO checkpoint on another number of processes, through DeepSpeed's universal checkpoint.

A ZeRO checkpoint holds each process's partition of the flat optimizer state, and DeepSpeed refuses to load
it on another count. Its universal format (`deepspeed.checkpoint.ds_to_universal`) stores each parameter's
fp32 weights and optimizer moments whole, and an engine told `load_universal_checkpoint` partitions them for
its own count. The conversion reads every process's files, so the main process runs it once, into a view of
the checkpoint in the output dir: `.universal-checkpoint-N/` holds links to the checkpoint's files plus the
converted `pytorch_model/zero/`, so `accelerator.load_state` finds the scheduler, sampler and RNG files where
it expects them. The checkpoint itself is never changed (its manifest stays true), and the view is removed
after the load.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

VIEW_PREFIX = ".universal-"
ENGINE_DIR = "pytorch_model"  # accelerate's checkpoint id for the first model: <checkpoint>/pytorch_model/


@contextlib.contextmanager
def loadable(accelerator: Accelerator, model: torch.nn.Module, path: Path, saved_world: int,
             scratch: Path) -> Iterator[Path]:
    """Collective: a folder that `accelerator.load_state` loads on this process count -- `path` itself, or
    under DeepSpeed when `saved_world` differs, its universal view (built in `scratch`, removed afterwards).
    `model`: the prepared model (under DeepSpeed its engine, which is told to load the universal format)."""
    from .distributed.backend import Backend
    from .distributed.collectives import all_agree

    if not Backend.of(accelerator).is_deepspeed or saved_world == accelerator.num_processes:
        yield path
        return
    view = scratch / f"{VIEW_PREFIX}{path.name}"
    main = accelerator.is_main_process
    problem = None
    if main:
        try:
            _build_view(path, view)
        except Exception as e:  # reported on every process below, as one line
            problem = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    if all_agree(accelerator, problem is not None):
        if main:
            shutil.rmtree(view, ignore_errors=True)
        raise CheckpointError(
            f"{path.name} was written by {saved_world} DeepSpeed process(es) and converting it to DeepSpeed's "
            f"universal checkpoint for {accelerator.num_processes} failed ({problem or 'on the main process'}); "
            f"resume it on {saved_world} process(es).")
    accelerator.print(f"scaletune: {path.name} was written by {saved_world} process(es): converted to DeepSpeed's "
                      f"universal checkpoint to load it on {accelerator.num_processes}.")
    model._config.load_universal_checkpoint = True  # read by DeepSpeedEngine.load_checkpoint only
    try:
        yield view
        accelerator.wait_for_everyone()  # every process has read the view
    finally:
        model._config.load_universal_checkpoint = False  # later loads (the best-model reload) are native again
        if main:
            shutil.rmtree(view, ignore_errors=True)


def _build_view(path: Path, view: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(view, ignore_errors=True)  # a leftover of an interrupted resume
    engine_dir = view / ENGINE_DIR
    engine_dir.mkdir(parents=True)
    for item in path.iterdir():
        if item.name != ENGINE_DIR:
            (view / item.name).symlink_to(item.resolve())
    for item in (path / ENGINE_DIR).iterdir():
        (engine_dir / item.name).symlink_to(item.resolve())
    converted = view / ".converted"
    args = argparse.Namespace(input_folder=str(path / ENGINE_DIR), output_folder=str(converted / ENGINE_DIR),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # models outside Megatron carry no universal_checkpoint_info: add the default
                              inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
        ds_to_universal.main(args)
    (converted / ENGINE_DIR / "zero").rename(engine_dir / "zero")
    shutil.rmtree(converted)
