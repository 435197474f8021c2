"""Run tracking: JSONL log, trackers (W&B, TensorBoard), progress bar, end summary, curves PNG.

Interface used by the loop (keep it stable):
    tracker = RunTracker(cfg, accelerator, run_id=None)   # run_id: resume the same W&B run
    tracker.run_id                                        # str, saved in every checkpoint's state
    tracker.start(total_steps: int, initial_step: int)    # progress bar (main process only)
    tracker.progress(step: int, loss: float | None, learning_rate: float | None)  # after each update
    tracker.log(metrics: dict, step: int)                 # Trainer-style keys: loss, grad_norm, learning_rate,
                                                          # epoch, eval_* ... (main process only writes)
    tracker.finish(summary: dict)                         # best metric/step, final metrics, paths; prints the
                                                          # one-screen summary, writes curves PNG, closes trackers

What gets written (main process only):
    output_dir/metrics.jsonl     one line per log/eval event: {"step": N, "loss": ..., "eval_accuracy": ...};
                                 appended on resume (run_id given), so a requeued job keeps one file; a fresh
                                 start (run_id None) begins a new file
    output_dir/curves.png        training/evaluation curves, redrawn from metrics.jsonl at the end
    W&B                          keys as transformers' WandbCallback: `eval_x` -> `eval/x`, `test_x` -> `test/x`,
                                 everything else `train/x`; step = optimizer step; run id = tracker.run_id
    TensorBoard                  same keys and steps under logging_dir/run_name (default output_dir/runs/<name>)

The W&B and TensorBoard writers are Accelerate's tracker classes (accelerate.tracking), started here rather than
through Accelerator(log_with=...) so that the run id and the W&B init arguments stay under our control.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional

from .config import ConfigError

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
DEFAULT_WANDB_PROJECT = "scaletune"

TRACKER_PACKAGES = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboard", "tensorboard")}


# --------------------------------------------------------------------------- pure decisions


def check_report_to(report_to) -> None:
    """Fail before any model is loaded when a requested tracker's package is missing."""
    for name in report_to or ():
        module, pip_name = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"report_to includes {name!r} but the {module!r} package is not installed: "
                f"pip install {pip_name} (or pip install 'scaletune[tracking]'), or drop {name} from report_to."
            )


def tracker_key(name: str) -> str:
    """Trainer-style metric name -> tracker name, as transformers' `rewrite_logs` (eval_loss -> eval/loss)."""
    for prefix in ("eval", "test"):
        if name.startswith(prefix + "_"):
            return f"{prefix}/{name[len(prefix) + 1:]}"
    return f"train/{name}"


def tracker_metrics(metrics: Mapping[str, Any]) -> dict:
    """The numeric metrics, renamed for trackers (strings and None would become TensorBoard text or errors)."""
    return {
        tracker_key(k): v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def resolve_run_name(training_args, env: Mapping[str, str]) -> str:
    return training_args.run_name or env.get("WANDB_NAME") or Path(training_args.output_dir).resolve().name


def resolve_logging_dir(training_args) -> str:
    return training_args.logging_dir or str(Path(training_args.output_dir) / "runs")


def _split_tags(tags: Optional[str]) -> Optional[list[str]]:
    if not tags:
        return None
    return [t.strip() for t in tags.split(",") if t.strip()] or None


def wandb_init_kwargs(training_args, config: dict, run_id: str, env: Mapping[str, str]) -> dict:
    """Arguments for wandb.init: config fields first, then the usual WANDB_* variables, then defaults.

    `resume="allow"` with a fixed id: the first attempt creates the run, a requeued attempt (same id, read back
    from the checkpoint) continues it.
    """
    t = training_args
    return {
        "project": t.wandb_project or env.get("WANDB_PROJECT") or DEFAULT_WANDB_PROJECT,
        "entity": t.wandb_entity or env.get("WANDB_ENTITY") or None,
        "group": t.wandb_group or env.get("WANDB_RUN_GROUP") or None,
        "tags": _split_tags(t.wandb_tags) or _split_tags(env.get("WANDB_TAGS")),
        "name": resolve_run_name(t, env),
        "id": run_id,
        "resume": "allow",
        "dir": env.get("WANDB_DIR") or t.output_dir,
        "config": config,
        # Our own run object, never wandb's global one: a user's surrounding run (or a previous run() in the
        # same process) is left alone.
        "reinit": "create_new",
    }


def new_run_id(env: Mapping[str, str], report_to) -> str:
    """A fresh run id: $WANDB_RUN_ID when W&B is on and the user set one, else 8 random [0-9a-z] like W&B's."""
    if "wandb" in (report_to or ()) and env.get("WANDB_RUN_ID"):
        return env["WANDB_RUN_ID"]
    return uuid.uuid4().hex[:8]


def hparams_for_tensorboard(config: Mapping[str, Any]) -> dict:
    """TensorBoard hparams accept only scalars and strings."""
    out = {}
    for k, v in config.items():
        if v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = ",".join(map(str, v))
        else:
            out[k] = str(v)
    return out


def to_python(value: Any) -> Any:
    """Numbers from torch/numpy -> Python scalars (JSON, W&B and TensorBoard all accept those)."""
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()  # a 0-d tensor on a GPU makes this a host-device sync; the loop passes floats
        except (ValueError, RuntimeError):
            return value
    return value


def format_metrics(metrics: Mapping[str, Any]) -> str:
    parts = []
    for k, v in metrics.items():
        if isinstance(v, float):
            v = f"{v:.3e}" if (v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5)) else f"{v:.4g}"
        parts.append(f"{k}={v}")
    return "  ".join(parts)


