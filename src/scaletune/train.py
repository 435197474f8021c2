"""Entry point: `accelerate launch -m scaletune.train [CONFIG] [--key value ...]` and `run(config)`.

parse -> check (cheap, before torch work) -> build -> fit -> finish. Short on purpose: every step is a
call into a module that owns it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from .config import RESOLVED_SECTION, Config, ConfigError, ConfigSource, load_config
from .dropin import UserParts

if TYPE_CHECKING:
    from .evaluation import PredictionOutput
from .errors import NonFiniteError, ScaletuneError


@dataclass
class RunResult:
    """What `run` returns: final metrics, checkpoints left on disk, and Trainer's state fields."""

    metrics: dict
    checkpoints: list
    global_step: int
    best_metric: Optional[float]
    best_global_step: Optional[int]
    best_model_checkpoint: Optional[str]
    log_history: list
    stop_reason: str
    output_dir: str
    predictions_file: Optional[str] = None
    stop_signal: Optional[str] = None
    """The signal that preempted the run (SIGINT, SIGTERM, SIGUSR1), if one did."""
    requeued: bool = False
    """The preempted Slurm job requeued itself."""
    predictions: Optional[PredictionOutput] = None
    """The test split's (predictions, label_ids, metrics), as Trainer's `trainer.predict(test_dataset)`."""

    @property
    def exit_code(self) -> int:
        """0 unless preempted without a requeue: 130 after Ctrl-C, 143 after another signal (a job runner
        must not read success from a run that did not finish)."""
        if self.stop_reason != "preempted" or self.requeued:
            return 0
        return 130 if self.stop_signal == "SIGINT" else 143


def preflight(cfg: Config, user: Optional[UserParts] = None) -> Optional[Path]:
    """Checks that need no model or data loading: bad input fails in seconds, nothing is overwritten."""
    from . import checkpointer, data, lora
    from .distributed import deepspeed_requested
    from .model_source import check_sources
    from .schedule import metric_key
    from .tasks import get_task
    from .tracking import check_report_to

    t = cfg.training
    check_report_to(t.report_to)
    user = user or UserParts()
    if not user.brings_data and cfg.data.dataset_name is None and cfg.data.train_file is None and t.do_train:
        raise ConfigError("No training data: set dataset_name or train_file (or pass train_dataset to run()).")
    if t.metric_for_best_model and user.compute_metrics is None:  # a custom compute_metrics is only known later
        known = [f"eval_{m}" for m in get_task(cfg.data.task).metric_names]
        if metric_key(t.metric_for_best_model) not in known:
            raise ConfigError(f"metric_for_best_model={t.metric_for_best_model!r} is not an evaluation metric of "
                              f"the {cfg.data.task} task; choose one of {', '.join(known)}.")
    if t.on_nonfinite == "skip" and deepspeed_requested():
        raise ConfigError("on_nonfinite=skip is not possible under DeepSpeed, which applies the update inside "
                          "backward before the loss can be checked; use on_nonfinite=stop.")
    if t.use_liger_kernel and user.compute_loss_func is not None:
        raise ConfigError("use_liger_kernel=true computes the loss inside the model, so the compute_loss_func "
                          "passed to run() would not be used: drop one of them.")
    if user.model is not None and t.do_train and not cfg.peft.use_peft and not any(
            p.requires_grad for p in user.model.parameters()):
        raise ConfigError(f"The {type(user.model).__name__} passed to run() has no trainable parameters (all "
                          f"frozen), so training cannot change it: unfreeze some, or set do_train=false.")
    data.check_files(cfg)
    check_sources(cfg.model, needs_model=user.model is None)  # before the output dir is made
    lora.preflight(cfg)
    return checkpointer.preflight(t)


def effective_config(cfg: Config) -> dict:
    """The config as written to config.yaml and into checkpoints: every default spelled out, secrets masked."""
    from .secrets import redact

    return redact(cfg.to_dict())


