"""Ray Train entry: `python -m scaletune.ray CONFIG --num_workers N [--use_gpu] [--max_failures K] [--address A]
[--key value ...]`, the same run in each worker of a `ray.train.torch.TorchTrainer` (KubeRay, or a local Ray).

Ray schedules the workers, starts torch.distributed in them (gloo on CPU, NCCL on GPUs) and sets RANK,
WORLD_SIZE and LOCAL_RANK, which accelerate reads: its PartialState keeps a process group already started.
Every checkpoint scaletune writes is reported to Ray once complete (`run(on_checkpoint_saved=...)`): every rank
reports, rank 0 with the folder, which Ray copies to its storage (`output_dir/ray`). After a worker fails, Ray
restarts the group (up to `--max_failures` times) and each worker resumes from the last reported checkpoint:
same next batch, early-stopping state and best checkpoint, and the same W&B run (its id is in the checkpoint).
The metrics, the export and the checkpoints land in output_dir as in any run. The config is checked here, in the
driver, before Ray starts: bad input is one line and nothing is scheduled.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path
from typing import Optional

from .config import load_config
from .errors import ConfigError, ScaletuneError
from .launch_plan import take_options, whole_number

USAGE = ("usage: python -m scaletune.ray CONFIG --num_workers N [--use_gpu] [--max_failures K] [--address auto] "
         "[--key value ...]")
RUN_NAME = "scaletune"


def parse(argv: list[str]) -> tuple[dict, list[str]]:
    """Ray's options (removed) and the training arguments (kept, in order). Errors are one line each."""
    given, train = take_options(argv, valued=("num_workers", "max_failures", "address"), flags=("use_gpu",))
    opts = {"num_workers": whole_number("--num_workers", given.get("num_workers")), "use_gpu": "use_gpu" in given,
            "max_failures": whole_number("--max_failures", given.get("max_failures")) or 0,
            "address": given.get("address")}
    if opts["num_workers"] is None:
        raise ConfigError(f"--num_workers is required (the number of Ray workers, one process each). {USAGE}")
    if opts["num_workers"] < 1:
        raise ConfigError(f"--num_workers must be at least 1, got {opts['num_workers']}.")
    return opts, train


def require_ray() -> None:
    try:
        importlib.import_module("ray.train.torch")
    except ImportError:
        raise ConfigError("Ray Train is not installed: pip install 'scaletune[ray]' (ray[train]), or use ./launch, "
                          "slurm/train.sh or scaletune.k8s.") from None


def last_metrics(state) -> dict:
    """What Ray records with a checkpoint: the step, and the numbers of the latest evaluation before it."""
    metrics = {"step": state.global_step, "epoch": state.epoch}
    for record in reversed(state.log_history):
        if any(key.startswith("eval_") for key in record):
            metrics.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
            break
    return metrics


def report_checkpoint(folder: Path, state) -> None:
    """checkpointer.OnSaved: Ray needs every rank to report, the same number of times. The folder is on storage
    every rank sees (output_dir), so rank 0 alone hands it over (the others' would be the same files)."""
    import ray.train

    first = ray.train.get_context().get_world_rank() == 0
    ray.train.report(last_metrics(state), checkpoint=ray.train.Checkpoint.from_directory(str(folder)) if first
                     else None)


def written_since(output_dir: Path, started: float) -> bool:
    from .checkpoint import list_checkpoints

    return any(path.stat().st_mtime >= started for path in list_checkpoints(output_dir).values())


def worker(job: dict) -> None:
    """One Ray worker: the run, resumed from Ray's last reported checkpoint after a restart."""
    import ray.train

    from .train import run

    os.chdir(job["cwd"])  # relative paths in the config mean what they meant where the command was typed
    if not job["use_gpu"]:
        os.environ["ACCELERATE_USE_CPU"] = "true"  # accelerate's multi-CPU mode: the gloo group Ray started
    overrides = {"output_dir": job["output_dir"]}
    reported = ray.train.get_checkpoint()
    if reported is not None:
        # Ray's copy of a checkpoint this run wrote and reported itself: trusted (DeepSpeed unpickles).
        overrides.update(resume_from_checkpoint=reported.path, trust_checkpoint=True)
        if ray.train.get_context().get_world_rank() == 0:
            print(f"scaletune.ray: resuming from Ray's last reported checkpoint {reported.path}.", file=sys.stderr,
                  flush=True)
    elif job["resume_from_checkpoint"] is None and written_since(Path(job["output_dir"]), job["started"]):
        # A restart before Ray registered a report: the failure came between a checkpoint's write and its
        # report. That checkpoint is this run's (written after the command started): continue from it.
        overrides["resume_from_checkpoint"] = "latest"
    run(job["train_args"], overrides=overrides, on_checkpoint_saved=report_checkpoint)


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    try:
        opts, train_args = parse(argv)
        training = load_config(train_args).training  # bad input: here, in a second, before Ray starts
        require_ray()
    except ScaletuneError as e:
        print(f"scaletune: error: {e}", file=sys.stderr)
        return 2
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    output_dir = Path(training.output_dir).resolve()
    ray.init(address=opts["address"])
    trainer = TorchTrainer(
        # By reference (this module), also under `python -m`: the workers import scaletune themselves.
        importlib.import_module("scaletune.ray").worker,
        train_loop_config={"train_args": train_args, "output_dir": str(output_dir), "cwd": os.getcwd(),
                           "use_gpu": opts["use_gpu"], "resume_from_checkpoint": training.resume_from_checkpoint,
                           "started": time.time()},
        torch_config=TorchConfig(backend="nccl" if opts["use_gpu"] else "gloo"),
        scaling_config=ScalingConfig(num_workers=opts["num_workers"], use_gpu=opts["use_gpu"]),
        run_config=RunConfig(name=RUN_NAME, storage_path=str(output_dir / "ray"),
                             failure_config=FailureConfig(max_failures=opts["max_failures"])),
    )
    try:
        trainer.fit()
    except Exception as e:  # Ray's TrainingFailedError wraps the worker's error, already in the worker's log
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(f"scaletune: error: the Ray run failed (--max_failures {opts['max_failures']}): {last}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
