"""Tracker checks that run before any model is loaded: packages installed, W&B logged in, MLflow server reachable.

Standard library only (no wandb, no torch): train.preflight calls this in the first second of a run, so a
missing login fails there instead of after model loading, or on SLURM after the allocation was granted.
W&B's own lookup order is mirrored (wandb/sdk/lib/wbauth): WANDB_API_KEY or WANDB_IDENTITY_TOKEN_FILE, then
the netrc file ($NETRC, else ~/.netrc, else ~/_netrc) entry for the host of WANDB_BASE_URL.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping, Optional
from urllib.parse import urlsplit

from ..errors import ConfigError

# report_to name -> (module, pip package); the scaletune extra that installs it.
TRACKER_PACKAGES = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboard", "tensorboard"),
                    "trackio": ("trackio", "trackio"), "mlflow": ("mlflow", "mlflow-skinny")}
TRACKER_EXTRAS = {"wandb": "tracking", "tensorboard": "tracking", "trackio": "trackio", "mlflow": "mlflow"}
# Seconds the MLflow server check waits: long enough for a busy server, short enough to fail in seconds.
MLFLOW_CHECK_TIMEOUT = 5.0
DEFAULT_WANDB_BASE_URL = "https://api.wandb.ai"
# Modes in which wandb.init never contacts the server, so no credentials are needed.
WANDB_LOCAL_MODES = frozenset({"offline", "disabled", "dryrun"})


def check_report_to(report_to, env: Optional[Mapping[str, str]] = None, netrc_path=None) -> None:
    """Fail before any model is loaded when a requested tracker's package is missing or W&B has no login.

    `env` defaults to os.environ; `netrc_path` to the file W&B itself would read.
    """
    env = os.environ if env is None else env
    for name in report_to or ():
        module, pip_name = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"report_to includes {name!r} but the {module!r} package is not installed: "
                f"pip install {pip_name} (or pip install 'scaletune[{TRACKER_EXTRAS[name]}]'), or drop {name} from "
                "report_to."
            )
    if "wandb" in (report_to or ()) and not wandb_credentials_found(env, netrc_path):
        path = resolve_netrc_path(env) if netrc_path is None else Path(netrc_path)
        raise ConfigError(
            f"report_to includes 'wandb' but W&B has no login for {wandb_host(env)} (WANDB_API_KEY is unset and "
            f"{path} has no entry for it): run `wandb login`, or set WANDB_API_KEY=..., or set WANDB_MODE=offline "
            "(upload later with `wandb sync`), or drop wandb from report_to."
        )
    if "mlflow" in (report_to or ()):
        check_mlflow_server(env)


def check_mlflow_server(env: Mapping[str, str], timeout: float = MLFLOW_CHECK_TIMEOUT) -> None:
    """An http(s) MLFLOW_TRACKING_URI must answer (any HTTP status counts: a 401 is a server that is up); the
    MLflow client itself would retry for minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES) after the model loaded."""
    uri = env.get("MLFLOW_TRACKING_URI", "")
    if urlsplit(uri).scheme not in ("http", "https"):
        return  # a file store, or a database/Databricks URI whose client fails at start with its own message
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as e:  # URLError, refused, timeout, a malformed host
        reason = getattr(e, "reason", e)
        parts = urlsplit(uri)
        shown = parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl()  # never print user:password@
        raise ConfigError(
            f"report_to includes 'mlflow' but the MLflow server at MLFLOW_TRACKING_URI={shown} does not answer "
            f"({reason}): start it (`mlflow server`), fix MLFLOW_TRACKING_URI, or unset it to log to a file store "
            "in output_dir/mlruns, or drop mlflow from report_to."
        ) from None


def wandb_credentials_found(env: Mapping[str, str], netrc_path=None) -> bool:
    """True when wandb.init will not stop to ask for a login: a local mode, an API key, or a netrc entry."""
    if env.get("WANDB_MODE", "").strip().lower() in WANDB_LOCAL_MODES:
        return True
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = resolve_netrc_path(env) if netrc_path is None else Path(netrc_path)
    return netrc_has_key(path, wandb_host(env))


def wandb_host(env: Mapping[str, str]) -> str:
    """The netrc machine name W&B uses: host[:port] of WANDB_BASE_URL."""
    return urlsplit(env.get("WANDB_BASE_URL") or DEFAULT_WANDB_BASE_URL).netloc


def resolve_netrc_path(env: Mapping[str, str]) -> Path:
    if env.get("NETRC"):
        return Path(env["NETRC"]).expanduser()
    unix, windows = Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()
    return windows if not unix.exists() and windows.exists() else unix


def netrc_has_key(path: Path, host: str) -> bool:
    if not host:
        return False
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        # Missing or unreadable: W&B would find no key there either (it warns and asks for a login).
        return False
    return bool(entry and entry[2])  # W&B stores the API key as the password
