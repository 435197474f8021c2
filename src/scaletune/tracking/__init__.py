"""Run tracking: JSONL log, trackers (W&B, TensorBoard, Trackio, MLflow), progress bar, end summary, curves PNG.

Interface used by the loop (keep it stable):
    tracker = RunTracker(cfg, accelerator, run_id=None)   # run_id: resume the same W&B run
    tracker.run_id                                        # str, saved in every checkpoint's state
    tracker.start(total_steps: int, initial_step: int)    # progress bar (main process only)
    tracker.progress(step: int, loss: float | None, learning_rate: float | None)  # after each update
    tracker.log(metrics: dict, step: int)                 # Trainer-style keys: loss, grad_norm, learning_rate,
                                                          # epoch, eval_* ... (main process only writes)
    tracker.finish(summary: dict)                         # best metric/step, final metrics, paths; prints the
                                                          # one-screen summary, writes curves PNG, closes trackers
    check_report_to(report_to, env=None, netrc_path=None) # preflight: packages installed, W&B logged in
    quiet_other_ranks(accelerator)                        # non-main ranks: library logging to errors only

What gets written (main process only):
    output_dir/metrics.jsonl     one line per log/eval event: {"step": N, "loss": ..., "eval_accuracy": ...};
                                 appended on resume (run_id given), so a requeued job keeps one file; a fresh
                                 start (run_id None) begins a new file
    output_dir/curves.png        training/evaluation curves, redrawn from metrics.jsonl at the end
    W&B                          keys as transformers' WandbCallback: `eval_x` -> `eval/x`, `test_x` -> `test/x`,
                                 everything else `train/x`; step = optimizer step; run id = tracker.run_id
    TensorBoard                  same keys and steps under logging_dir/run_name (default output_dir/runs/<name>)
    Trackio                      same keys and steps, local SQLite in $TRACKIO_DIR (default output_dir/trackio),
                                 run `<name>-<run id>` continued on resume
    MLflow                       same keys and steps, config as params, $MLFLOW_TRACKING_URI (default a file store
                                 in output_dir/mlruns), run tagged scaletune.run_id=<run id> continued on resume;
                                 with log_model_artifact, the exported model as an artifact (also Trackio)
Secret values from the environment (scaletune.secrets) are replaced by `***` in all of these and in what is
printed: config, hparams, run name, metrics, summary.

Modules, one per sink: preflight (checks before anything heavy), jsonl (metrics.jsonl), sinks (W&B and
TensorBoard; the tracker key rule all trackers share), trackio_sink, mlflow_sink, curves (PNG), summary (printed
text). RunTracker, the facade that drives them, lives here so that its module globals are the package's names
(patching scaletune.tracking.plot_curves reaches it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Mapping, Optional

from ..errors import ConfigError, first_line
from ..secrets import redact_values, secret_values
from .curves import CURVES_FILE, PANELS, curve_series, plot_curves
from .jsonl import METRICS_FILE, append_jsonl, keep_jsonl_until, read_jsonl, to_python
from .mlflow_sink import mlflow_params, mlflow_tracking_uri, start_mlflow
from .preflight import TRACKER_PACKAGES, check_report_to, wandb_credentials_found
from .sinks import (
    DEFAULT_WANDB_PROJECT,
    hparams_for_tensorboard,
    model_files,
    new_run_id,
    resolve_logging_dir,
    resolve_run_name,
    start_tensorboard,
    start_wandb,
    tracker_key,
    tracker_metrics,
    wandb_init_kwargs,
    wandb_location,
    wandb_summary,
)
from .summary import format_metrics, format_summary
from .trackio_sink import start_trackio, trackio_dir

__all__ = [
    "CURVES_FILE", "DEFAULT_WANDB_PROJECT", "METRICS_FILE", "PANELS", "TRACKER_PACKAGES", "RunTracker",
    "append_jsonl", "check_report_to", "curve_series", "format_metrics", "format_summary",
    "hparams_for_tensorboard", "new_run_id", "plot_curves", "quiet_other_ranks", "read_jsonl",
    "resolve_logging_dir", "resolve_run_name", "to_python", "tracker_key", "tracker_metrics",
    "wandb_credentials_found", "wandb_init_kwargs", "mlflow_params", "mlflow_tracking_uri", "trackio_dir",
]


def quiet_other_ranks(accelerator) -> None:
    """Only the main process prints library info and progress bars; other ranks report errors only."""
    if accelerator.is_main_process:
        return
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


class RunTracker:
    def __init__(self, cfg, accelerator, run_id: str | None = None, env: Optional[Mapping[str, str]] = None,
                 resume_step: Optional[int] = None):
        """Collective (every rank constructs it): the main process picks the run id and shares it.
        `resume_step`: the step a resumed run continues from; records logged after it by the interrupted
        attempt are dropped from metrics.jsonl, since this attempt logs those steps again."""
        from accelerate.utils import broadcast_object_list

        self.cfg = cfg
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        t = cfg.training
        env = os.environ if env is None else env
        # Collected once: log() runs every logging step and the environment does not change mid-run.
        self._secrets = secret_values(env)
        self.report_to = list(t.report_to or ())  # packages checked up front by train.preflight
        self.output_dir = Path(t.output_dir)
        self.jsonl_path = self.output_dir / METRICS_FILE
        self.curves_path = self.output_dir / CURVES_FILE
        # Redacted once here, so the W&B name, the TensorBoard folder, the PNG title and the summary agree.
        self.run_name = redact_values(resolve_run_name(t, env), self._secrets)

        # All ranks must store the same id in their checkpoint state.
        self.run_id = broadcast_object_list([run_id or new_run_id(env, self.report_to)])[0]
        self.trackers: list = []
        self.wandb_run = None
        self._wandb_tracker = None
        self.tensorboard_dir: Optional[str] = None
        self._stores: dict = {}  # "trackio"/"mlflow" -> its sink: log_model and where to find it at the end
        self._bar = None
        self._t0 = time.time()
        if self.is_main:
            if run_id is None:
                # A fresh start (no checkpoint to resume, e.g. overwrite_output_dir) must not extend an old
                # run's log; a resume (run_id from the checkpoint) appends to it.
                self.jsonl_path.unlink(missing_ok=True)
            elif resume_step is not None:
                keep_jsonl_until(self.jsonl_path, resume_step)
            self._start_trackers(env)

    def _start_trackers(self, env: Mapping[str, str]) -> None:
        config = self.cfg.to_dict()  # each sink redacts what it receives
        t = self.cfg.training
        if "wandb" in self.report_to:
            tracker = start_wandb(t, config, self.run_id, env)
            self.wandb_run = tracker.run
            self._wandb_tracker = tracker
            self.run_id = tracker.run.id
            self.trackers.append(tracker)
        if "tensorboard" in self.report_to:
            tracker = start_tensorboard(self.run_name, resolve_logging_dir(t), config, env)
            self.tensorboard_dir = tracker.logging_dir
            self.trackers.append(tracker)
        for name, start, where in (("trackio", start_trackio, "TRACKIO_DIR, TRACKIO_SPACE_ID, TRACKIO_SERVER_URL"),
                                   ("mlflow", start_mlflow, "MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME")):
            if name not in self.report_to:
                continue
            try:
                self._stores[name] = sink = start(t, config, self.run_id, self.run_name, env)
            except Exception as e:  # a store that refuses (permissions, a server that rejects the client)
                cause = redact_values(first_line(e), self._secrets)
                raise ConfigError(f"report_to includes {name!r} but it could not start ({type(e).__name__}: "
                                  f"{cause}); check {where}, or drop {name} from report_to.") from None
            self.trackers.append(sink)

    # ------------------------------------------------------------------ progress

    def start(self, total_steps: int, initial_step: int) -> None:
        self._t0 = time.time()
        if not self.is_main or self.cfg.training.disable_tqdm:
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)

    def progress(self, step: int, loss=None, learning_rate=None) -> None:
        if self._bar is None:
            return
        self._bar.update(step - self._bar.n)
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{to_python(loss):.4f}"
        if learning_rate is not None:
            postfix["lr"] = f"{to_python(learning_rate):.2e}"
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)  # drawn at tqdm's own refresh rate

    def _print(self, text: str) -> None:
        # Last line of defence: warnings quote exception text, which may quote a credential.
        text = redact_values(text, self._secrets)
        if self._bar is not None:
            self._bar.write(text)  # above the bar, without breaking it
        else:
            print(text, flush=True)

    # ------------------------------------------------------------------ logging

    def log(self, metrics: dict, step: int) -> None:
        if not self.is_main:
            return
        # A custom compute_metrics may return strings; those must not carry a credential into any sink.
        metrics = redact_values({k: to_python(v) for k, v in metrics.items()}, self._secrets)
        append_jsonl(self.jsonl_path, {"step": int(step), **metrics})
        values = tracker_metrics(metrics)
        if values:
            for tracker in list(self.trackers):
                self._guarded(tracker, lambda: tracker.log(values, step=int(step)))
        self._print(f"[step {step}] {format_metrics(metrics)}")

    def _guarded(self, tracker, call) -> None:
        """A tracker failing mid-run (e.g. W&B's service process killed by a Slurm SIGTERM) must not cost the
        run its checkpoint: warn once, drop that tracker, keep training; the JSONL log is still complete."""
        try:
            call()
        except Exception as e:
            self.trackers.remove(tracker)
            if tracker is self._wandb_tracker:
                self.wandb_run = self._wandb_tracker = None
            self._print(f"scaletune: warning: {type(tracker).__name__} failed ({type(e).__name__}: {e}); "
                        f"it is dropped for the rest of this run (metrics.jsonl keeps everything).")

    # ------------------------------------------------------------------ end

    def finish(self, summary: dict) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        summary = redact_values({k: to_python(v) for k, v in summary.items()}, self._secrets)
        curves = None
        if self.cfg.training.plot_curves:
            try:
                plot_curves(read_jsonl(self.jsonl_path), self.curves_path, title=self.run_name)
                curves = str(self.curves_path)
            except Exception as e:  # a plot must never cost the run its summary and tracker close
                curves = f"(not written: {type(e).__name__}: {e})"
        # Only what exists: a run that never reached a logging step has written no metrics.jsonl.
        written = {"metrics log": str(self.jsonl_path) if self.jsonl_path.exists() else None, "curves": curves,
                   "tensorboard": self.tensorboard_dir}
        if self.wandb_run is not None:
            written["wandb"] = wandb_location(self.wandb_run)
            run = self.wandb_run
            self._guarded(self._wandb_tracker, lambda: run.summary.update(wandb_summary(summary)))
        preempted = summary.get("stop_reason") == "preempted"
        for name, sink in self._stores.items():
            if sink not in self.trackers:
                continue  # dropped after a failure, already said
            written[name] = sink.location()
            if self.cfg.training.log_model_artifact and summary.get("model_dir"):
                self._guarded(sink, lambda: sink.log_model(model_files(summary["model_dir"])))
            self._guarded(sink, lambda: sink.finish(preempted))
        for tracker in [t for t in self.trackers if t not in self._stores.values()]:
            self._guarded(tracker, tracker.finish)
        self.trackers = []
        run_line = f"{self.run_name}  (run id {self.run_id})"
        self._print(format_summary(summary, self.cfg.training.metric_for_best_model, written, run_line,
                                   time.time() - self._t0))
