"""Entry point: `accelerate launch -m scaletune.train [CONFIG] [--key value ...]` and `run(config)`.

parse -> check (cheap, before torch work) -> build -> fit -> finish. Short on purpose: every step is a
call into a module that owns it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .config import ConfigError, ConfigSource, load_config


@dataclass
class RunResult:
    """What `run` returns: final metrics, checkpoints left on disk, and Trainer's state fields."""

    metrics: dict
    checkpoints: list
    global_step: int
    best_metric: Optional[float]
    best_global_step: Optional[int]
    best_model_checkpoint: Optional[str]
    log_history: list
    stop_reason: str
    output_dir: str
    predictions_file: Optional[str] = None
    extra: dict = field(default_factory=dict)


def preflight(cfg, compute_metrics: Optional[Callable] = None):
    """Checks that need no model or data loading: bad input fails in seconds, nothing is overwritten."""
    from . import checkpoint, data
    from .schedule import metric_key
    from .tasks import get_task
    from .tracking import check_report_to

    t = cfg.training
    check_report_to(t.report_to)
    if t.metric_for_best_model and compute_metrics is None:  # a custom compute_metrics is only known later
        known = [f"eval_{m}" for m in get_task(cfg.data.task).metric_names]
        if metric_key(t.metric_for_best_model) not in known:
            raise ConfigError(f"metric_for_best_model={t.metric_for_best_model!r} is not an evaluation metric of "
                              f"the {cfg.data.task} task; choose one of {', '.join(known)}.")
    data.check_files(cfg)
    resume = checkpoint.resolve_resume(t.output_dir, t.resume_from_checkpoint)
    checkpoint.check_output_dir(t.output_dir, resuming=resume is not None, overwrite=t.overwrite_output_dir)
    return resume


def run(config: ConfigSource = None, compute_metrics: Optional[Callable] = None,
        overrides: Optional[dict] = None) -> RunResult:
    """Train, evaluate, export and predict as configured. `config`: dict, YAML/JSON path, CLI args list."""
    cfg = load_config(config, overrides)
    resume_path = preflight(cfg, compute_metrics)

    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    from . import checkpoint, data, schedule
    from .assets import model_path
    from .distributed import build_accelerator, configure_model
    from .loop import Components, fit
    from .optim import build_optimizer, build_scheduler
    from .preemption import PreemptionWatcher, requeue_if_slurm
    from .state import TrainingState
    from .tasks import get_task
    from .throughput import ThroughputMeter
    from .tracking import RunTracker, quiet_other_ranks

    t, d = cfg.training, cfg.data
    accelerator = build_accelerator(cfg)
    quiet_other_ranks(accelerator)
    watcher = PreemptionWatcher()
    watcher.install()  # early: a preemption during data loading still checkpoints nothing but exits cleanly
    set_seed(t.seed)
    task = get_task(d.task)
    m = cfg.model
    tokenizer = AutoTokenizer.from_pretrained(model_path(m.tokenizer_name or m.model_name_or_path),
                                              cache_dir=m.cache_dir, revision=m.model_revision,
                                              trust_remote_code=m.trust_remote_code)
    raw = data.load_raw_datasets(cfg, streaming=d.streaming)
    prepared = task.prepare_data(raw, tokenizer, cfg, accelerator.main_process_first)
    set_seed(t.seed)  # the head's init does not depend on how much randomness data loading used
    model = configure_model(task.build_model(cfg, prepared, tokenizer), t)  # gradient checkpointing
    # Seeded again, as Trainer.__init__ does after the user built the model: the dropout stream then does not
    # depend on how much randomness a new head's init drew (tests/test_parity_migration.py).
    set_seed(t.seed)

    train_dl = data.build_dataloader(prepared.train, task.collator(tokenizer, cfg, True),
                                     t.per_device_train_batch_size, True, t) if t.do_train else None
    eval_dl = (data.build_dataloader(prepared.validation, task.collator(tokenizer, cfg, False),
                                     t.per_device_eval_batch_size, False, t) if prepared.validation is not None
               else None)
    test_dl = (data.build_dataloader(prepared.test, task.collator(tokenizer, cfg, False),
                                     t.per_device_eval_batch_size, False, t) if prepared.test is not None
               and t.do_predict else None)
    if (t.eval_strategy != "no" or t.load_best_model_at_end) and eval_dl is None:
        raise ConfigError("Evaluation is on but there is no validation data: set validation_file or "
                          "validation_split_percentage > 0.")

    optimizer = build_optimizer(model, t)
    train_dl, eval_dl, test_dl = accelerator.prepare(train_dl, eval_dl, test_dl)
    plan = schedule.resolve_plan(t, len(train_dl) if train_dl is not None and hasattr(prepared.train, "__len__")
                                 else None) if t.do_train else None
    if plan is not None:
        schedule.check_best_model_cadence(t, plan)
    scheduler = build_scheduler(optimizer, t, plan) if plan else None
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    state = TrainingState()
    if resume_path is not None:
        state = checkpoint.load_checkpoint(accelerator, resume_path)
        accelerator.print(f"Resumed from {resume_path} at step {state.global_step}.")
    tracker = RunTracker(cfg, accelerator, run_id=state.tracker_run_id)
    state.tracker_run_id = tracker.run_id
    if accelerator.is_main_process:
        cfg.save(Path(t.output_dir) / "config.yaml")  # the effective config, with every default spelled out

    comps = Components(cfg=cfg, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                       train_dataloader=train_dl, eval_dataloader=eval_dl, task=task, tokenizer=tokenizer,
                       tracker=tracker, meter=ThroughputMeter(model, accelerator), watcher=watcher,
                       compute_metrics=compute_metrics)
    stop_reason = fit(comps, state, plan) if t.do_train else "no_training"
    if stop_reason == "preempted":
        accelerator.print(f"Preempted at step {state.global_step}; checkpoint written.")
        # Close the trackers before requeueing: Slurm answers a requeue with SIGTERM to every process of the
        # job. The requeued attempt continues the same W&B run (its id is in the checkpoint).
        comps.tracker.finish({"global_step": state.global_step, "stop_reason": stop_reason,
                              "output_dir": t.output_dir})
        requeue_if_slurm(accelerator)  # collective
        accelerator.end_training()
        return _result(cfg, state, {}, stop_reason, None)
    metrics, predictions_file = finish(comps, state, test_dl, prepared)
    accelerator.end_training()
    return _result(cfg, state, metrics, stop_reason, predictions_file)


