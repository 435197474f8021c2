"""The MLflow sink: a file store under output_dir by default, or the user's $MLFLOW_TRACKING_URI.

Written with an explicit `MlflowClient` rather than mlflow's fluent API (or accelerate's MLflowTracker, which
uses it): the fluent API keeps a process-global active run, which a user's own surrounding run (or a previous
run() in the same process) would collide with, as wandb's global run would (sinks.py passes reinit there).

Resume: MLflow makes its own run ids, so the run is found again by the tag `scaletune.run_id` (the tracker run
id kept in every checkpoint): a requeued attempt continues the same MLflow run, steps continuing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

from ..secrets import redact_values, secret_values
from .sinks import flat_config, hparams_for_tensorboard

DEFAULT_MLFLOW_EXPERIMENT = "scaletune"
RUN_ID_TAG = "scaletune.run_id"
MODEL_ARTIFACT_PATH = "model"
# mlflow.utils.validation's limits, written here so that mlflow_params needs no mlflow import (unit tests, and
# the values are MLflow's documented ones: 6000 characters per value, 250 per key, 100 per batch).
MAX_PARAM_VALUE = 6000
MAX_PARAM_KEY = 250
MAX_PARAMS_PER_BATCH = 100
TRUNCATED = "...(truncated)"


def mlflow_tracking_uri(training_args, env: Mapping[str, str]) -> str:
    """$MLFLOW_TRACKING_URI when set, else a file store in output_dir/mlruns (offline, next to the run)."""
    return env.get("MLFLOW_TRACKING_URI") or (Path(training_args.output_dir).resolve() / "mlruns").as_uri()


def is_file_store(uri: str) -> bool:
    return uri.startswith("file:") or ("://" not in uri and not uri.startswith(("databricks", "sqlite", "postgres")))


def mlflow_params(config: Mapping[str, Any], secrets) -> dict[str, str]:
    """The config as MLflow params: flattened (`a.b`), secret values redacted, each value a string of at most
    MAX_PARAM_VALUE characters (a longer one is cut and marked, never dropped), keys within MAX_PARAM_KEY."""
    out = {}
    for key, value in hparams_for_tensorboard(flat_config(redact_values(dict(config), secrets))).items():
        text = "" if value is None else str(value)
        if len(text) > MAX_PARAM_VALUE:
            text = text[:MAX_PARAM_VALUE - len(TRUNCATED)] + TRUNCATED
        out[key[:MAX_PARAM_KEY]] = text
    return out


class MlflowSink:
    """One MLflow run: log(values, step), log_model(paths), finish(preempted)."""

    def __init__(self, client, run_id: str, uri: str):
        self.client, self.mlflow_run_id, self.uri = client, run_id, uri

    def log(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(step)) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's per-batch metric limit
            self.client.log_batch(self.mlflow_run_id, metrics=metrics[i:i + 1000])

    def log_model(self, paths) -> None:
        for p in paths:
            if p.is_dir():
                self.client.log_artifacts(self.mlflow_run_id, str(p), artifact_path=f"{MODEL_ARTIFACT_PATH}/{p.name}")
            else:
                self.client.log_artifact(self.mlflow_run_id, str(p), artifact_path=MODEL_ARTIFACT_PATH)

    def finish(self, preempted: bool = False) -> None:
        # A preempted attempt is KILLED; the requeued attempt sets the same run RUNNING again.
        self.client.set_terminated(self.mlflow_run_id, status="KILLED" if preempted else "FINISHED")

    def location(self) -> str:
        return f"{self.uri}  (MLflow run {self.mlflow_run_id})"


def start_mlflow(training_args, config: Mapping[str, Any], run_id: str, run_name: str,
                 env: Mapping[str, str]) -> MlflowSink:
    """Create (or, with the same tracker run id, continue) the MLflow run and log the config as params."""
    uri = mlflow_tracking_uri(training_args, env)
    if is_file_store(uri):
        # MLflow 3 refuses its file store unless opted in; a file store is what offline use needs.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    # MLflow starts a usage-telemetry sender (to mlflow.org) when imported: off unless the user set it.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if uri.startswith(("http://", "https://")):
        # MLflow's defaults (7 retries with backoff, 120 s per request) would stall a step for many minutes on a
        # server that went away mid-run; with these the log call fails within a minute, RunTracker drops the
        # sink with a warning and training goes on (metrics.jsonl keeps everything). The user's values win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    from mlflow.tracking import MlflowClient

    secrets = secret_values(env)
    client = MlflowClient(tracking_uri=uri)
    name = env.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_MLFLOW_EXPERIMENT
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'", max_results=1)
    if found:
        run = found[0]
        client.update_run(run.info.run_id, status="RUNNING")
    else:
        run = client.create_run(experiment_id, run_name=run_name, tags={RUN_ID_TAG: run_id})
    # Params are immutable in MLflow (logging a changed value fails): a resumed run adds only those it lacks; a
    # value the resume changed (gradient_accumulation_steps on another process count) is in that attempt's
    # output_dir/config.yaml.
    have = run.data.params if found else {}
    from mlflow.entities import Param

    params = [Param(k, v) for k, v in mlflow_params(config, secrets).items() if k not in have]
    for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
        client.log_batch(run.info.run_id, params=params[i:i + MAX_PARAMS_PER_BATCH])
    return MlflowSink(client, run.info.run_id, uri)

