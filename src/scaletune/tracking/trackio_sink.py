"""The Trackio sink: a local SQLite project in output_dir/trackio (or $TRACKIO_DIR), offline, no dashboard.

Trackio writes to Hugging Face Spaces or a self-hosted server only when asked ($TRACKIO_SPACE_ID,
$TRACKIO_SERVER_URL: trackio.init reads them itself); scaletune passes no space, no server and embed=False, and
turns off trackio's background CPU/GPU samplers (system metrics are in scaletune's own throughput keys).

Resume: trackio finds a run by name, so the run is named `<run_name>-<tracker run id>` and started with
resume="allow": the first attempt creates it, a requeued attempt (same id, from the checkpoint) continues it.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping

from ..secrets import redact_values, secret_values

DEFAULT_TRACKIO_PROJECT = "scaletune"
MODEL_ARTIFACT_TYPE = "model"


def trackio_dir(training_args, env: Mapping[str, str]) -> Path:
    """$TRACKIO_DIR when set, else output_dir/trackio (trackio's own default, ~/.cache/huggingface/trackio, would
    mix every run on the machine and is not on a cluster's shared file system)."""
    return Path(env.get("TRACKIO_DIR") or Path(training_args.output_dir).resolve() / "trackio")


def trackio_run_name(run_name: str, run_id: str) -> str:
    return f"{run_name}-{run_id}"


def _import_trackio_at(store: Path):
    """trackio binds its folder at import ($TRACKIO_DIR read once into module globals, then copied by name into
    several modules), so the variable is set for the first import, and a later run in the same process with
    another output_dir re-points those globals."""
    if "trackio" not in sys.modules:
        previous = os.environ.get("TRACKIO_DIR")
        os.environ["TRACKIO_DIR"] = str(store)
        try:
            importlib.import_module("trackio")
        finally:
            if previous is None:
                os.environ.pop("TRACKIO_DIR", None)
            else:
                os.environ["TRACKIO_DIR"] = previous
    import trackio
    from trackio import utils

    if Path(utils.TRACKIO_DIR) != store:
        old = {name: Path(getattr(utils, name)) for name in ("TRACKIO_DIR", "MEDIA_DIR", "ARTIFACTS_DIR")}
        new = {"TRACKIO_DIR": store, "MEDIA_DIR": store / "media", "ARTIFACTS_DIR": store / "artifacts"}
        for module in [m for n, m in list(sys.modules.items()) if n == "trackio" or n.startswith("trackio.")]:
            for name, value in old.items():
                if getattr(module, name, None) == value:
                    setattr(module, name, new[name])
    return trackio


class TrackioSink:
    """One trackio run: log(values, step), log_model(paths), finish(preempted)."""

    def __init__(self, run, store: Path, project: str):
        self.run, self.store, self.project = run, store, project

    def log(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=int(step))

    def log_model(self, paths) -> None:
        from trackio import Artifact

        # trackio allows only [A-Za-z0-9._-] in artifact names (a run name may hold spaces or a redacted `***`).
        artifact = Artifact(name=re.sub(r"[^A-Za-z0-9._-]", "_", f"model-{self.run.name}"), type=MODEL_ARTIFACT_TYPE)
        for p in paths:
            (artifact.add_dir if p.is_dir() else artifact.add_file)(p, name=p.name)
        self.run.log_artifact(artifact)

    def finish(self, preempted: bool = False) -> None:
        from trackio import context_vars

        self.run.finish()
        # trackio.init made this the current run; cleared so that trackio's exit hook does not finish it twice.
        if context_vars.current_run.get() is self.run:
            context_vars.current_run.set(None)

    def location(self) -> str:
        return f"{self.store}  (project {self.project}, run {self.run.name}; `TRACKIO_DIR={self.store} trackio show`)"


def start_trackio(training_args, config: Mapping[str, Any], run_id: str, run_name: str,
                  env: Mapping[str, str]) -> TrackioSink:
    store = trackio_dir(training_args, env)
    store.mkdir(parents=True, exist_ok=True)
    trackio = _import_trackio_at(store)
    project = env.get("TRACKIO_PROJECT") or DEFAULT_TRACKIO_PROJECT
    run = trackio.init(project=project, name=trackio_run_name(run_name, run_id), resume="allow",
                       config=redact_values(dict(config), secret_values(env)), embed=False,
                       auto_log_gpu=False, auto_log_cpu=False)
    return TrackioSink(run, store, project)
