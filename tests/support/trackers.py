"""Read-back checks for the trackers: every JSONL value must be in W&B and TensorBoard, at the same step.

W&B runs are real offline runs read with support/wandb_reader.py; TensorBoard files are read with tensorboard's
EventAccumulator.
"""

from __future__ import annotations

import pytest

from scaletune import tracking as tr


def read_tensorboard(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def jsonl_series(records) -> dict[str, dict[int, float]]:
    """{trainer key: {step: value}} straight from the JSONL records (later records win)."""
    out: dict = {}
    for rec in records:
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(k, {})[rec["step"]] = v
    return out


def assert_trackers_match_jsonl(records, wandb_runs, tb_scalars):
    """Every numeric JSONL value is in W&B and TensorBoard under the tracker key, at the same step, and nothing
    else was logged there."""
    expected = jsonl_series(records)
    wb_rows: dict[int, dict] = {}
    for run in wandb_runs:
        for row in run.history:
            wb_rows.setdefault(row["_step"], {}).update(row)
    wb_keys = set().union(*(run.keys() for run in wandb_runs))
    assert wb_keys == {tr.tracker_key(k) for k in expected}
    assert set(tb_scalars) == {tr.tracker_key(k) for k in expected}
    for key, by_step in expected.items():
        tkey = tr.tracker_key(key)
        tb = dict(tb_scalars[tkey])
        assert sorted(tb) == sorted(by_step), key
        for step, value in by_step.items():
            assert wb_rows[step][tkey] == pytest.approx(value, rel=1e-12), (key, step)
            assert tb[step] == pytest.approx(value, rel=1e-6), (key, step)  # TensorBoard stores float32


def read_trackio(store, project: str = "scaletune") -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{run name: {tracker key: [(step, value), ...] in logging order}} from trackio's SQLite project file."""
    import json
    import sqlite3

    con = sqlite3.connect(f"file:{store}/{project}.db?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT run_name, step, metrics FROM metrics ORDER BY id").fetchall()
    finally:
        con.close()
    out: dict = {}
    for name, step, metrics in rows:
        for k, v in json.loads(metrics).items():
            if not k.startswith("_"):  # trackio's own bookkeeping (timestamps)
                out.setdefault(name, {}).setdefault(k, []).append((step, v))
    return out


def read_mlflow(uri, experiment: str = "scaletune") -> list:
    """[(run, {tracker key: [(step, value), ...] in logging order})] for every run of the experiment."""
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # as scaletune's mlflow_sink does
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=str(uri))
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return [(run, {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                            key=lambda m: (m.timestamp, m.step))]
                   for key in run.data.metrics}) for run in runs]


def assert_series_match_jsonl(records, series, rel=1e-12):
    """One tracker's {tracker key: [(step, value)]} holds exactly the JSONL's numeric values: the same keys, the
    same steps, each value logged once per log call (train/loss once per step: no attempt logged a step twice)."""
    expected = jsonl_series(records)
    assert set(series) == {tr.tracker_key(k) for k in expected}
    for key, by_step in expected.items():
        got = series[tr.tracker_key(key)]
        assert sorted({s for s, _ in got}) == sorted(by_step), key
        for step, value in got:
            assert value == pytest.approx(by_step[step], rel=rel), (key, step)
    loss_steps = [s for s, _ in series[tr.tracker_key("loss")]]
    assert loss_steps == sorted(set(loss_steps)) == sorted(expected["loss"])
