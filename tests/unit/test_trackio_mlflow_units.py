"""Trackio and MLflow sinks without training: params, the preflight one-liners, and a RunTracker that logs to
both real (offline) stores and continues the same runs on resume. The training runs that log through them are in
tests/e2e/test_preemption.py (two processes, SIGUSR1, relaunched) and tests/e2e/test_tracking_runs.py.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from scaletune import tracking as tr
from scaletune.errors import ConfigError
from scaletune.tracking import mlflow_sink, preflight
from support.trackers import assert_series_match_jsonl, read_mlflow, read_trackio

SECRET = "sk-unit-" + "9" * 24


def make_cfg(tmp_path, **overrides):
    from scaletune.config import load_config

    values = {"train_file": str(tmp_path / "unused.csv"), "output_dir": str(tmp_path / "out"),
              "run_name": "unit-run", "report_to": "none", "disable_tqdm": True}
    values.update(overrides)
    return load_config(values)


def test_mlflow_params_are_flat_redacted_strings_within_mlflows_limits():
    config = {"lr": 1e-3, "report_to": ["trackio", "mlflow"], "none": None, "flag": True,
              "deepspeed": {"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}},
              "run_name": f"exp-{SECRET}", "long": "y" * 7000, "k" * 300: 1}
    params = mlflow_sink.mlflow_params(config, (SECRET,))
    assert params["lr"] == "0.001" and params["report_to"] == "trackio,mlflow"
    assert params["none"] == "" and params["flag"] == "True"
    assert params["deepspeed.zero_optimization.stage"] == "2" and params["deepspeed.bf16.enabled"] == "auto"
    assert params["run_name"] == "exp-***" and SECRET not in str(params)
    assert len(params["long"]) == mlflow_sink.MAX_PARAM_VALUE and params["long"].endswith("(truncated)")
    assert "k" * mlflow_sink.MAX_PARAM_KEY in params and all(len(k) <= mlflow_sink.MAX_PARAM_KEY for k in params)


def test_stores_default_to_the_output_dir_and_follow_the_environment(tmp_path):
    t = make_cfg(tmp_path).training
    assert tr.trackio_dir(t, {}) == (tmp_path / "out" / "trackio").resolve()
    assert str(tr.trackio_dir(t, {"TRACKIO_DIR": "/shared/trackio"})) == "/shared/trackio"
    assert tr.mlflow_tracking_uri(t, {}) == (tmp_path / "out" / "mlruns").resolve().as_uri()
    assert tr.mlflow_tracking_uri(t, {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}) == "http://mlflow:5000"


@pytest.mark.parametrize("name, pip_name, extra", [("trackio", "trackio", "trackio"),
                                                   ("mlflow", "mlflow-skinny", "mlflow")])
def test_missing_tracker_package_is_one_line(monkeypatch, name, pip_name, extra):
    monkeypatch.setitem(tr.TRACKER_PACKAGES, name, (f"{name}_not_installed_here", pip_name))
    with pytest.raises(ConfigError) as err:
        tr.check_report_to([name], env={})
    text = str(err.value)
    assert f"pip install {pip_name}" in text and f"scaletune[{extra}]" in text and "\n" not in text


def test_unreachable_mlflow_server_is_one_line_in_seconds():
    with socket.socket() as s:  # a port nobody listens on: bound, then closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for uri in (f"http://127.0.0.1:{port}", "http://user:hunter2secret@127.0.0.1:1"):
        start = time.monotonic()
        with pytest.raises(ConfigError, match="MLflow server .* does not answer") as err:
            tr.check_report_to(["mlflow"], env={"MLFLOW_TRACKING_URI": uri})
        assert time.monotonic() - start < 5 and "\n" not in str(err.value) and "hunter2" not in str(err.value)
    tr.check_report_to(["mlflow"], env={})  # the default file store needs no server
    tr.check_report_to(["mlflow"], env={"MLFLOW_TRACKING_URI": "file:///tmp/mlruns"})


def test_a_server_that_accepts_but_never_answers_cannot_hang_the_check():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()  # the kernel accepts the connection; nothing ever replies
        start = time.monotonic()
        with pytest.raises(ConfigError, match="does not answer"):
            preflight.check_mlflow_server({"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{server.getsockname()[1]}"},
                                          timeout=0.5)
        assert time.monotonic() - start < 3


def test_a_store_that_cannot_start_is_one_line(tmp_path, monkeypatch, accelerator):
    (tmp_path / "taken").write_text("a file where trackio's folder should go")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "taken"))
    with pytest.raises(ConfigError, match=r"report_to includes 'trackio' but it could not start \(FileExistsError") \
            as err:
        tr.RunTracker(make_cfg(tmp_path, report_to="trackio"), accelerator)
    assert "check TRACKIO_DIR" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow  # importing mlflow starts a process (platform.platform() runs `uname -p`)
def test_tracker_logs_to_trackio_and_mlflow_and_resumes_the_same_runs(tmp_path, monkeypatch, accelerator):
    """Offline: no connection leaves the machine (a socket guard records any attempt) and no Hub call."""
    monkeypatch.setenv("MY_SERVICE_TOKEN", SECRET)
    monkeypatch.delenv("TRACKIO_DIR", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = make_cfg(tmp_path, report_to="trackio,mlflow", run_name=f"unit-{SECRET}", log_model_artifact=True)
    out = tmp_path / "out"
    attempts = []
    connect = socket.socket.connect

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)

    first = tr.RunTracker(cfg, accelerator)
    for step in (1, 2, 3):
        first.log({"loss": 1.0 / step, "learning_rate": 1e-3, "note": "text is not a metric"}, step)
    first.log({"eval_loss": 0.7, "eval_accuracy": 0.5, "epoch": 0.3}, 3)
    first.finish({"global_step": 3, "stop_reason": "preempted", "output_dir": str(out)})

    (out / "config.json").write_text("{}")  # an exported model's files, and a run file that is not one
    (out / "model.safetensors").write_bytes(b"\0" * 16)
    second = tr.RunTracker(cfg, accelerator, run_id=first.run_id, resume_step=3)  # the requeued attempt
    for step in (4, 5):
        second.log({"loss": 1.0 / step, "learning_rate": 1e-3}, step)
    second.finish({"global_step": 5, "model_dir": str(out), "output_dir": str(out)})

    assert attempts == []
    import mlflow.utils.validation as limits  # the limits mlflow_params writes down are MLflow's own

    assert (mlflow_sink.MAX_PARAM_VALUE, mlflow_sink.MAX_PARAM_KEY, mlflow_sink.MAX_PARAMS_PER_BATCH) == (
        limits.MAX_PARAM_VAL_LENGTH, limits.MAX_ENTITY_KEY_LENGTH, limits.MAX_PARAMS_TAGS_PER_BATCH)

    records = tr.read_jsonl(out / "metrics.jsonl")
    (name, series), = read_trackio(out / "trackio").items()  # one trackio run across both attempts
    assert name == f"unit-***-{first.run_id}"
    assert_series_match_jsonl(records, series)
    (run, history), = read_mlflow(out / "mlruns")  # one MLflow run, continued
    assert run.info.status == "FINISHED" and run.data.tags["scaletune.run_id"] == first.run_id
    assert run.info.run_name == "unit-***"
    assert_series_match_jsonl(records, history)
    assert run.data.params["learning_rate"] == str(cfg.training.learning_rate)
    assert run.data.params["run_name"] == "unit-***" and SECRET not in str(run.data.params)
    artifacts = sorted(p.name for p in (out / "mlruns").rglob("artifacts/model/*"))
    assert artifacts == ["config.json", "model.safetensors"]  # metrics.jsonl is the run's, not the model's
    import sqlite3

    with sqlite3.connect(out / "trackio" / "scaletune.db") as con:
        assert con.execute("SELECT type FROM artifacts").fetchall() == [("model",)]
        (config,), = con.execute("SELECT config FROM configs").fetchall()
    config = json.loads(config)  # a JSON blob
    assert config["run_name"] == "unit-***" and config["learning_rate"] == cfg.training.learning_rate

    # trackio read its folder when first imported: a later run in this process with another output_dir still
    # writes into its own.
    other = tr.RunTracker(make_cfg(tmp_path, output_dir=str(tmp_path / "other"), report_to="trackio"), accelerator)
    other.log({"loss": 0.5}, 1)
    other.finish({"global_step": 1, "output_dir": str(tmp_path / "other")})
    (series,) = read_trackio(tmp_path / "other" / "trackio").values()
    assert series == {"train/loss": [(1, 0.5)]}
    assert len(read_trackio(out / "trackio")) == 1  # the first store is left as it was
