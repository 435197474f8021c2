"""The end of a search (`python -m scaletune.search`): the trials table (printed and output_dir/trials.md), the
best trial's config as a ready-to-run YAML (output_dir/best.yaml) and Optuna's history and importance plots."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from .disk import write_text_atomically
from .trial_pruning import PRUNED_AT


def trials_table(trials: list, metric: str) -> str:
    """A Markdown table: one row per trial (number, state, the metric, the step it was pruned at, its values)."""
    keys = sorted({k for t in trials for k in t.params})
    rows = [["trial", "state", metric, "pruned at step", *keys, "folder"]]
    for t in sorted(trials, key=lambda t: t.number):
        rows.append([str(t.number), t.state.name.lower(), "" if t.value is None else f"{t.value:.6g}",
                     str(t.user_attrs.get(PRUNED_AT, "")), *(_cell(t.params.get(k)) for k in keys),
                     f"trial-{t.number}"])
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    return "" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def best_config(base: Mapping[str, Any], params: Mapping[str, Any], output_dir: Path) -> dict:
    """The base config with the best trial's values, writing to output_dir/best (not over a trial's folder)."""
    return {**base, **params, "output_dir": str(Path(output_dir) / "best")}


def best_trial(study) -> Optional[Any]:
    """The best complete trial, or None when none completed (all pruned or failed)."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return study.best_trial if complete else None


def write_report(study, out: Path, metric: str, base: Mapping[str, Any]) -> None:
    table = trials_table(study.get_trials(deepcopy=False), metric)
    write_text_atomically(out / "trials.md", table)
    print(table, flush=True)
    best = best_trial(study)
    if best is None:
        print("scaletune.search: no trial completed (all pruned or failed): no best.yaml.", file=sys.stderr)
        return
    write_text_atomically(out / "best.yaml", yaml.safe_dump(best_config(base, best.params, out), sort_keys=False))
    print(f"scaletune.search: best trial {best.number}: {metric}={best.value:.6g}; its config: {out / 'best.yaml'} "
          f"(python -m scaletune.train {out / 'best.yaml'})", flush=True)
    write_plots(study, out)


def write_plots(study, out: Path) -> list[Path]:
    """Optuna's optimization history and parameter importances as PNGs (importances need two complete trials)."""
    import warnings

    import matplotlib
    from optuna.exceptions import ExperimentalWarning

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as plots

    written = []
    for name, plot in (("history", plots.plot_optimization_history), ("importance", plots.plot_param_importances)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)  # their interface, not the user's business
                axes = plot(study)
        except (ValueError, RuntimeError) as e:  # too few complete trials for importances: said, not fatal
            print(f"scaletune.search: no {name} plot: {str(e).splitlines()[0]}", file=sys.stderr)
            continue
        path = out / f"{name}.png"
        axes.figure.savefig(path, bbox_inches="tight")
        plt.close(axes.figure)
        written.append(path)
    return written
