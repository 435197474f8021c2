"""The end of a run: `finish(run, stop_reason) -> RunResult`.

A preempted run closes its trackers and requeues itself (its checkpoint is written). Any other run reloads the
best weights, rotates, evaluates, exports the model with its card, predicts the test split and says what it
left on disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .build import Run
from .checkpoint import list_checkpoints
from .evaluation import PredictionOutput
from .modelcard import write_model_card
from .preemption import requeue_if_slurm


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
    stop_signal: Optional[str] = None
    """The signal that preempted the run (SIGINT, SIGTERM, SIGUSR1), if one did."""
    requeued: bool = False
    """The preempted Slurm job requeued itself."""
    predictions: Optional[PredictionOutput] = None
    """The test split's (predictions, label_ids, metrics), as Trainer's `trainer.predict(test_dataset)`."""

    @property
    def exit_code(self) -> int:
        """0 unless preempted without a requeue: 130 after Ctrl-C, 143 after another signal (a job runner
        must not read success from a run that did not finish)."""
        if self.stop_reason != "preempted" or self.requeued:
            return 0
        return 130 if self.stop_signal == "SIGINT" else 143


def finish(run: Run, stop_reason: str) -> RunResult:
    """Collective: every rank finishes the run it trained."""
    if stop_reason == "preempted":
        return _stop_preempted(run)
    run.watcher.training_over()  # a signal from here on finds no update to stop after: the run says it finishes
    t, state, accelerator, checkpointer = run.cfg.training, run.state, run.accelerator, run.checkpointer
    checkpointer.reload_best(state)
    metrics = {}
    if t.do_eval and run.loaders.eval is not None:
        metrics.update(run.evaluator.evaluate().metrics)
    checkpointer.export()
    if accelerator.is_main_process:
        write_model_card(t.output_dir, run.cfg, accelerator.unwrap_model(checkpointer.model), state.log_history,
                         accelerator.num_processes, state.best_metric, state.best_global_step, stop_reason)
    predictions_file, test_output = None, None
    if run.loaders.test is not None:
        test_output = run.evaluator.evaluate(run.loaders.test, "test")
        metrics.update(test_output.metrics)
        predictions_file = _write_predictions(run, test_output)
    if accelerator.is_main_process:
        Path(t.output_dir, "all_results.json").write_text(json.dumps(metrics, indent=2))
    checkpointer.write_final_state(state)
    best = checkpointer.best_path(state)
    run.tracker.finish({**metrics, "global_step": state.global_step, "best_metric": state.best_metric,
                        "best_global_step": state.best_global_step,
                        "best_model_checkpoint": str(best) if best else None, "output_dir": t.output_dir,
                        "model_dir": t.output_dir, "predictions_file": predictions_file,
                        "baseline": baseline(run) if "eval_loss" in metrics else None,
                        "mixture": run.loop.mixture.summary(state) if run.loop and run.loop.mixture else None})
    # No accelerator.end_training(): it destroys the process group, which the script may still use (another
    # run(), its own collectives); distributed.accelerator destroys it at exit.
    return _result(run, metrics, stop_reason, predictions_file, predictions=test_output)


def _stop_preempted(run: Run) -> RunResult:
    state, accelerator = run.state, run.accelerator
    accelerator.print(f"Preempted at step {state.global_step}; checkpoint written. Resume with "
                      f"--resume_from_checkpoint latest.")
    # Close the trackers before requeueing: Slurm answers a requeue with SIGTERM to every process of the
    # job. The requeued attempt continues the same W&B run (its id is in the checkpoint).
    run.tracker.finish({"global_step": state.global_step, "stop_reason": "preempted",
                        "output_dir": run.cfg.training.output_dir})
    requeued = requeue_if_slurm(accelerator)  # collective
    return _result(run, {}, "preempted", None, run.watcher.signal_name, requeued)


def _write_predictions(run: Run, test_output: PredictionOutput) -> Optional[str]:
    """The main process writes the task's predictions file; its path, or None where the task writes none (MLM:
    its test split gives metrics only)."""
    if not run.accelerator.is_main_process:
        return None
    path = Path(run.cfg.training.output_dir) / run.task.predictions_file
    run.task.write_predictions(str(path), test_output.predictions, run.data,
                               run.accelerator.unwrap_model(run.checkpointer.model).config)
    return str(path) if path.exists() else None


def baseline(run: Run) -> Optional[str]:
    """The task's trivial baseline, when the validation data is a `datasets.Dataset` it can read (a user's
    torch Dataset has no columns to read)."""
    if not hasattr(run.data.validation, "column_names"):
        return None
    return run.task.baseline(run.data.validation)


def _result(run: Run, metrics: dict, stop_reason: str, predictions_file: Optional[str],
            stop_signal: Optional[str] = None, requeued: bool = False,
            predictions: Optional[PredictionOutput] = None) -> RunResult:
    state, out = run.state, run.cfg.training.output_dir
    best = run.checkpointer.best_path(state)
    return RunResult(metrics=metrics, checkpoints=[str(p) for p in list_checkpoints(out).values()],
                     global_step=state.global_step, best_metric=state.best_metric,
                     best_global_step=state.best_global_step, best_model_checkpoint=str(best) if best else None,
                     log_history=state.log_history, stop_reason=stop_reason, output_dir=out,
                     predictions_file=predictions_file, stop_signal=stop_signal, requeued=requeued,
                     predictions=predictions)
