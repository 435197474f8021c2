"""The W&B and TensorBoard sinks: metric names, init arguments, hparams, and starting Accelerate's trackers.

The writers are Accelerate's tracker classes (accelerate.tracking), started here rather than through
Accelerator(log_with=...) so that the run id and the W&B init arguments stay under our control.
Everything user-supplied that reaches a tracker (config, run name, tags, group) passes through
scaletune.secrets first: W&B uploads it, and TensorBoard event files get copied around.
"""

from __future__ import annotations

import uuid
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Mapping, Optional

from ..metric_names import split_of
from ..secrets import redact_values, secret_values

DEFAULT_WANDB_PROJECT = "scaletune"
# The exported model among output_dir's files (save_pretrained, the tokenizer, the card, a LoRA adapter folder);
# the run's own files (logs, checkpoints, tracker stores) are not part of it.
MODEL_FILE_PATTERNS = ("*.safetensors", "config.json", "generation_config.json", "README.md", "tokenizer*",
                       "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
                       "chat_template.jinja", "preprocessor_config.json", "adapter")


def tracker_key(name: str) -> str:
    """Trainer-style metric name -> tracker name, as transformers' `rewrite_logs` (eval_loss -> eval/loss)."""
    split = split_of(name)
    return f"{split}/{name[len(split) + 1:]}" if split else f"train/{name}"


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
    from the checkpoint) continues it. Secret values from `env` are redacted from what W&B displays (name, tags,
    group, config); project, entity and dir are addresses and are passed as given.
    """
    t = training_args
    secrets = secret_values(env)
    return {
        "project": t.wandb_project or env.get("WANDB_PROJECT") or DEFAULT_WANDB_PROJECT,
        "entity": t.wandb_entity or env.get("WANDB_ENTITY") or None,
        "group": redact_values(t.wandb_group or env.get("WANDB_RUN_GROUP") or None, secrets),
        "tags": redact_values(_split_tags(t.wandb_tags) or _split_tags(env.get("WANDB_TAGS")), secrets),
        "name": redact_values(resolve_run_name(t, env), secrets),
        "id": run_id,
        "resume": "allow",
        "dir": env.get("WANDB_DIR") or t.output_dir,
        "config": redact_values(config, secrets),
        # Our own run object, never wandb's global one: a user's surrounding run (or a previous run() in the
        # same process) is left alone.
        "reinit": "create_new",
    }


def new_run_id(env: Mapping[str, str], report_to) -> str:
    """A fresh run id: $WANDB_RUN_ID when W&B is on and the user set one, else 8 random [0-9a-z] like W&B's."""
    if "wandb" in (report_to or ()) and env.get("WANDB_RUN_ID"):
        return env["WANDB_RUN_ID"]
    return uuid.uuid4().hex[:8]


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict:
    """Nested mappings (a DeepSpeed dict, eval sets) as dotted keys, so each value is one param (MLflow)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, Mapping) and v:
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def model_files(output_dir) -> list[Path]:
    """The exported model's files and folders in output_dir (what log_model_artifact uploads)."""
    return sorted(p for p in Path(output_dir).iterdir() if any(fnmatchcase(p.name, pat) for pat in MODEL_FILE_PATTERNS))


def hparams_for_tensorboard(config: Mapping[str, Any]) -> dict:
    """TensorBoard hparams accept only scalars and strings (MLflow params take the same rule, as strings)."""
    out = {}
    for k, v in config.items():
        if v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = ",".join(map(str, v))
        else:
            out[k] = str(v)
    return out


def start_wandb(training_args, config: dict, run_id: str, env: Mapping[str, str]):
    """A started accelerate WandBTracker; `tracker.run.id` is the id W&B actually uses."""
    from accelerate.tracking import WandBTracker

    kwargs = wandb_init_kwargs(training_args, config, run_id, env)
    Path(kwargs["dir"]).mkdir(parents=True, exist_ok=True)
    project = kwargs.pop("project")
    tracker = WandBTracker(project, **kwargs)  # accelerate passes its first argument as the project
    try:
        tracker.start()
    except Exception as e:  # wandb raises its own UsageError/CommError types
        # The cause's text may quote a rejected key; it is shown redacted, and not chained into the traceback.
        cause = redact_values(f"{type(e).__name__}: {e}", secret_values(env))
        raise RuntimeError(
            f"W&B could not start ({cause}). Log in with `wandb login` or set WANDB_API_KEY; or run without a "
            "network with WANDB_MODE=offline (sync later with `wandb sync`); or drop wandb from report_to."
        ) from None
    return tracker


def start_tensorboard(run_name: str, logging_dir: str, config: Mapping[str, Any], env: Mapping[str, str]):
    """A started accelerate TensorBoardTracker writing under logging_dir/run_name, hparams stored (redacted)."""
    from accelerate.tracking import TensorBoardTracker

    tracker = TensorBoardTracker(run_name, logging_dir)
    tracker.start()
    tracker.store_init_configuration(redact_values(hparams_for_tensorboard(config), secret_values(env)))
    return tracker


def wandb_summary(summary: Mapping[str, Any]) -> dict:
    """The end-of-run summary for W&B's run summary: final metrics under tracker keys, the rest as scalars."""
    out = {}
    for k, v in summary.items():
        if v is None:
            continue
        if split_of(k):
            out[tracker_key(k)] = v
        else:
            out[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def wandb_location(run) -> str:
    """Where to find the W&B run: its URL, or for an offline run the folder to `wandb sync`."""
    if run.offline:
        return f"{Path(run.dir).parent}  (offline: `wandb sync` it to upload)"
    return run.url or run.dir