def cpu_allocator_defaults() -> None:
    """Large CPU tensors on transparent huge pages (PyTorch's own `THP_MEM_ALLOC_ENABLE`), unless the
    environment already says. glibc gives every allocation over 32 MB a fresh mapping, so a tensor that size
    made anew each update costs a page fault per 4 KB: MiniLM's 47 MB word-embedding gradient takes 11,446
    faults per update, and its allocation and fill 21 ms instead of 5-6 ms on huge pages (benchmarks/RESULTS.md).
    PyTorch reads the variable once, at its first allocation: under `python -m scaletune.train` and the
    launchers that is after this; in a script that imported torch before calling `run()`, this does nothing."""
    if "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def run(args: ConfigSource = None, *, model=None, processing_class=None, train_dataset=None, eval_dataset=None,
        test_dataset=None, data_collator: Optional[Callable] = None, compute_metrics: Optional[Callable] = None,
        preprocess_logits_for_metrics: Optional[Callable] = None, compute_loss_func: Optional[Callable] = None,
        callbacks: Optional[list] = None, overrides: Optional[dict] = None) -> RunResult:
    """Train, evaluate, export and predict. Trainer's keyword names (see dropin.py):

    `args`: a config dict, a YAML/JSON path or recipe name, a CLI argument list, a Config, or a
    `transformers.TrainingArguments`. Everything else is optional and replaces what scaletune would build:
    `model` (any PreTrainedModel), `processing_class` (tokenizer), the datasets (`datasets.Dataset`, a torch
    Dataset of dicts, a list of dicts), `data_collator`, `compute_metrics` (Trainer's one-argument form or
    `(predictions, label_ids)`), `preprocess_logits_for_metrics`, `compute_loss_func(outputs, labels,
    num_items_in_batch)` and `callbacks` (EarlyStoppingCallback).
    """
    cpu_allocator_defaults()
    from . import dropin
    from .lock import release_lock

    user = dropin.UserParts(model=model, processing_class=processing_class, train_dataset=train_dataset,
                            eval_dataset=eval_dataset, test_dataset=test_dataset, data_collator=data_collator,
                            compute_metrics=dropin.metrics_function(compute_metrics),
                            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                            compute_loss_func=compute_loss_func)
    if type(args).__name__ == "TrainingArguments" or hasattr(args, "to_sanitized_dict"):
        args = dropin.config_from_training_arguments(args)
    if args is None and (user.brings_data or model is not None):
        args = {}  # the user's own objects: start from the defaults, not the demo recipe
    cfg = load_config(args, {**dropin.config_from_callbacks(callbacks), **(overrides or {})})
    if cfg.data.padding_free and data_collator is not None:
        raise ConfigError("padding_free=true flattens each batch with scaletune's collator, but run() was given a "
                          "data_collator, which would be used instead: pass one or the other.")
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart and cfg.training.resume_from_checkpoint is None:
        # `./launch --max_restarts N`: the elastic agent restarted the workers after a crash.
        if os.environ.get("RANK", "0") == "0":
            print(f"scaletune: restart {restart} after a failure; resuming from the latest checkpoint.",
                  file=sys.stderr)
        cfg.training.resume_from_checkpoint = "latest"
    try:
        return _run(cfg, preflight(cfg, user), user)
    finally:
        release_lock(Path(cfg.training.output_dir))
        if "scaletune.distributed" in sys.modules:
            sys.modules["scaletune.distributed"].release_world_group()
        if "scaletune.preemption" in sys.modules:
            sys.modules["scaletune.preemption"].PreemptionWatcher.uninstall_current()


