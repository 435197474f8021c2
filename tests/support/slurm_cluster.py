"""A real Slurm cluster on the test machine: munge + slurmctld + one slurmd per simulated node.

Used by tests/cluster/test_slurm.py through the session-scoped `slurm_cluster` fixture (tests/cluster/conftest.py),
so every SLURM test shares one cluster. Nothing here mocks Slurm: jobs go through sbatch, the scheduler, slurmd
and slurmstepd.

What it does (see /work/shared/notes/slurm-on-one-machine.md for why each setting is there):
  - installs slurmctld/slurmd/slurm-client/munge with apt if they are missing (needs root);
  - writes slurm.conf under a scratch folder in /tmp (not /root: user slurm must traverse it) and points
    every client at it through $SLURM_CONF, so /etc/slurm is never touched;
  - starts munged (unless one already answers), slurmctld and `slurmd -N nodeK` in the foreground as child
    processes, and waits for the nodes to be idle;
  - tears down by the pids it recorded: cancels jobs, stops the daemons it started, removes its /etc/hosts line.

Skips (with the reason) where that is impossible: not root, or no Slurm and no apt-get.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from support.tiny import free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "munged", "munge", "unmunge"]
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}


# --------------------------------------------------------------------------- pure helpers


def parse_scontrol_record(text: str) -> dict:
    """`scontrol show job -o` / `show node -o` output -> {key: value}.

    Values never contain spaces except in Command= and a few free-text fields, which we do not read."""
    return dict(re.findall(r"(\S+?)=(\S*)", text))


def node_hardware(slurmd_c: str) -> dict:
    """The hardware fields of `slurmd -C` (CPUs, sockets, cores, threads, memory) for a NodeName line."""
    fields = parse_scontrol_record(slurmd_c.splitlines()[0])
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    return {k: fields[k] for k in keep if k in fields}


def slurm_conf(root: Path, host: str, ctld_port: int, node_ports: dict, hardware: dict,
               first_job_id: int = 1) -> str:
    hw = " ".join(f"{k}={v}" for k, v in hardware.items())
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} {hw}"
        for name, port in node_ports.items()
    )
    return f"""\
ClusterName=scaletune-test
# Job ids (and so the rendezvous ports slurm/train.sh derives from them) differ from one test session to the next.
FirstJobId={first_job_id}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
# No cgroups in a container: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# Schedule at once: no batch delay, and re-run the scheduler every second (released requeued jobs).
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _run(cmd: list[str], env: dict | None = None, timeout: float = 60, check: bool = True, cwd=None):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


# --------------------------------------------------------------------------- installation


