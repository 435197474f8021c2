"""Hyperparameter search: `python -m scaletune.search [CONFIG] --space SPACE.yaml --n_trials N [--metric eval_f1]
[--direction maximize|minimize] [--pruner median|hyperband|none] [--preset PRESET] [--cpu N] [--study_name NAME]
[--key value ...]`, and `search(args, space=..., n_trials=...)` for Python users.

Optuna's TPE sampler (seeded from the config's seed) proposes; each trial is an ordinary scaletune run in
output_dir/trial-K/, started as its own process(es) through ./launch with the given preset, so a trial can be
multi-process and keeps everything a run writes. The study lives in SQLite (output_dir/study.db): the trial's
rank 0 reports each evaluation to it and stops the run when the pruner says so (trial_pruning.py); several
searches on the same storage share the work (slurm/search.sh; SQLite needs a shared filesystem).

--n_trials is the study's total: a search started again (after a kill, or by another worker) runs only the
trials still missing. A trial this worker left RUNNING is resumed in its own folder from its latest checkpoint
(`--resume_from_checkpoint latest`), keeping its id and the evaluations it already reported. At the end: the
trials table (output_dir/trials.md), the best trial's config (output_dir/best.yaml, ready to run; its output_dir
is output_dir/best) and Optuna's history and importance plots (PNG).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import yaml

from .config import ConfigError, ConfigSource, load_config
from .config.sources import coerce, load_file, parse_cli, recipe_path, resolve_recipe
from .config.training import lower_is_better
from .disk import write_text_atomically
from .errors import ScaletuneError
from .launch_plan import cluster_preset, scaletune_home, take_options, visible_gpus, whole_number
from .metric_names import best_metric, metric_key
from .search_report import write_report
from .search_space import check_params, distributions, read_space
from .trial_pruning import (ENV_METRIC, ENV_PRUNER, ENV_STORAGE, ENV_STUDY, ENV_TRIAL_ID, PRUNED_AT, PRUNERS,
                            make_pruner)

OPTIONS = ("space", "n_trials", "direction", "metric", "pruner", "preset", "cpu", "study_name")
INTERRUPTED = (130, 143, -2, -15)  # the trial stopped by SIGINT/SIGTERM: the search was stopped with it
WORKER = "search_worker"
"""The trial's user attribute naming the search that runs it: a restarted search resumes only its own."""


def base_values(args: ConfigSource) -> dict:
    """The trials' common config as plain values (a CLI list, a YAML path or recipe name, or a dict)."""
    if isinstance(args, dict):
        values = dict(args)
    elif isinstance(args, (list, tuple)):
        config_file, cli = parse_cli([str(a) for a in args])
        values = load_file(resolve_recipe(config_file)) if config_file else ({} if args else
                                                                             load_file(recipe_path("demo")))
        values.update({key: coerce(key, value) for key, value in cli.items()})  # typed in base.yaml, best.yaml
    elif args is None:
        values = load_file(recipe_path("demo"))
    else:
        values = load_file(resolve_recipe(str(args)))
    load_config(dict(values))  # a bad base config fails here, before anything is written
    return values


def worker_name(env: Mapping[str, str] = os.environ) -> str:
    """This search among those sharing a study: the Slurm array task (kept across a requeue), else the host."""
    task = env.get("SLURM_ARRAY_TASK_ID")
    return f"array-task-{task}" if task else socket.gethostname()


def search(args: ConfigSource = None, *, space: Union[str, Path, dict, None] = None, n_trials: int = 10,
           hp_space: Optional[Callable] = None, model_init: Optional[Callable] = None, metric: Optional[str] = None,
           direction: Optional[str] = None, pruner: str = "median", preset: Optional[str] = None,
           cpu: Optional[int] = None, study_name: str = "scaletune"):
    """Run (or continue) the search; returns the optuna Study.

    `space`: a YAML path or the same mapping as a dict; or `hp_space(trial) -> dict` (Trainer's name: it calls
    `trial.suggest_*`; its values are checked per trial). `model_init` is not supported: trials are separate
    processes, which a Python callable cannot reach; give the model as model_name_or_path in the config."""
    if model_init is not None:
        raise ConfigError("model_init cannot reach the trials (each trial is its own process); set "
                          "model_name_or_path in the config instead.")
    if (space is None) == (hp_space is None):
        raise ConfigError("give the search space: --space SPACE.yaml (or space=... / hp_space=... in Python).")
    if pruner not in PRUNERS:
        raise ConfigError(f"--pruner {pruner!r} is not one of {', '.join(PRUNERS)}.")
    if n_trials < 1:
        raise ConfigError(f"--n_trials must be at least 1, got {n_trials}.")
    base = base_values(args)
    cfg = load_config(dict(base))
    if cfg.training.eval_strategy == "no" or not cfg.training.do_eval:
        raise ConfigError("a search needs evaluations to compare trials: set eval_strategy steps (or epoch) and "
                          "do_eval true.")
    metric = metric_key(metric or best_metric(cfg.training.metric_for_best_model))
    direction = direction or ("minimize" if lower_is_better(metric) else "maximize")
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"--direction {direction!r} is not minimize or maximize.")
    dists = None if space is None else distributions(space if isinstance(space, dict) else read_space(space), base)

    import optuna

    out = Path(cfg.training.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{out / 'study.db'}"
    worker = worker_name()
    task = int(os.environ.get("SLURM_ARRAY_TASK_ID") or 0)  # each worker its own draws from the same seed
    study = optuna.create_study(storage=storage, study_name=study_name, direction=direction, load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=cfg.training.seed + task),
                                pruner=make_pruner(pruner))
    if study.direction.name.lower() != direction:
        raise ConfigError(f"the study {study_name!r} in {out / 'study.db'} maximizes or minimizes the other way "
                          f"({study.direction.name.lower()}); use its direction or another output_dir.")
    write_text_atomically(out / "base.yaml", yaml.safe_dump(base, sort_keys=False))
    runner = TrialRunner(study, storage, out, metric, pruner, preset, cpu, base)
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if frozen.user_attrs.get(WORKER) == worker:
            print(f"scaletune.search: resuming trial {frozen.number} from its latest checkpoint.", file=sys.stderr)
            runner.run(frozen.number, frozen._trial_id, frozen.params, resume=True)
    while _started(study) < n_trials:
        trial = study.ask(dists)
        trial.set_user_attr(WORKER, worker)
        params = trial.params if hp_space is None else check_params(hp_space(trial), base)
        runner.run(trial.number, trial._trial_id, params, resume=False)
    write_report(study, out, metric, base)
    return study


