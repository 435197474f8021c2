"""output_dir/curves.png: training and evaluation curves, redrawn from metrics.jsonl at the end of a run."""

from __future__ import annotations

import math
from pathlib import Path

CURVES_FILE = "curves.png"

# Eval keys that describe speed, not quality: kept in the JSONL, left out of the quality panel.
_EVAL_SPEED = ("runtime", "samples_per_second", "steps_per_second")

def _eval_loss(key: str) -> bool:
    """eval_loss, or a named evaluation set's (eval_<set>_loss)."""
    return key.startswith("eval_") and key.endswith("_loss")


# (panel title, y label, predicate on the Trainer-style key)
PANELS: tuple = (
    ("Loss", "loss", lambda k: k == "loss" or _eval_loss(k)),
    ("Evaluation metrics", "value",
     lambda k: k.startswith("eval_") and not _eval_loss(k) and not k.endswith(_EVAL_SPEED)),
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