def _run(cfg: Config, resume_path: Optional[Path], user: UserParts) -> RunResult:
    import yaml
    from accelerate.utils import set_seed

    from . import data, dropin, schedule
    from .checkpointer import Checkpointer, check_resume_compatible
    from . import lora
    from .distributed import build_accelerator, configure_model
    from .evaluation import Evaluator
    from .fast_path import apply_liger_kernel, build_step_loss, check_liger_kernel
    from .loop import Loop, fit
    from .losses import ComputeLossFunc
    from .model_source import check_hub_kernels, hub_kernels_off, load_tokenizer
    from .optim import METRIC_SCHEDULES, build_optimizer, build_scheduler, reapply_schedule
    from .preemption import PreemptionWatcher, requeue_if_slurm
    from .state import TrainingState
    from .stepper import Stepper, TrainData
    from .tasks import get_task
    from .throughput import ThroughputMeter
    from .tracking import RunTracker, quiet_other_ranks

    t, d, m = cfg.training, cfg.data, cfg.model
    accelerator = build_accelerator(cfg)
    set_tf32(t.tf32)
    check_liger_kernel(t)  # before the data and the model load
    check_fp16_autocast(accelerator)
    quiet_other_ranks(accelerator)
    watcher = PreemptionWatcher()
    watcher.install()  # early: a preemption during data loading stops after the first update, with a checkpoint
    set_seed(t.seed)
    task = get_task(d.task)
    tokenizer = user.processing_class
    if tokenizer is None and (user.model is None or not user.brings_data):
        # scaletune tokenizes the data: the config's tokenizer, or for the user's own model the one it was
        # loaded from (its config's name_or_path; the default model_name_or_path is not that model's).
        source = m.tokenizer_name or (m.model_name_or_path if user.model is None
                                      else getattr(getattr(user.model, "config", None), "_name_or_path", None))
        if not source:
            raise ConfigError("run(model=...) was given no processing_class, and the data must be tokenized: pass "
                              "processing_class=<tokenizer> or set tokenizer_name.")
        tokenizer = load_tokenizer(m, source)
    if user.brings_data:
        prepared = dropin.user_prepared_data(task, tokenizer, cfg, accelerator.main_process_first,
                                             user.train_dataset, user.eval_dataset, user.test_dataset,
                                             getattr(user.model, "config", None))
    else:
        raw = data.load_raw_datasets(cfg, streaming=d.streaming)
        prepared = task.prepare_data(raw, tokenizer, cfg, accelerator.main_process_first)
    workers, why = data.dataloader_workers(t, user_collator=user.data_collator is not None)
    if why:
        accelerator.print(f"scaletune: dataloader workers: {why}", flush=True)
    resolved = resolved_record(task, prepared, t, workers)
    if prepared.text_columns:  # which columns auto-detection chose is said before the work that uses them
        accelerator.print(f"scaletune: {task.name}: text columns {', '.join(prepared.text_columns)}"
                          + (f", label column {prepared.label_column}" if prepared.label_column else ""), flush=True)
    if resume_path is not None:
        check_resume_compatible(resume_path, effective_config(cfg), accelerator.num_processes)
    set_seed(t.seed)  # the head's init does not depend on how much randomness data loading used
    model = user.model if user.model is not None else task.build_model(cfg, prepared, tokenizer)
    if not m.use_hub_kernels:  # before anything calls train()/eval(), which would kernelize
        hub_kernels_off(model)
    if t.use_liger_kernel:  # before LoRA wraps it and accelerate prepares it
        apply_liger_kernel(model)
    if d.padding_free:  # before training: a model that would attend across the packed examples is refused
        from .tasks.clm import check_packed_attention

        check_packed_attention(model)
    model = configure_model(model, t)  # gradient checkpointing
    if cfg.peft.use_peft:  # LoRA adapters on the frozen pretrained model
        # The adapters' random init then depends on the seed only: loading under ZeRO-3 (zero.Init) draws
        # from the generator differently than a plain load, and every backend must start from the same adapter.
        set_seed(t.seed)
        model = lora.apply(model, cfg)
        accelerator.print(lora.trainable_summary(model))
    # Seeded again, as Trainer.__init__ does after the user built the model: the dropout stream then does not
    # depend on how much randomness a new head's init drew (tests/parity/test_parity_migration.py).
    set_seed(t.seed)

    def loader(split, training: bool, batch_size: int):
        collate = user.data_collator or dropin.default_collator(tokenizer, task, cfg, training)
        return data.build_dataloader(split, collate, batch_size, training, t, workers)

    train_dl = loader(prepared.train, True, t.per_device_train_batch_size) if t.do_train else None
    eval_dl = loader(prepared.validation, False, t.per_device_eval_batch_size) if prepared.validation else None
    test_dl = (loader(prepared.test, False, t.per_device_eval_batch_size)
               if prepared.test is not None and t.do_predict else None)
    if (t.eval_strategy != "no" or t.load_best_model_at_end) and eval_dl is None:
        raise ConfigError("Evaluation is on but there is no validation data: set validation_file or "
                          "validation_split_percentage > 0.")

    optimizer = build_optimizer(model, t)
    train_dl, eval_dl, test_dl = accelerator.prepare(train_dl, eval_dl, test_dl)
    plan = schedule.resolve_plan(t, len(train_dl) if train_dl is not None and hasattr(prepared.train, "__len__")
                                 else None) if t.do_train else None
    if plan is not None:
        schedule.check_best_model_cadence(t, plan)
    scheduler = build_scheduler(optimizer, t, plan) if plan else None
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if m.use_hub_kernels:  # on the training device, where the kernels are looked up
        check_hub_kernels(accelerator.unwrap_model(model))

    config_yaml = yaml.safe_dump(effective_config(cfg), sort_keys=False)
    checkpointer = Checkpointer(accelerator, t, model, tokenizer, config_yaml)
    meter = ThroughputMeter(model, accelerator)
    train_data = TrainData(train_dl, accelerator, t.gradient_accumulation_steps, meter) if t.do_train else None
    state = TrainingState(world_size=accelerator.num_processes)
    if resume_path is not None:
        state = checkpointer.load(resume_path)
        if train_data is not None:
            train_data.check_position(state)  # before anything is written: a refused resume changes nothing
        reapply_schedule(scheduler, t)
        accelerator.print(f"Resumed from {resume_path} at step {state.global_step}.", flush=True)
    elif t.overwrite_output_dir:
        checkpointer.start_fresh()
    tracker = RunTracker(cfg, accelerator, run_id=state.tracker_run_id,
                         resume_step=state.global_step if resume_path is not None else None)
    state.tracker_run_id = tracker.run_id
    if accelerator.is_main_process:
        # The config as given (a resume compares it, a new run can start from it), then what the run resolved.
        Path(t.output_dir, "config.yaml").write_text(
            config_yaml + "# What this run resolved from its data and machine: read by scaletune.predict,\n"
                          "# skipped when this file is read as a config.\n"
            + yaml.safe_dump({RESOLVED_SECTION: resolved}, sort_keys=False))

    loss = ComputeLossFunc(user.compute_loss_func) if user.compute_loss_func else task.loss(cfg)
    # One evaluator for validation and test: the same loss, metrics and logit reduction.
    evaluator = Evaluator(accelerator, model, eval_dl, task, loss, t, user.compute_metrics,
                          user.preprocess_logits_for_metrics)
    stop_reason = "no_training"
    if t.do_train:
        stepper = Stepper(accelerator, model, optimizer, scheduler, loss, meter, t.max_grad_norm,
                          schedule_metric=schedule.metric_key(t.metric_for_best_model or "loss")
                          if t.lr_scheduler_type in METRIC_SCHEDULES else None,
                          skip_nonfinite=t.on_nonfinite == "skip",
                          step_loss=build_step_loss(model, loss, t, accelerator.print))
        loop = Loop(args=t, data=train_data,
                    stepper=stepper, evaluator=evaluator if eval_dl is not None else None,
                    checkpointer=checkpointer, tracker=tracker, meter=meter, watcher=watcher)
        try:
            stop_reason = fit(loop, state, plan)
        except NonFiniteError:
            checkpointer.flush()  # a save in flight is of a good step: complete it (every rank agreed to stop)
            raise
        checkpointer.flush()
    if stop_reason == "preempted":
        accelerator.print(f"Preempted at step {state.global_step}; checkpoint written. Resume with "
                          f"--resume_from_checkpoint latest.")
        # Close the trackers before requeueing: Slurm answers a requeue with SIGTERM to every process of the
        # job. The requeued attempt continues the same W&B run (its id is in the checkpoint).
        tracker.finish({"global_step": state.global_step, "stop_reason": stop_reason, "output_dir": t.output_dir})
        requeued = requeue_if_slurm(accelerator)  # collective
        accelerator.end_training()
        return _result(cfg, state, checkpointer, {}, stop_reason, None, watcher.signal_name, requeued)
    watcher.training_over()  # a signal from here on finds no update to stop after: the run says it finishes
    metrics, predictions_file, test_output = finish(cfg, accelerator, state, checkpointer, evaluator, tracker, task,
                                                    test_dl, prepared, stop_reason)
    accelerator.end_training()
    return _result(cfg, state, checkpointer, metrics, stop_reason, predictions_file, predictions=test_output)


