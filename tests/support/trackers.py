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
