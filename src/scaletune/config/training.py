"""The training argument group: steps, cadence, optimisation, checkpoints, precision, tracking, reliability.

Attribute docstrings are the documentation (`reference.py` reads them from this file's source); choices live in
their Literal alone (validation, the reference and `--help` read them with typing.get_args).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, Optional, Union

from ..errors import ConfigError
from ..metric_names import bare_name, best_metric
from .checks import check_types
from .checks import number_text as _num
from .checks import require as _require
from .checks import suggestion

Strategy = Literal["no", "steps", "epoch"]
NonFinitePolicy = Literal["stop", "skip"]
SchedulerType = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                        "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                        "warmup_stable_decay"]
OptimizerName = Literal["adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop"]
LoggingStrategy = Literal["no", "steps", "epoch"]
SamplingStrategy = Literal["random", "group_by_length"]
TRACKERS = ("wandb", "tensorboard", "trackio", "mlflow")
# Metrics where smaller is better besides `*loss` (Trainer's only rule, which would keep the worst regression
# or language model: its default for `mse` is greater_is_better=True).
LOWER_IS_BETTER = ("mse", "rmse", "mae", "perplexity")


def lower_is_better(metric: str) -> bool:
    name = bare_name(metric)
    # Suffixes, so a named evaluation set's metric (eval_<set>_rmse) reads as its metric does.
    return name.endswith("loss") or any(name == m or name.endswith("_" + m) for m in LOWER_IS_BETTER)


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
    auto_find_batch_size: bool = False
    """Before training, find the largest micro-batch that fits in memory (Trainer's name): on out-of-memory the
    per-device train batch halves and gradient_accumulation_steps doubles, so the global batch, the schedule and
    the losses stay the same; the eval batch halves too. Every process takes the same size. The chosen sizes
    are logged, written to config.yaml and reused on resume without a new search."""
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
    """float16 mixed precision with loss scaling. Needs a GPU (or DeepSpeed): on CPU, where it would train in
    fp32, it is refused; use `bf16`, which runs bf16 autocast on CPU."""
    resume_from_checkpoint: Optional[str] = None
    """`latest` (highest complete checkpoint in output_dir; fresh start if none) or a checkpoint path."""
    trust_checkpoint: bool = False
    """Allow resuming a DeepSpeed checkpoint from outside this run's output_dir. DeepSpeed's loader unpickles
    (`torch.load(weights_only=False)`), so a checkpoint from an untrusted source could run code; checkpoints the
    run wrote itself are trusted."""
    report_to: Union[str, list] = "none"
    """Trackers: `wandb`, `tensorboard`, `trackio`, `mlflow`, `none`, or several (`wandb,tensorboard`). Trackio
    writes a local project in $TRACKIO_DIR (default output_dir/trackio; project $TRACKIO_PROJECT, else
    `scaletune`); MLflow logs to $MLFLOW_TRACKING_URI (default a file store in output_dir/mlruns; experiment
    $MLFLOW_EXPERIMENT_NAME, else `scaletune`). Both offline unless their variables point at a server."""
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
    log_model_artifact: bool = False
    """Log the exported model (weights, config, tokenizer, card) as an artifact of the MLflow and Trackio runs
    at the end of a finished run (W&B and TensorBoard get none)."""
    disable_tqdm: bool = False
    """No progress bar."""
    plot_curves: bool = True
    """Draw output_dir/curves.png (loss, learning rate, grad norm, evaluations) from metrics.jsonl at the end.
    `false` skips it and matplotlib (about 1 s of CPU a run: a sweep's many short trials, a test suite's runs)."""
    dataloader_num_workers: Optional[int] = None
    """Worker processes per dataloader (0: load in the training process). Unset: on a GPU, the CPUs this process
    may use (its affinity: Slurm's allocation) divided by the processes on its node, less one, at most 4; 0 on
    CPU, or with run()'s data_collator. Workers change no loss: the order is decided in the training process,
    and a run with workers equals one without, and resumes exactly."""
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
    """Compile the training step (forward and loss) with torch.compile; evaluation stays eager. Under DeepSpeed
    and FSDP2, accelerate compiles the model instead."""
    torch_compile_mode: Optional[str] = None
    """torch.compile mode (`default`, `reduce-overhead`, `max-autotune`); implies torch_compile."""
    use_liger_kernel: bool = False
    """Liger Kernel (Trainer's name; `pip install scaletune[liger]`, CUDA only), task clm: liger's kernels for the
    model's architecture (llama, mistral, qwen2, gemma, ...), among them fused linear cross-entropy, so training
    never materialises the vocabulary logits. Refused without a GPU, the package or a supported architecture."""
    tf32: Optional[bool] = None
    """TF32 matmuls (None: on for an Ampere or newer GPU, torch's default elsewhere). True without such a GPU is
    an error."""
    save_in_background: bool = True
    """Write checkpoints in a background thread (DDP and single process): training stalls only while the state
    is copied to host memory (kept for the run, so each save is a plain copy); the checkpoint is complete
    (renamed from .partial) once every process's files are on disk, at the latest before the next save.
    DeepSpeed, FSDP and LoRA checkpoints are written synchronously."""
    save_only_model: bool = False
    """Checkpoints hold the model only (no optimizer, scheduler or RNG state): smaller, but they cannot be
    resumed from (the best-model reload works)."""
    eval_accumulation_steps: Optional[int] = None
    """Move gathered evaluation outputs to the CPU every N batches (None or 1: every batch, which keeps device
    memory flat; larger N means fewer transfers)."""
    ddp_find_unused_parameters: Optional[bool] = None
    """DDP's find_unused_parameters (None: false, as Trainer for models without unused parameters)."""
    on_nonfinite: NonFinitePolicy = "stop"
    """A NaN/inf loss or gradient norm (on any rank): `stop` ends the run at the next logging step, evaluation or
    save (the flag stays on the device until then: no host sync per update), naming the step, keeping the last
    good checkpoint; `skip` drops that update (deciding costs one host sync per update) and stops after
    max_skipped_updates. (fp16 overflow is the grad scaler's business and not counted.)"""
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
            self.metric_for_best_model = best_metric(None)
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
                raise ConfigError(f"report_to contains {tracker!r}; use {', '.join(TRACKERS)} or none."
                                  f"{suggestion(tracker, (*TRACKERS, 'none'))}")

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
        if self.use_liger_kernel and self.label_smoothing_factor:
            raise ConfigError("use_liger_kernel=true computes the loss in liger's fused kernel, which scaletune "
                              "runs without label smoothing: set label_smoothing_factor=0 or use_liger_kernel=false.")
        _require(self, "learning_rate", self.learning_rate > 0, "> 0")
        _require(self, "adam_epsilon", self.adam_epsilon > 0, "> 0")
        _require(self, "max_skipped_updates", self.max_skipped_updates >= 0, ">= 0")
        _require(self, "ddp_timeout", self.ddp_timeout >= 1, ">= 1 (seconds)")
        for name in ("weight_decay", "max_grad_norm", "eval_delay", "early_stopping_threshold",
                     "dataloader_num_workers"):
            _require(self, name, getattr(self, name) is None or getattr(self, name) >= 0, ">= 0")
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