def finish(c, state, test_dl, prepared):
    """Reload the best weights, rotate, evaluate, export the model, predict the test split."""
    from . import checkpoint, schedule
    from .evaluation import evaluate
    from .loop import best_checkpoint_step

    t, acc = c.cfg.training, c.accelerator
    if t.load_best_model_at_end and state.best_model_checkpoint:
        acc.print(f"Loading best model from {state.best_model_checkpoint} (score: {state.best_metric}).")
        checkpoint.load_model_weights(acc, c.model, state.best_model_checkpoint)
        steps = list(checkpoint.list_checkpoints(t.output_dir))
        checkpoint.delete_checkpoints(acc, t.output_dir, schedule.final_checkpoints_to_delete(
            steps, t.save_total_limit, best_checkpoint_step(state)))
    metrics = {}
    if t.do_eval and c.eval_dataloader is not None:
        eval_metrics, _ = evaluate(c.model, c.eval_dataloader, c.task, acc, "eval", c.compute_metrics)
        metrics.update(eval_metrics)
    checkpoint.export_model(acc, c.model, c.tokenizer, t.output_dir)
    predictions_file = None
    if test_dl is not None:
        test_metrics, predictions = evaluate(c.model, test_dl, c.task, acc, "test", c.compute_metrics)
        metrics.update(test_metrics)
        if acc.is_main_process:
            predictions_file = str(Path(t.output_dir) / "predictions.csv")
            c.task.write_predictions(predictions_file, predictions, prepared, acc.unwrap_model(c.model).config)
            if not Path(predictions_file).exists():  # MLM writes none: its test split gives metrics only
                predictions_file = None
    if acc.is_main_process:
        Path(t.output_dir, "all_results.json").write_text(json.dumps(metrics, indent=2))
        state.save(t.output_dir)
    c.tracker.finish({**metrics, "global_step": state.global_step, "best_metric": state.best_metric,
                      "best_global_step": state.best_global_step,
                      "best_model_checkpoint": state.best_model_checkpoint, "output_dir": t.output_dir,
                      "model_dir": t.output_dir, "predictions_file": predictions_file,
                      "baseline": c.task.baseline(prepared.validation) if "eval_loss" in metrics else None})
    return metrics, predictions_file


def _result(cfg, state, metrics, stop_reason, predictions_file) -> RunResult:
    from .checkpoint import list_checkpoints

    out = cfg.training.output_dir
    return RunResult(metrics=metrics, checkpoints=[str(p) for p in list_checkpoints(out).values()],
                     global_step=state.global_step, best_metric=state.best_metric,
                     best_global_step=state.best_global_step, best_model_checkpoint=state.best_model_checkpoint,
                     log_history=state.log_history, stop_reason=stop_reason, output_dir=out,
                     predictions_file=predictions_file)


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nOptions: see the configuration reference in README.md "
              "(every field of scaletune.config's ModelArguments, DataArguments, TrainingArguments).")
        return 0
    try:
        run(argv)
    except (ConfigError, ValueError, RuntimeError, KeyError) as e:
        # Known input problems: one clear line, no traceback (the message names the fix).
        from .assets import AssetError
        from .checkpoint import CheckpointError
        from .data import DataError
        from .loop import MetricNotFound

        if isinstance(e, (ConfigError, DataError, CheckpointError, AssetError, MetricNotFound)):
            print(f"scaletune: error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
