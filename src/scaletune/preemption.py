"""Preemption: SIGINT/SIGUSR1/SIGTERM -> all ranks agree on a stop step -> checkpoint -> requeue.

Ctrl-C is a preemption too: the first SIGINT checkpoints at the agreed step and the run exits with 130 and a
one-line resume hint; a second SIGINT aborts at once (exit 130, no traceback; the last complete checkpoint
stays the one to resume). A signal after the last update has no update left to stop after: the run says that
it is finishing (final evaluation, export, predictions) and does so, exit 0; a second Ctrl-C still aborts.

Interface used by the loop and train.py (keep it stable):
    watcher = PreemptionWatcher(); watcher.install()      # signal handling (every rank)
    watcher.should_stop(accelerator) -> bool              # collective (all ranks call it after every update)
    watcher.training_over()                               # no update follows: a signal no longer stops the run
    requeue_if_slurm(accelerator)                         # collective, after the checkpoint: `scontrol requeue`

Who gets the signal. Slurm signals every process of the job step on every node: with `--signal=USR1@N` (no
`B:`; slurm/train.sh asks for it), on `scancel --signal=USR1`, and with SIGTERM on preemption, `scancel` and at
the time limit (then SIGKILL after KillWait, 30 s by default). Under `srun -> ./launch -> accelerate launch
(torch elastic agent) -> workers`, slurm/train.sh starts the agent with USR1 and TERM ignored and tells torchrun
not to handle TERM (PET_SIGNALS_TO_HANDLE), so the agent neither dies (USR1's default action) nor kills its
workers mid-checkpoint: it waits for them. A signal sent to the batch shell only (`--signal=B:USR1@N`,
`scancel --batch`) is forwarded to the step by train.sh. The workers handle the signals here.

What happens then. The signal only sets a flag. After every optimizer update all ranks OR their flags in one
all-reduce, so every rank stops after the same update even if the signal reached the nodes at different steps.
The loop writes a complete checkpoint there (trainer_state.json last: an interrupted save is never resumed
from), and the global main process requeues the job once. On restart train.sh adds
`--resume_from_checkpoint latest`, and the run continues from that checkpoint exactly.

Requeueing is left to Slurm's view of the job: a job that is no longer RUNNING (cancelled, timed out, already
requeued by Slurm's preemption or by `scontrol requeue`) is not requeued again, so a user's `scancel` stays a
cancel and no job is requeued twice.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from typing import Mapping, Optional


DEFAULT_SIGNALS = (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM)


class PreemptionWatcher:
    """Turns a preemption signal into a stop decision that every rank shares."""

    # One sigwait thread per process, whichever watcher is current: `run()` may be called many times in one
    # process (notebooks, sweeps, tests), and several threads waiting on the same signals would race.
    _current: Optional["PreemptionWatcher"] = None
    _thread: Optional[threading.Thread] = None

    def __init__(self, signals=DEFAULT_SIGNALS):
        self.signals = tuple(signals)
        self.requested = False
        self.signal_name: Optional[str] = None
        self.over = False
        """No update follows (training ended without a stop, or there was none): a signal cannot stop the run."""
        self._previous: dict = {}

    def install(self) -> None:
        """Receive the preemption signals in this process, and keep them away from the processes it starts.

        Slurm signals *every* process of the job, including helpers this process starts later, such as spawned
        data-loader or torch.compile workers, which USR1's default action would kill. So the signals are
        blocked in this thread: threads and child processes started from now on inherit the mask. One watcher
        thread takes the signals with `sigwait`. The handler stays installed for threads started before this
        call. (W&B's service, a Go program, unblocks SIGTERM for itself and exits on it; see docs/slurm.md.)
        """
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. run() inside a worker thread)
        PreemptionWatcher._current = self
        _term_with_launcher()
        self._previous = {sig: signal.getsignal(sig) for sig in self.signals}
        for sig in self.signals:
            signal.signal(sig, _dispatch)
            signal.siginterrupt(sig, False)  # there, restart an interrupted system call instead of failing it
        signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        if PreemptionWatcher._thread is None or not PreemptionWatcher._thread.is_alive():
            PreemptionWatcher._thread = threading.Thread(target=_wait_for_signals, args=(self.signals,),
                                                         name="scaletune-preemption", daemon=True)
            PreemptionWatcher._thread.start()

    @classmethod
    def uninstall_current(cls) -> None:
        """After `run()` returns in a longer-lived process (notebook, sweep, tests): Ctrl-C and the other
        signals behave as before again."""
        watcher, cls._current = cls._current, None
        if watcher is None or threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in watcher._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, watcher.signals)

    def _handle(self, signum, frame) -> None:
        first = not self.requested
        if not first and signum == signal.SIGINT:
            # A second Ctrl-C: the user wants out now. os._exit: no traceback, no atexit work that could hang;
            # an interrupted save is a .partial folder that is never resumed from.
            os.write(2, b"scaletune: second interrupt; aborting now. Resume with --resume_from_checkpoint latest "
                        b"(the last complete checkpoint).\n")
            os._exit(130)
        self.requested = True  # before reading `over`: see training_over
        self.signal_name = signal.Signals(signum).name
        if not first:
            return
        if self.over:
            self._say_finishing()
        else:
            # os.write, not print: a handler may run while print() is already writing (reentrant call error).
            os.write(2, f"scaletune: rank {_rank()} received {self.signal_name}; will checkpoint after the current "
                        f"update and stop.\n".encode())

    def training_over(self) -> None:
        """No update follows (called once training ended without a stop): from now on a signal is answered with
        the truth -- the run finishes its final evaluation, export and predictions.

        A signal that came after the last stop agreement but before this call was promised a checkpoint and stop
        that will not happen: it is corrected here. `requested` is set before the handler reads `over` and read
        here after `over` is set, so a promise is never left uncorrected (at worst the truth is said twice).
        """
        self.over = True
        if self.requested:
            self._say_finishing()

    def _say_finishing(self) -> None:
        again = " Ctrl-C again to abort now." if self.signal_name == "SIGINT" else ""
        os.write(2, f"scaletune: rank {_rank()} received {self.signal_name} after the last update: training is "
                    f"over, finishing the final evaluation, export and predictions.{again}\n".encode())

    def should_stop(self, accelerator) -> bool:
        """Collective: True on every rank if any rank was signalled. Call after every optimizer update."""
        from .distributed.collectives import all_agree

        if not all_agree(accelerator, self.requested):  # one host all-reduce per update, no device sync
            return False
        # The stop is agreed; agree on its cause too (only once), so every rank exits with the same code.
        if all_agree(accelerator, self.signal_name == "SIGINT"):
            self.signal_name = "SIGINT"
        elif self.signal_name is None:
            self.signal_name = "SIGTERM"  # another rank was signalled (USR1 or TERM): the same exit code
        return True


def _rank() -> str:
    return os.environ.get("RANK", "0")


def _term_with_launcher() -> None:
    """A worker started by a launcher (torchrun/accelerate: LOCAL_RANK set) gets SIGTERM when the launcher
    dies, even by SIGKILL: it then checkpoints and exits like any preempted run instead of running on as an
    orphan at 100% CPU. Linux only (prctl PR_SET_PDEATHSIG)."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _dispatch(signum, frame) -> None:
    if PreemptionWatcher._current is not None:
        PreemptionWatcher._current._handle(signum, frame)


def _wait_for_signals(signals) -> None:
    while True:
        _dispatch(signal.sigwait(signals), None)


# --------------------------------------------------------------------------- requeue


def parse_job_record(text: str) -> dict:
    """One line of `scontrol show job -o` -> {key: value} (JobState, Requeue, BatchFlag, Restarts, ...)."""
    record: dict = {}
    for field in text.split():
        key, eq, value = field.partition("=")
        if eq:
            record.setdefault(key, value)  # the first occurrence: Command= may carry user arguments later on
    return record


def requeue_decision(job: Mapping[str, str]) -> tuple[bool, str]:
    """Pure: should this job requeue itself? Returns (decision, reason to print)."""
    if not job:
        return False, "Slurm does not know this job (scontrol show job failed)"
    state = job.get("JobState", "")
    if state != "RUNNING":
        # Cancelled, timed out, or already being requeued by Slurm / by `scontrol requeue`: requeueing again
        # would revive a cancelled job or requeue twice.
        return False, f"the job is {state or 'in an unknown state'}, not RUNNING"
    if job.get("BatchFlag") == "0":
        return False, "only batch jobs (sbatch) can be requeued; this is an interactive allocation"
    if job.get("Requeue") == "0":
        return False, "the job was submitted with --no-requeue (submit with --requeue)"
    return True, "requeueing"


def is_global_main_process(accelerator=None, env: Optional[Mapping[str, str]] = None) -> bool:
    if accelerator is not None:
        return bool(accelerator.is_main_process)
    env = os.environ if env is None else env
    return env.get("RANK", "0") == "0"


def requeue_if_slurm(accelerator=None, env: Optional[Mapping[str, str]] = None) -> bool:
    """After the preemption checkpoint: requeue this Slurm batch job, exactly once, from the global main process.

    Collective when given the accelerator (every rank calls it). Slurm answers a requeue by sending SIGTERM to
    every process of the job (SIGKILL after KillWait), so first every rank stops listening for preemption
    signals -- at interpreter exit Python would reset our handler to the default, and a SIGTERM arriving then
    would turn a clean exit into a failure -- and W&B's service process is shut down cleanly. Returns True if
    this process requeued the job. Outside Slurm it only does the above.
    """
    env = os.environ if env is None else env
    ignore_preemption_signals()
    if accelerator is not None:
        accelerator.wait_for_everyone()  # every rank ignores SIGTERM before it can arrive
    job_id = env.get("SLURM_JOB_ID")
    if not job_id or not is_global_main_process(accelerator, env):
        return False
    if shutil.which("scontrol") is None:
        _say(f"not requeueing job {job_id}: scontrol is not on PATH; resubmit with --resume_from_checkpoint latest.")
        return False
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    decision, reason = requeue_decision(parse_job_record(shown.stdout) if shown.returncode == 0 else {})
    if not decision:
        _say(f"not requeueing job {job_id}: {reason}.")
        return False
    _teardown_wandb()
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        _say(f"scontrol requeue {job_id} failed: {done.stderr.strip()}; resubmit with "
             f"--resume_from_checkpoint latest.")
        return False
    _say(f"requeued job {job_id}; the next attempt resumes from the latest complete checkpoint.")
    return True


def ignore_preemption_signals(signals=DEFAULT_SIGNALS) -> None:
    """The stop is decided and the checkpoint written: further preemption signals have nothing left to do."""
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def _teardown_wandb() -> None:
    """Stop W&B's service process now (it would die from Slurm's SIGTERM under its atexit teardown)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and hasattr(wandb, "teardown"):
        wandb.teardown()


def _say(message: str) -> None:
    print(f"scaletune: {message}", file=sys.stderr, flush=True)