def _started(study) -> int:
    """Trials finished or running (here or in another worker): what counts toward --n_trials."""
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                        optuna.trial.TrialState.PRUNED,
                                                        optuna.trial.TrialState.FAIL,
                                                        optuna.trial.TrialState.RUNNING)))


class TrialRunner:
    """One trial = one ./launch of the base config with the trial's values, in output_dir/trial-K/."""

    def __init__(self, study, storage: str, out: Path, metric: str, pruner: str, preset: Optional[str],
                 cpu: Optional[int], base: dict):
        self.study, self.storage, self.out, self.metric, self.pruner = study, storage, out, metric, pruner
        self.base = base
        self.home = scaletune_home()
        gpus = visible_gpus()
        self.preset = preset or cluster_preset([], os.environ, str(self.home), 1, cpu or gpus)[0]
        self.cpu = cpu if cpu is not None else (1 if gpus == 0 else None)

    def command(self, number: int, params: dict, resume: bool) -> list[str]:
        cmd = [str(self.home / "launch"), self.preset, *(["--cpu", str(self.cpu)] if self.cpu else []),
               str(self.out / "base.yaml"), "--output_dir", str(self.out / f"trial-{number}")]
        if "run_name" not in self.base:
            cmd += ["--run_name", f"{self.study.study_name}-trial-{number}"]
        for key, value in params.items():
            cmd += [f"--{key}", json.dumps(value) if isinstance(value, (bool, type(None))) else str(value)]
        return cmd + (["--resume_from_checkpoint", "latest"] if resume else [])

    def run(self, number: int, trial_id: int, params: dict, resume: bool) -> None:
        import optuna

        env = {**os.environ, ENV_STORAGE: self.storage, ENV_STUDY: self.study.study_name,
               ENV_TRIAL_ID: str(trial_id), ENV_METRIC: self.metric, ENV_PRUNER: self.pruner,
               # W&B: one run per trial, all in the study's group (unless the user named a group).
               "WANDB_RUN_GROUP": os.environ.get("WANDB_RUN_GROUP") or self.study.study_name,
               "PYTHON": os.environ.get("PYTHON") or sys.executable}
        print(f"scaletune.search: trial {number}: {params}", file=sys.stderr, flush=True)
        rc = subprocess.call(self.command(number, params, resume), env=env)
        trial_dir = self.out / f"trial-{number}"
        # A trial stopped by a signal (exit 130/143, or 0 when it requeued its Slurm job: a preempted run writes no
        # all_results.json) is left RUNNING; the same command, or the requeued job, resumes it.
        if rc in INTERRUPTED or (rc == 0 and not (trial_dir / "all_results.json").exists()):
            raise SystemExit(rc)
        frozen = self.study._storage.get_trial(trial_id)
        value = _read_metric(trial_dir, self.metric) if rc == 0 else None
        if PRUNED_AT in frozen.user_attrs:
            self.study.tell(number, state=optuna.trial.TrialState.PRUNED)
        elif value is None:
            why = f"exit code {rc}" if rc else f"no {self.metric} in its all_results.json"
            print(f"scaletune.search: trial {number} failed ({why}); see its output above.", file=sys.stderr)
            self.study.tell(number, state=optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(number, value)


def _read_metric(trial_dir: Path, metric: str) -> Optional[float]:
    try:
        value = json.loads((trial_dir / "all_results.json").read_text()).get(metric)
    except (OSError, ValueError):
        return None
    return None if value is None else float(value)


def parse_args(argv: list[str]) -> tuple[list[str], dict]:
    """(the training arguments, search()'s keyword arguments) of the command line."""
    opts, train = take_options(argv, valued=OPTIONS)
    if "space" not in opts:
        raise ConfigError("--space SPACE.yaml is required (the keys to search and their ranges).")
    for key in ("n_trials", "cpu"):
        if key in opts:
            opts[key] = whole_number(f"--{key}", opts[key])
    return train, opts


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    try:
        train, opts = parse_args(argv)
        search(train, **opts)
    except ScaletuneError as e:
        print(f"scaletune.search: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