def finish(cfg, accelerator, state, checkpointer, evaluator, tracker, task, test_dl, prepared, stop_reason):
    """Reload the best weights, rotate, evaluate, export the model with its card, predict the test split."""
    from .modelcard import write_model_card

    t = cfg.training
    checkpointer.reload_best(state)
    metrics = {}
    if t.do_eval and evaluator.dataloader is not None:
        metrics.update(evaluator.evaluate().metrics)
    checkpointer.export()
    if accelerator.is_main_process:
        write_model_card(t.output_dir, cfg, accelerator.unwrap_model(checkpointer.model), state.log_history,
                         accelerator.num_processes, state.best_metric, state.best_global_step, stop_reason)
    predictions_file, test_output = None, None
    if test_dl is not None:
        test_output = evaluator.evaluate(test_dl, "test")
        metrics.update(test_output.metrics)
        if accelerator.is_main_process:
            predictions_file = str(Path(t.output_dir) / task.predictions_file)
            task.write_predictions(predictions_file, test_output.predictions, prepared,
                                   accelerator.unwrap_model(checkpointer.model).config)
            if not Path(predictions_file).exists():  # MLM writes none: its test split gives metrics only
                predictions_file = None
    if accelerator.is_main_process:
        Path(t.output_dir, "all_results.json").write_text(json.dumps(metrics, indent=2))
    checkpointer.write_final_state(state)
    best = checkpointer.best_path(state)
    tracker.finish({**metrics, "global_step": state.global_step, "best_metric": state.best_metric,
                    "best_global_step": state.best_global_step,
                    "best_model_checkpoint": str(best) if best else None, "output_dir": t.output_dir,
                    "model_dir": t.output_dir, "predictions_file": predictions_file,
                    "baseline": baseline(task, prepared) if "eval_loss" in metrics else None})
    return metrics, predictions_file, test_output


def check_fp16_autocast(accelerator) -> None:
    """fp16 where accelerate has no fp16 autocast (CPU) trains in fp32 while the config and the model card say
    fp16: refused (Trainer 5.25 accepts it and trains in fp32 as silently). DeepSpeed runs fp16 itself (its
    engine, not autocast)."""
    from accelerate.utils import DistributedType

    if (accelerator.mixed_precision == "fp16" and not accelerator.native_amp
            and accelerator.distributed_type != DistributedType.DEEPSPEED):
        raise ConfigError(f"fp16 mixed precision needs a GPU; on {accelerator.device.type} it would train in fp32: "
                          f"use bf16 (--bf16 true; bf16 autocast runs on CPU), or drop fp16 (--fp16 / the "
                          f"Accelerate config's mixed_precision).")


def resolved_record(task, prepared, training, dataloader_workers: int) -> dict:
    """What the run resolved rather than was given (detected columns, the task chosen from the labels, the label
    set, the precision that runs, the dataloader workers per process): the `resolved:` section of the output
    dir's config.yaml."""
    from .distributed import effective_mixed_precision

    labels = prepared.label_list
    return {"task": task.name, "text_columns": list(prepared.text_columns), "label_column": prepared.label_column,
            "label_names": [str(x) for x in labels] if labels is not None else None,
            "mixed_precision": effective_mixed_precision(training), "dataloader_num_workers": dataloader_workers}


def set_tf32(tf32: Optional[bool]) -> None:
    """TF32 matmuls: as asked, else on for an Ampere or newer GPU (fast_path.resolve_tf32); a CPU run keeps
    torch's default."""
    import torch

    from .fast_path import resolve_tf32

    tf32 = resolve_tf32(tf32, torch.cuda.get_device_capability() if torch.cuda.is_available() else None)
    if tf32 is None:
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def baseline(task, prepared) -> Optional[str]:
    """The task's trivial baseline, when the validation data is a `datasets.Dataset` it can read (a user's
    torch Dataset has no columns to read)."""
    if not hasattr(prepared.validation, "column_names"):
        return None
    return task.baseline(prepared.validation)


def _result(cfg, state, checkpointer, metrics, stop_reason, predictions_file, stop_signal=None,
            requeued=False, predictions=None) -> RunResult:
    from .checkpoint import list_checkpoints

    out = cfg.training.output_dir
    best = checkpointer.best_path(state)
    return RunResult(metrics=metrics, checkpoints=[str(p) for p in list_checkpoints(out).values()],
                     global_step=state.global_step, best_metric=state.best_metric,
                     best_global_step=state.best_global_step, best_model_checkpoint=str(best) if best else None,
                     log_history=state.log_history, stop_reason=stop_reason, output_dir=out,
                     predictions_file=predictions_file, stop_signal=stop_signal, requeued=requeued,
                     predictions=predictions)


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        from .config import help_text

        print(help_text("scaletune.train"))
        return 0
    try:
        result = run(argv)
    except ScaletuneError as e:  # bad input: one line naming the problem and the fix, no traceback
        # Input errors are found identically by every process (or agreed through a collective): one line, from
        # the first process, not one per rank; the others exit after it is out.
        from .distributed import wait_for_the_error_line

        first = os.environ.get("RANK", "0") == "0"
        if first:
            print(f"scaletune: error: {e}", file=sys.stderr, flush=True)
        wait_for_the_error_line(first)
        return 2
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