# --------------------------------------------------------------------------- JSONL and curves


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# Eval keys that describe speed, not quality: kept in the JSONL, left out of the quality panel.
_EVAL_SPEED = ("runtime", "samples_per_second", "steps_per_second")

# (panel title, y label, predicate on the Trainer-style key)
PANELS: tuple = (
    ("Loss", "loss", lambda k: k in ("loss", "eval_loss")),
    ("Evaluation metrics", "value",
     lambda k: k.startswith("eval_") and k != "eval_loss" and not k.endswith(_EVAL_SPEED)),
    ("Learning rate", "learning rate", lambda k: k == "learning_rate"),
    ("Gradient norm", "grad norm (before clipping)", lambda k: k == "grad_norm"),
    ("Throughput", "tokens/s (non-padding)", lambda k: k == "tokens_per_second"),
    ("Utilisation", "fraction", lambda k: k in ("mfu", "data_wait_fraction")),
)


def curve_series(records: list[dict]) -> dict[str, dict[str, tuple[list, list]]]:
    """{panel title: {key: (steps, values)}} from JSONL records, steps ascending.

    A resumed run re-logs the steps between its checkpoint and the interruption; the later record (the attempt
    that went on) wins.
    """
    by_key: dict[str, dict[int, float]] = {}
    for rec in records:
        step = rec.get("step")
        if step is None:
            continue
        for k, v in rec.items():
            if k == "step" or not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                continue
            by_key.setdefault(k, {})[int(step)] = float(v)
    out: dict = {}
    for title, _, wanted in PANELS:
        series = {}
        for k in sorted(by_key):
            if wanted(k):
                steps = sorted(by_key[k])
                series[k] = (steps, [by_key[k][s] for s in steps])
        out[title] = series
    return out


def plot_curves(records: list[dict], path, title: str = "") -> dict[str, dict[str, tuple[list, list]]]:
    """Write the curves PNG; returns what the figure's lines actually hold ({panel: {key: (x, y)}})."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; safe on headless nodes
    import matplotlib.pyplot as plt

    series = curve_series(records)
    # Fixed margins instead of constrained_layout: the layout solver cost seconds per run on small CPUs.
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.07, top=0.92, wspace=0.28, hspace=0.32)
    drawn: dict = {}
    try:
        for ax, (panel, ylabel, _) in zip(axes.flat, PANELS):
            ax.set_title(panel)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if not series[panel]:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
                continue
            for key, (steps, values) in series[panel].items():
                # Sparse series (evaluations) get markers so a single point is still visible.
                ax.plot(steps, values, label=key, marker="o" if len(steps) < 30 else None, markersize=3)
            ax.legend(fontsize=8)
            drawn[panel] = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}
        if title:
            fig.suptitle(title)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
    finally:
        plt.close(fig)
    return drawn


# --------------------------------------------------------------------------- end summary


def format_summary(summary: Mapping[str, Any], metric_for_best: Optional[str], written: Mapping[str, str],
                   run_line: str, elapsed_s: float) -> str:
    """The one-screen end-of-run summary (pure: summary dict in, text out)."""
    rows: list[tuple[str, str]] = [("run", run_line)]
    if summary.get("global_step") is not None:
        rows.append(("steps", f"{summary['global_step']}  in {_hms(elapsed_s)}"))
    if summary.get("best_metric") is not None:
        name = metric_for_best or "metric"
        name = name if name.startswith(("eval_", "test_")) else f"eval_{name}"
        rows.append(("best", f"{name} = {summary['best_metric']:.6g} at step {summary.get('best_global_step')}"))
    if summary.get("best_model_checkpoint"):
        rows.append(("best checkpoint", str(summary["best_model_checkpoint"])))
    for prefix in ("eval", "test"):  # final metrics: one wrapped row per split
        finals = [f"{k[len(prefix) + 1:]} {_short(to_python(v))}" for k, v in summary.items()
                  if k.startswith(prefix + "_")]
        for i, chunk in enumerate(textwrap.wrap("  ".join(finals), 80)):
            rows.append((f"final {prefix}" if i == 0 else "", chunk))
    if summary.get("baseline"):  # for scale: what a trivial model scores on the same eval data
        rows.append(("baseline eval", str(summary["baseline"])))
    for label, key in (("output dir", "output_dir"), ("model", "model_dir"), ("predictions", "predictions_file")):
        if summary.get(key) and (key == "output_dir" or summary[key] != summary.get("output_dir")):
            rows.append((label, str(summary[key])))
    rows += [(label, str(p)) for label, p in written.items() if p]
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k.ljust(width)}  {v}" for k, v in rows]
    rule = "=" * min(100, max(len(line) for line in lines))
    return "\n".join([rule, "  scaletune: run finished", rule, *lines, rule])


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# --------------------------------------------------------------------------- the tracker


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
    def __init__(self, cfg, accelerator, run_id: str | None = None, env: Optional[Mapping[str, str]] = None):
        """Collective (every rank constructs it): the main process picks the run id and shares it."""
        from accelerate.utils import broadcast_object_list

        self.cfg = cfg
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        t = cfg.training
        env = os.environ if env is None else env
        self.report_to = list(t.report_to or ())  # packages checked up front by train.preflight
        self.output_dir = Path(t.output_dir)
        self.jsonl_path = self.output_dir / METRICS_FILE
        self.curves_path = self.output_dir / CURVES_FILE
        self.run_name = resolve_run_name(t, env)  # other ranks were quieted by train.run, before model loading

        # All ranks must store the same id in their checkpoint state.
        self.run_id = broadcast_object_list([run_id or new_run_id(env, self.report_to)])[0]
        self.trackers: list = []
        self.wandb_run = None
        self._wandb_tracker = None
        self.tensorboard_dir: Optional[str] = None
        self._bar = None
        self._t0 = time.time()
        if self.is_main:
            if run_id is None:
                # A fresh start (no checkpoint to resume, e.g. overwrite_output_dir) must not extend an old
                # run's log; a resume (run_id from the checkpoint) appends to it.
                self.jsonl_path.unlink(missing_ok=True)
            self._start_trackers(env)

    def _start_trackers(self, env: Mapping[str, str]) -> None:
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        config = self.cfg.to_dict()
        t = self.cfg.training
        if "wandb" in self.report_to:
            kwargs = wandb_init_kwargs(t, config, self.run_id, env)
            Path(kwargs["dir"]).mkdir(parents=True, exist_ok=True)
            project = kwargs.pop("project")
            tracker = WandBTracker(project, **kwargs)  # accelerate passes its first argument as the project
            try:
                tracker.start()
            except Exception as e:  # wandb raises its own UsageError/CommError types
                raise RuntimeError(
                    f"W&B could not start ({type(e).__name__}: {e}). Log in with `wandb login` or set "
                    "WANDB_API_KEY; or run without a network with WANDB_MODE=offline (sync later with `wandb sync`); "
                    "or drop wandb from report_to."
                ) from e
            self.wandb_run = tracker.run
            self._wandb_tracker = tracker
            self.run_id = tracker.run.id
            self.trackers.append(tracker)
        if "tensorboard" in self.report_to:
            tracker = TensorBoardTracker(self.run_name, resolve_logging_dir(t))
            tracker.start()
            tracker.store_init_configuration(hparams_for_tensorboard(config))
            self.tensorboard_dir = tracker.logging_dir
            self.trackers.append(tracker)

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
        if self._bar is not None:
            self._bar.write(text)  # above the bar, without breaking it
        else:
            print(text, flush=True)

    # ------------------------------------------------------------------ logging

    def log(self, metrics: dict, step: int) -> None:
        if not self.is_main:
            return
        metrics = {k: to_python(v) for k, v in metrics.items()}
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
        summary = {k: to_python(v) for k, v in summary.items()}
        try:
            plot_curves(read_jsonl(self.jsonl_path), self.curves_path, title=self.run_name)
            curves = str(self.curves_path)
        except Exception as e:  # a plot must never cost the run its summary and tracker close
            curves = f"(not written: {type(e).__name__}: {e})"
        written = {"metrics log": str(self.jsonl_path), "curves": curves, "tensorboard": self.tensorboard_dir}
        if self.wandb_run is not None:
            written["wandb"] = self._wandb_location()
            run = self.wandb_run
            self._guarded(self._wandb_tracker, lambda: run.summary.update(self._wandb_summary(summary)))
        for tracker in list(self.trackers):
            self._guarded(tracker, tracker.finish)
        self.trackers = []
        run_line = f"{self.run_name}  (run id {self.run_id})"
        self._print(format_summary(summary, self.cfg.training.metric_for_best_model, written, run_line,
                                   time.time() - self._t0))

    def _wandb_summary(self, summary: Mapping[str, Any]) -> dict:
        out = {}
        for k, v in summary.items():
            if v is None:
                continue
            if k.startswith(("eval_", "test_")):
                out[tracker_key(k)] = v
            else:
                out[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
        return out

    def _wandb_location(self) -> str:
        run = self.wandb_run
        if run.offline:
            return f"{Path(run.dir).parent}  (offline: `wandb sync` it to upload)"
        return run.url or run.dir