def ensure_slurm_installed() -> None:
    """apt-get install the Slurm packages if any binary is missing; pytest.skip where that is impossible."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("SLURM tests need root to install Slurm and run slurmd (run the suite as root, as CI does).")
    if all(shutil.which(b) for b in BINARIES):
        return
    if not shutil.which("apt-get"):
        pytest.skip("SLURM tests need Slurm installed or apt-get to install it "
                    f"({' '.join(PACKAGES)}); neither is available.")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode != 0:
        # A fresh machine has no package lists yet.
        _run(["apt-get", "update"], env=env, timeout=600)
        _run(install, env=env, timeout=600)
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        pytest.skip(f"apt-get installed {' '.join(PACKAGES)} but {missing} are still missing.")


# --------------------------------------------------------------------------- the cluster


class SlurmCluster:
    """A running test cluster. `env` carries SLURM_CONF: pass it to every Slurm client you run."""

    def __init__(self, num_nodes: int = 2):
        self.host = socket.gethostname().split(".")[0]
        self.nodes = [f"node{i + 1}" for i in range(num_nodes)]
        self.root = Path(tempfile.mkdtemp(prefix="scaletune-slurm-", dir="/tmp"))
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[subprocess.Popen] = []
        self._hosts_line: str | None = None  # the line this cluster added to /etc/hosts

    # ---------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self._start_munge()
        self._write_conf()
        self._add_node_names_to_hosts()
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        self._wait_for(lambda: _run(["scontrol", "ping"], env=self.env, check=False).returncode == 0,
                       timeout, "slurmctld to answer `scontrol ping`")
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait_for(self._all_nodes_idle, timeout, f"nodes {self.nodes} to be idle")
        return self

    def stop(self) -> None:
        if shutil.which("scancel") and self.conf.exists():
            _run(["scancel", "--user", "root"], env=self.env, check=False, timeout=30)
            # Let slurmstepd deliver the kill before the daemons go away.
            self._wait_for(lambda: not self.active_jobs(), 30, "jobs to end", fail=False)
        # Reverse start order: slurmd before slurmctld, munged (if ours) last.
        for proc in reversed(self._procs):
            if proc.poll() is None and self._is_ours(proc.pid):
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        self._procs.clear()
        if self._hosts_line is not None:
            with _hosts_locked():
                lines = HOSTS.read_text().splitlines()
                HOSTS.write_text("".join(f"{line}\n" for line in lines if line != self._hosts_line))
            self._hosts_line = None
        shutil.rmtree(self.root, ignore_errors=True)

    def _is_ours(self, pid: int) -> bool:
        """The pid still belongs to a process we spawned (not a recycled pid)."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            return False
        return Path(cmdline).name in {"slurmctld", "slurmd", "munged"}

    def _spawn(self, name: str, cmd: list[str], **kw) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, **kw)
        log.close()
        self._procs.append(proc)
        time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited at once ({proc.returncode}): {self.daemon_logs()}")
        return proc

    def _start_munge(self) -> None:
        if self._munge_works():
            return
        key = Path("/etc/munge/munge.key")
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        run_dir = Path("/run/munge")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        run_dir.chmod(0o755)
        (self.root / "log").mkdir(exist_ok=True)
        self._spawn("munged", ["/usr/sbin/munged", "--foreground", "--force"], user="munge", group="munge")
        self._wait_for(self._munge_works, 15, "munged to answer")

    @staticmethod
    def _munge_works() -> bool:
        if not shutil.which("munge"):
            return False
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode == 0

    def _write_conf(self) -> None:
        self.root.chmod(0o755)
        for sub in ("state", "log", "run", "spool"):
            (self.root / sub).mkdir(exist_ok=True)
        for sub in ("state", "log", "run"):
            shutil.chown(self.root / sub, "slurm", "slurm")
        hardware = node_hardware(_run(["slurmd", "-C"]).stdout)
        ports = {node: free_port() for node in self.nodes}
        first_job_id = random.randrange(1000, 4000)
        self.conf.write_text(slurm_conf(self.root, self.host, free_port(), ports, hardware, first_job_id))
        self.conf.chmod(0o644)

    def _add_node_names_to_hosts(self) -> None:
        """The node names must resolve. Only this cluster's own line is added, and later removed: a restored
        copy of the whole file would drop what another cluster (or anyone) wrote meanwhile."""
        with _hosts_locked():
            missing = [n for n in self.nodes if not _resolves(n)]
            if missing:
                self._hosts_line = f"127.0.0.1 {' '.join(missing)}  # scaletune test cluster {os.getpid()}"
                # In place (/etc/hosts may be a bind mount), under the lock: two clusters starting at once once
                # read each other's half-written file and left /etc/hosts without localhost.
                HOSTS.write_text(HOSTS.read_text().rstrip("\n") + f"\n{self._hosts_line}\n")

    def _all_nodes_idle(self) -> bool:
        out = _run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, check=False).stdout
        states = dict(line.split() for line in out.splitlines() if line.strip())
        for node, state in states.items():
            if state.startswith("down") or state.startswith("drain"):
                _run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], env=self.env, check=False)
        return all(states.get(n) == "idle" for n in self.nodes)

    @staticmethod
    def _wait_for(cond, timeout: float, what: str, interval: float = 0.2, fail: bool = True) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return True
            time.sleep(interval)
        if fail:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        return False

    def daemon_logs(self, tail: int = 3000) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            out.append(f"--- {f.name} ---\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    # ---------------------------------------------------------------- jobs

    def sbatch(self, args: list[str], env: dict | None = None, cwd=None) -> str:
        """Submit; returns the job id. `env` is added to the cluster env (the job inherits it: --export=ALL);
        a None value removes the variable."""
        full = {k: v for k, v in {**self.env, **(env or {})}.items() if v is not None}
        proc = _run(["sbatch", "--parsable", *args], env=full, timeout=30, cwd=cwd)
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        out = _run(["scontrol", "show", "job", "-o", job_id], env=self.env, check=False).stdout
        return parse_scontrol_record(out) if out.strip() else {}

    def active_jobs(self) -> list[str]:
        out = _run(["squeue", "-h", "-o", "%i"], env=self.env, check=False).stdout
        return out.split()

    def scontrol(self, *args: str) -> str:
        return _run(["scontrol", *args], env=self.env).stdout

    def scancel(self, *args: str) -> str:
        return _run(["scancel", *args], env=self.env).stdout

    def wait_until(self, job_id: str, cond, timeout: float, what: str, interval: float = 0.1) -> dict:
        """Poll `scontrol show job` until cond(record) holds; returns the record."""
        rec: dict = {}

        def check():
            nonlocal rec
            rec = self.job(job_id)
            return bool(rec) and cond(rec)

        try:
            self._wait_for(check, timeout, f"job {job_id}: {what}", interval=interval)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\nlast record: {rec}") from None
        return rec

    def wait_gone(self, job_id: str, timeout: float = 120) -> dict:
        """Until the job has left the queue (no longer pending, running or completing); returns its record."""
        self._wait_for(lambda: job_id not in self.active_jobs(), timeout, f"job {job_id} to leave the queue")
        return self.job(job_id)

    def wait_done(self, job_id: str, timeout: float = 180) -> dict:
        return self.wait_until(job_id, lambda r: r.get("JobState") in TERMINAL_STATES, timeout, "to finish")


HOSTS = Path("/etc/hosts")


@contextlib.contextmanager
def _hosts_locked():
    """Every edit of /etc/hosts by a test cluster holds this lock, across processes."""
    with open(Path(tempfile.gettempdir()) / "scaletune-etc-hosts.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _resolves(name: str) -> bool:
    try:
        socket.gethostbyname(name)
        return True
    except OSError:
        return False
