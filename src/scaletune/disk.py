"""Files made durable and folders removed safely: the disk rules checkpoints and the export share.

A leaf: it imports nothing from the project but `errors`, so every module that writes to disk can use it.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from .errors import CheckpointError


def fsync_file(path: Path) -> None:
    """On disk before the rename that publishes it."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """A folder's entries (a file created or renamed in it) on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomically(path: Path, text: str) -> None:
    """A reader sees the old file or the new one, never half of one; the new one is on disk when it appears."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def readable_as_umask_allows(paths) -> None:
    """Files written 0600 (safetensors writes through a private temporary file) get the mode every other file
    gets, so a checkpoint or export on a shared filesystem is readable by the group like the rest."""
    mask = os.umask(0)
    os.umask(mask)
    for p in paths:
        if p.is_file() and p.stat().st_mode & 0o777 == 0o600:
            p.chmod(0o666 & ~mask)


def remove_folder(path: Path) -> None:
    """Rename out of the checkpoint namespace first, then delete: a kill mid-delete leaves a hidden folder."""
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}.deleting-{os.getpid()}")
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def disk_full(e: BaseException, path: Path) -> bool:
    """Whether a failed write ran out of space. safetensors and torch.save report a full disk in their own words
    (`SafetensorError`, `RuntimeError: ... unexpected pos`), so the free space itself is asked too."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left" in str(e):
        return True
    try:
        return shutil.disk_usage(path.parent).free < 1 << 20
    except OSError:
        return False


def write_failed(e: BaseException, path: Path) -> CheckpointError:
    """One line for a checkpoint (or export) write that failed: a full disk says so and names the path."""
    if disk_full(e, path):
        return CheckpointError(f"No space left on the device while writing {str(path)!r}: free disk space (or "
                               f"lower save_total_limit) and resume with --resume_from_checkpoint latest; "
                               f"earlier checkpoints are intact.")
    detail = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
    return CheckpointError(f"Could not write {str(path)!r}: {detail}.")
