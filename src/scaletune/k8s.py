"""Kubeflow Trainer v2 entry: `python -m scaletune.k8s [--dry-run] [PRESET] [CONFIG] [--key value ...]`, the
command of a TrainJob on the `torch-distributed` runtime (k8s/trainjob.yaml).

Kubeflow's torch plugin gives every node pod the torchrun variables PET_NNODES, PET_NPROC_PER_NODE (a number,
or `auto` when the pod asks for GPUs), PET_NODE_RANK (the Job completion index), PET_MASTER_ADDR and
PET_MASTER_PORT. This maps them onto ./launch's options, as slurm/train.sh maps SLURM_*, and replaces itself
with ./launch (which execs `accelerate launch`): the kubelet's SIGTERM on eviction reaches torch's elastic agent
(PID 1 of the container), which forwards it to the workers; they agree on a stop step, write a complete
checkpoint (scaletune.preemption) and the pod exits 143. The restarted pod runs the same command, and
`--resume_from_checkpoint latest` (always added) continues from that checkpoint, or starts fresh when there is
none. No torch import: a bad environment or config fails in a second, before any process starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping

from .config import load_config
from .errors import ScaletuneError
from .launch_plan import LaunchError, cluster_preset, scaletune_home, take_options, visible_gpus, whole_number

PET = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")


def _resume_latest(train_args: list[str]) -> list[str]:
    """The training arguments of a pod that may be a restart: resume from output_dir's latest checkpoint.
    Another resume_from_checkpoint would be read again by every restarted pod, so it is refused."""
    given = load_config(train_args).training.resume_from_checkpoint
    if given is not None and str(given).lower() not in ("latest", "true"):
        raise LaunchError(f"resume_from_checkpoint {given!r} would be resumed again by every restarted pod; "
                          f"drop it (a pod always resumes from output_dir's latest checkpoint) or set it to latest.")
    return [*train_args, "--resume_from_checkpoint", "latest"]


def launch_args(argv: list[str], env: Mapping[str, str], home: Path) -> list[str]:
    """./launch's arguments for this pod: PRESET, the topology from PET_*, then the training arguments.

    PRESET as in slurm/train.sh (launch_plan.cluster_preset). Without a visible GPU the pod trains on CPU
    (gloo), as ./launch --cpu does. A missing or malformed PET_* variable is a LaunchError naming it."""
    missing = [name for name in PET if not env.get(name)]
    if missing:
        raise LaunchError(f"{', '.join(missing)} not set: scaletune.k8s runs as the command of a Kubeflow TrainJob "
                          f"on the torch-distributed runtime (k8s/trainjob.yaml); on one machine use ./launch.")
    nodes, rank = whole_number("PET_NNODES", env["PET_NNODES"]), whole_number("PET_NODE_RANK", env["PET_NODE_RANK"])
    port = whole_number("PET_MASTER_PORT", env["PET_MASTER_PORT"])
    # `auto`: Kubeflow leaves the count to the launcher when the pod asks for GPUs (./launch: the visible ones).
    per_node = env["PET_NPROC_PER_NODE"]
    per_node = None if per_node == "auto" else whole_number("PET_NPROC_PER_NODE", per_node)
    given, args = take_options(argv, valued=(), flags=("dry_run",))
    dry_run = ["--dry-run"] if given else []
    gpus = visible_gpus(env)
    preset, args = cluster_preset(args, env, str(home), nodes, per_node or gpus)
    topology = ["--num_machines", str(nodes), "--machine_rank", str(rank),
                "--main_process_ip", env["PET_MASTER_ADDR"], "--main_process_port", str(port)]
    if gpus == 0:
        topology += ["--cpu", str(per_node or 1)]
    elif per_node is not None:
        topology += ["--num_processes", str(per_node)]
    return [preset, *topology, *dry_run, *_resume_latest(args)]


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    try:
        home = scaletune_home()
        args = launch_args(argv, os.environ, home)
    except ScaletuneError as e:
        prefix = "launch" if isinstance(e, LaunchError) else "scaletune"
        print(f"{prefix}: error: {e}", file=sys.stderr)
        return 2
    launch = str(home / "launch")
    print(f"scaletune.k8s: node {os.environ['PET_NODE_RANK']} of {os.environ['PET_NNODES']}: ./launch "
          f"{' '.join(args)}", file=sys.stderr, flush=True)
    # ./launch runs with this interpreter (the image's environment with scaletune installed).
    os.execve(launch, [launch, *args], {**os.environ, "PYTHON": os.environ.get("PYTHON") or sys.executable})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
