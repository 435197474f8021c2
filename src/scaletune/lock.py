"""One run per output dir: `output_dir/.scaletune.lock` names its owner (host, pid, process start, Slurm job).

A lock becomes visible only complete: it is written to a temporary file and hard-linked into place, which fails
if a lock exists. So a lock that does not name its owner is never a run's half-written claim taken for a dead
owner's; it is refused. A lock is stale -- taken over -- when its owner is an earlier attempt of the same Slurm
job, or a process on this host whose pid no longer names the process that wrote it (gone, a zombie, or the pid
given to another process: the start time differs). Of two runs that find the same stale lock, only the one
that creates `.scaletune.lock.takeover-<inode>` first removes it, after checking that the lock is still that
file: the other can never remove the winner's new lock. No torch: the lock is taken before anything loads.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Mapping, Optional

from .errors import CheckpointError

LOCK_FILE = ".scaletune.lock"
_ATTEMPTS = 200  # bounded: each round takes the lock, refuses, or waits 10 ms for a takeover or a writer
_UNREADABLE_WAIT_S = 1.0  # without hard links a lock is created, then written: a reader gives it that long


def _process_start(pid: int) -> Optional[str]:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22), or None if it is gone or a
    zombie. With the pid it names one process: a pid reused by another process does not keep a lock."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def _pid_alive(pid: int, started: Optional[str] = None) -> bool:
    if Path("/proc").is_dir():
        now = _process_start(pid)
        return now is not None and (started is None or now == started)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _publish(tmp: Path, lock: Path) -> bool:
    """Make the complete lock `tmp` visible as `lock` unless a lock exists. False if one does."""
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
    # A file system without hard links: create exclusively, then write (readers wait for the content).
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(tmp.read_text())
    return True


def _read_owner(lock: Path) -> tuple[Optional[dict], Optional[int], Optional[int]]:
    """(owner, inode, open fd) of the lock now; owner None if the file does not name one, all None if it is gone.
    The fd stays open while the lock is judged, so its inode cannot be given to a new lock meanwhile."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return None, None, None
    ino = os.fstat(fd).st_ino
    try:
        owner = json.loads(os.pread(fd, 1 << 16, 0).decode())
    except (OSError, ValueError):
        owner = None
    return (owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None), ino, fd


def _take_over(lock: Path, ino: int) -> None:
    """Remove the stale lock `ino`, if no other run is doing so and it is still the lock."""
    marker = lock.with_name(f"{LOCK_FILE}.takeover-{ino}")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        time.sleep(0.01)  # another run is taking it over: look again once it had the time to
        return
    try:
        if os.stat(lock).st_ino == ino:
            os.unlink(lock)
    except FileNotFoundError:
        pass
    finally:
        marker.unlink(missing_ok=True)


def acquire_lock(root: Path, env: Mapping[str, str] = os.environ) -> None:
    """Claim `root` for this run (main process). A lock of a dead process on this host, or of an earlier
    attempt of the same Slurm job (a requeue or a restart), is stale and taken over."""
    lock = root / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": env.get("SLURM_JOB_ID"),
          "started": time.strftime("%Y-%m-%d %H:%M:%S"), "process_start": _process_start(os.getpid())}
    tmp = root / f"{LOCK_FILE}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(me))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"Could not write {str(tmp)!r} to lock output_dir ({e.strerror}); free space or choose "
                              f"another --output_dir.") from None
    unreadable_since = None
    try:
        for _ in range(_ATTEMPTS):
            if _publish(tmp, lock):
                return
            owner, ino, fd = _read_owner(lock)
            if fd is None:
                continue  # released or taken over just now: try again
            try:
                if owner is None:
                    unreadable_since = unreadable_since or time.monotonic()
                    if time.monotonic() - unreadable_since > _UNREADABLE_WAIT_S:
                        raise CheckpointError(
                            f"output_dir {str(root)!r} is locked by {str(lock)!r}, which does not name its owner: "
                            f"if no run uses this output_dir, delete {str(lock)!r}.")
                    time.sleep(0.01)
                    continue
                same_host = owner.get("host") == me["host"]
                if same_host and owner.get("pid") == me["pid"] and owner.get("process_start") == me["process_start"]:
                    return  # this process holds it already (run() called again after a failure)
                same_job = owner.get("slurm_job_id") and owner.get("slurm_job_id") == me["slurm_job_id"]
                dead = same_host and not _pid_alive(owner["pid"], owner.get("process_start"))
                if not (same_job or dead):
                    raise CheckpointError(
                        f"output_dir {str(root)!r} is in use by another run (pid {owner.get('pid')} on "
                        f"{owner.get('host')}, since {owner.get('started')}): wait for it, choose another "
                        f"--output_dir, or delete {str(lock)!r} if that run is gone.")
                _take_over(lock, ino)
            finally:
                os.close(fd)
        raise CheckpointError(f"Could not lock {str(lock)!r}: another run keeps claiming it; if no run is starting "
                              f"in {str(root)!r}, delete {str(lock)!r} and any {LOCK_FILE}.takeover-* file there.")
    finally:
        tmp.unlink(missing_ok=True)


def release_lock(root: Path) -> None:
    lock = Path(root) / LOCK_FILE
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass
