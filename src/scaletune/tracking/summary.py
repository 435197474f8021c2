"""What the run prints: the one-line-per-log metrics and the one-screen end-of-run summary (pure text)."""

from __future__ import annotations

import textwrap
from typing import Any, Mapping, Optional

from ..metric_names import SPLITS, best_metric, metric_key
from .jsonl import to_python


def format_metrics(metrics: Mapping[str, Any]) -> str:
    parts = []
    for k, v in metrics.items():
        if isinstance(v, float):
            v = f"{v:.3e}" if (v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5)) else f"{v:.4g}"
        parts.append(f"{k}={v}")
    return "  ".join(parts)


def format_summary(summary: Mapping[str, Any], metric_for_best: Optional[str], written: Mapping[str, str],
                   run_line: str, elapsed_s: float) -> str:
    """The one-screen end-of-run summary (pure: summary dict in, text out)."""
    rows: list[tuple[str, str]] = [("run", run_line)]
    if summary.get("global_step") is not None:
        rows.append(("steps", f"{summary['global_step']}  in {_hms(elapsed_s)}"))
    if summary.get("best_metric") is not None:
        name = metric_key(best_metric(metric_for_best))
        rows.append(("best", f"{name} = {summary['best_metric']:.6g} at step {summary.get('best_global_step')}"))
    if summary.get("best_model_checkpoint"):
        rows.append(("best checkpoint", str(summary["best_model_checkpoint"])))
    for prefix in SPLITS:  # final metrics: one wrapped row per split
        finals = [f"{k[len(prefix) + 1:]} {_short(to_python(v))}" for k, v in summary.items()
                  if k.startswith(prefix + "_")]
        for i, chunk in enumerate(textwrap.wrap("  ".join(finals), 80)):
            rows.append((f"final {prefix}" if i == 0 else "", chunk))
    if summary.get("mixture"):  # train_mixture: samples trained on from each source
        rows.append(("samples per source", str(summary["mixture"])))
    if summary.get("baseline"):  # for scale: what a trivial model scores on the same eval data
        rows.append(("baseline eval", str(summary["baseline"])))
    for label, key in (("output dir", "output_dir"), ("model", "model_dir"), ("predictions", "predictions_file")):
        if summary.get(key) and (key == "output_dir" or summary[key] != summary.get("output_dir")):
            rows.append((label, str(summary[key])))
    rows += [(label, str(p)) for label, p in written.items() if p]
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k.ljust(width)}  {v}" for k, v in rows]
    rule = "=" * min(100, max(len(line) for line in lines))
    # A preempted run (Ctrl-C, Slurm) stopped with a checkpoint to resume from: it did not finish.
    title = (f"run stopped at step {summary.get('global_step')}" if summary.get("stop_reason") == "preempted"
             else "run finished")
    return "\n".join([rule, f"  scaletune: {title}", rule, *lines, rule])


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
