"""The run is built here, in one place: `build(cfg, user, resume) -> Run`.

Called after `preflight` (which claimed the output dir and read the checkpoint to resume) and before `fit`.
The order is the order of the random draws, which is part of a run's identity (the golden losses and
Trainer parity pin it): the data is prepared under the run's seed, the model is built under a fresh one
(`build_model`), the loaders are made, then accelerate prepares everything and the resumed state is loaded
into it. Nothing is written to the output dir until everything that can refuse the run has run: the
checkpoint's settings, the data position and the model's attention are checked first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed

from . import data, dropin, eval_sets, lora, mixture, schedule, trial_pruning
from .batch_search import TEST_OOM_ROWS, find_batch_sizes, install_test_oom_hook
from .checkpointer import Checkpointer
from .config import RESOLVED_SECTION, Config, ConfigError
from .distributed.accelerator import build_accelerator, configure_model
from .distributed.backend import Backend, effective_mixed_precision
from .evaluation import Evaluator
from .fast_path import apply_liger_kernel, build_step_loss, check_liger_kernel, resolve_tf32
from .fingerprint import hash_by_backend
from .loop import Loop
from .losses import ComputeLossFunc
from .metric_names import best_metric, metric_key
from .model_source import check_hub_kernels, hub_kernels_off, load_tokenizer
from .optim import METRIC_SCHEDULES, build_optimizer, build_scheduler, reapply_schedule
from .preemption import PreemptionWatcher
from .resume import Resume, check_resume_compatible
from .secrets import redact
from .state import TrainingState
from .stepper import Stepper, TrainData
from .tasks import get_task
from .tasks.base import PreparedData, Task
from .throughput import ThroughputMeter
from .tracking import RunTracker, quiet_other_ranks


@dataclass
class Loaders:
    train: Optional[torch.utils.data.DataLoader]
    eval: Optional[torch.utils.data.DataLoader]
    test: Optional[torch.utils.data.DataLoader]


@dataclass
class Run:
    """Everything one run is made of, built by `build`; `fit` drives `loop`, `finish` reads the rest."""

    cfg: Config
    accelerator: Accelerator
    backend: Backend
    task: Task
    data: PreparedData
    loaders: Loaders
    model: torch.nn.Module
    state: TrainingState
    plan: Optional[schedule.Plan]
    loop: Optional[Loop]
    evaluator: Evaluator
    checkpointer: Checkpointer
    tracker: RunTracker
    watcher: PreemptionWatcher
    resume: Optional[Resume]


def effective_config(cfg: Config) -> dict:
    """The config as written to config.yaml and into checkpoints: every default spelled out, secrets masked."""
    return redact(cfg.to_dict())


def build(cfg: Config, user: dropin.UserParts, resume: Optional[Resume]) -> Run:
    """Collective: every rank builds the same run. `cfg` is the config the run trains with
    (`preflight.run_config`: the given one, with the accumulation a resume on another process count needs)."""
    t = cfg.training
    accelerator = build_accelerator(cfg)
    backend = Backend.of(accelerator)
    set_tf32(t.tf32)
    check_liger_kernel(t)  # before the data and the model load
    check_fp16_autocast(accelerator, backend)
    quiet_other_ranks(accelerator)
    watcher = PreemptionWatcher()
    watcher.install()  # early: a preemption during data loading stops after the first update, with a checkpoint
    set_seed(t.seed)
    task = get_task(cfg.data.task)
    tokenizer = build_tokenizer(cfg, user)
    prepared, workers, mixture_counts = build_data(cfg, user, task, tokenizer, accelerator)
    config = effective_config(cfg)
    if resume is not None:
        check_resume_compatible(resume, config)
    model = build_model(cfg, user, task, prepared, tokenizer, accelerator)
    if TEST_OOM_ROWS in os.environ:  # a test hook (tests/e2e/test_batch_search.py): OOM above N rows
        install_test_oom_hook(model)
    if t.auto_find_batch_size and resume is None:  # a resume reuses its checkpoint's sizes (preflight.run_config)
        cfg = find_batch_sizes(cfg, accelerator, model, prepared,
                               lambda training: collator(cfg, user, task, tokenizer, training))
        set_seed(t.seed)  # as build_model left it: the probe drew dropout and masking randomness
        t, config = cfg.training, effective_config(cfg)
    loaders = build_loaders(cfg, user, task, prepared, tokenizer, workers)
    loaders, model, optimizer, scheduler, plan = prepare(cfg, accelerator, model, loaders, prepared)
    if mixture_counts is not None:
        mixture_counts.dataloader = loaders.train  # the prepared loader: its samplers are what ran

    config_yaml = yaml.safe_dump(config, sort_keys=False)
    checkpointer = Checkpointer(accelerator, t, model, tokenizer, config_yaml, user.on_checkpoint_saved)
    meter = ThroughputMeter(model, accelerator)
    train_data = TrainData(loaders.train, accelerator, plan.accumulation, meter) if plan is not None else None
    state = TrainingState(world_size=accelerator.num_processes)
    if resume is not None:
        state = checkpointer.load(resume)
        if train_data is not None:
            train_data.check_position(state)  # before anything is written: a refused resume changes nothing
        reapply_schedule(scheduler, t)
        accelerator.print(f"Resumed from {resume.path} at step {state.global_step}.", flush=True)
    elif t.overwrite_output_dir:
        checkpointer.start_fresh()
    tracker = RunTracker(cfg, accelerator, run_id=state.tracker_run_id,
                         resume_step=state.global_step if resume is not None else None)
    state.tracker_run_id = tracker.run_id
    if accelerator.is_main_process:
        write_run_config(Path(t.output_dir), config_yaml, resolved_record(task, prepared, t, workers))

    loss = ComputeLossFunc(user.compute_loss_func) if user.compute_loss_func else task.loss(cfg)
    # One evaluator for validation and test: the same loss, metrics and logit reduction.
    evaluator = Evaluator(accelerator, model, loaders.eval, task, loss, t, user.compute_metrics,
                          user.preprocess_logits_for_metrics)
    loop = None
    if t.do_train:
        stepper = Stepper(accelerator, model, optimizer, scheduler, loss, meter, t.max_grad_norm,
                          schedule_metric=metric_key(best_metric(t.metric_for_best_model))
                          if t.lr_scheduler_type in METRIC_SCHEDULES else None,
                          skip_nonfinite=t.on_nonfinite == "skip",
                          step_loss=build_step_loss(model, loss, t, accelerator.print))
        loop = Loop(args=t, data=train_data, stepper=stepper, evaluator=evaluator if loaders.eval is not None else None,
                    checkpointer=checkpointer, tracker=tracker, meter=meter, watcher=watcher,
                    mixture=mixture_counts, pruner=trial_pruning.from_env(accelerator))
    return Run(cfg=cfg, accelerator=accelerator, backend=backend, task=task, data=prepared, loaders=loaders,
               model=model, state=state, plan=plan, loop=loop, evaluator=evaluator, checkpointer=checkpointer,
               tracker=tracker, watcher=watcher, resume=resume)


def prepare(cfg: Config, accelerator: Accelerator, model: torch.nn.Module, loaders: Loaders,
            prepared: PreparedData) -> tuple[Loaders, torch.nn.Module, Any, Any, Optional[schedule.Plan]]:
    """The optimizer, the plan (it needs the prepared loader's length: batches per rank) and the schedule, and
    everything through `accelerator.prepare`."""
    t = cfg.training
    optimizer = build_optimizer(model, t)
    evals = eval_sets.as_dict(loaders.eval)  # several evaluation sets: a loader each
    train, *prepared_evals, test = accelerator.prepare(loaders.train, *evals.values(), loaders.test)
    loaders = Loaders(train, eval_sets.from_dict(dict(zip(evals, prepared_evals))), test)
    plan = None
    if t.do_train:
        batches = len(loaders.train) if hasattr(prepared.train, "__len__") else None  # a stream has no length
        plan = schedule.resolve_plan(t, batches)
        schedule.check_best_model_cadence(t, plan)
    scheduler = build_scheduler(optimizer, t, plan) if plan else None
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if cfg.model.use_hub_kernels:  # on the training device, where the kernels are looked up
        check_hub_kernels(accelerator.unwrap_model(model))
    return loaders, model, optimizer, scheduler, plan


def build_tokenizer(cfg: Config, user: dropin.UserParts) -> Any:
    """The user's tokenizer, else the config's, else (for the user's own model) the one it was loaded from: its
    config's name_or_path (the default model_name_or_path is not that model's). None when nothing is tokenized."""
    if user.brings_tokenization:
        tokenizer = user.processing_class
    else:
        m = cfg.model
        source = m.tokenizer_name or (m.model_name_or_path if user.model is None
                                      else getattr(getattr(user.model, "config", None), "_name_or_path", None))
        if not source:
            raise ConfigError("run(model=...) was given no processing_class, and the data must be tokenized: pass "
                              "processing_class=<tokenizer> or set tokenizer_name.")
        tokenizer = load_tokenizer(m, source)
    hash_by_backend(tokenizer)  # its maps' fingerprints without 0.13 s of pickling the vocabulary each
    return tokenizer


def build_data(cfg: Config, user: dropin.UserParts, task: Task, tokenizer, accelerator: Accelerator
               ) -> tuple[PreparedData, int, Optional[mixture.MixtureCounts]]:
    """The tokenized splits, the DataLoader workers per process, and a train_mixture's per-source counter;
    says which columns were detected."""
    counts = None
    if user.brings_data:
        prepared = dropin.user_prepared_data(task, tokenizer, cfg, accelerator.main_process_first,
                                             user.train_dataset, user.eval_dataset, user.test_dataset,
                                             getattr(user.model, "config", None))
    else:
        raw = data.load_raw_datasets(cfg, streaming=cfg.data.streaming)
        sets = eval_sets.load_validation_sets(cfg, streaming=cfg.data.streaming)
        prepared = (eval_sets.prepare_with_sets(task, raw, sets, tokenizer, cfg, accelerator.main_process_first)
                    if sets else task.prepare_data(raw, tokenizer, cfg, accelerator.main_process_first))
        counts = mixture.counter(cfg, raw.get("train"), prepared.train, accelerator.print)
    workers, why = data.dataloader_workers(cfg.training, user_collator=user.data_collator is not None)
    if why:
        accelerator.print(f"scaletune: dataloader workers: {why}", flush=True)
    if prepared.text_columns:  # which columns auto-detection chose is said before the work that uses them
        accelerator.print(f"scaletune: {task.name}: text columns {', '.join(prepared.text_columns)}"
                          + (f", label column {prepared.label_column}" if prepared.label_column else ""), flush=True)
    return prepared, workers, counts


def build_model(cfg: Config, user: dropin.UserParts, task: Task, prepared: PreparedData, tokenizer,
                accelerator: Accelerator) -> torch.nn.Module:
    """The model to train, before accelerate prepares it, with the random state it leaves behind.

    Seeded three times, each for a reason: the head's init must not depend on how much randomness data loading
    drew; LoRA's adapter init must depend on the seed only (loading under ZeRO-3's zero.Init draws from the
    generator differently than a plain load, and every backend must start from the same adapter); and after
    the model, as Trainer.__init__ does after the user built it, so the dropout stream does not depend on how
    much a new head's init drew (tests/parity/test_parity_migration.py)."""
    t = cfg.training
    set_seed(t.seed)
    model = user.model if user.model is not None else task.build_model(cfg, prepared, tokenizer)
    if not cfg.model.use_hub_kernels:  # before anything calls train()/eval(), which would kernelize
        hub_kernels_off(model)
    if t.use_liger_kernel:  # before LoRA wraps it and accelerate prepares it
        apply_liger_kernel(model)
    if cfg.data.padding_free:  # before training: a model that would attend across the packed examples is refused
        from .tasks.packing import check_packed_attention

        check_packed_attention(model)
    model = configure_model(model, t, accelerator)  # gradient checkpointing, FSDP2's units
    if cfg.peft.use_peft:
        set_seed(t.seed)
        model = lora.apply(model, cfg)
        accelerator.print(lora.trainable_summary(model))
    set_seed(t.seed)
    return model


def build_loaders(cfg: Config, user: dropin.UserParts, task: Task, prepared: PreparedData, tokenizer,
                  workers: int) -> Loaders:
    t = cfg.training

    def loader(split, training: bool, batch_size: int):
        collate = collator(cfg, user, task, tokenizer, training)
        return data.build_dataloader(split, collate, batch_size, training, t, workers)

    loaders = Loaders(
        train=loader(prepared.train, True, t.per_device_train_batch_size) if t.do_train else None,
        eval=eval_sets.from_dict({name: loader(ds, False, t.per_device_eval_batch_size)
                                  for name, ds in eval_sets.as_dict(prepared.validation).items()})
        if prepared.validation else None,
        test=(loader(prepared.test, False, t.per_device_eval_batch_size)
              if prepared.test is not None and t.do_predict else None))
    if (t.eval_strategy != "no" or t.load_best_model_at_end) and loaders.eval is None:
        raise ConfigError("Evaluation is on but there is no validation data: set validation_file or "
                          "validation_split_percentage > 0.")
    return loaders


def collator(cfg: Config, user: dropin.UserParts, task: Task, tokenizer, training: bool):
    return user.data_collator or dropin.default_collator(tokenizer, task, cfg, training)


def write_run_config(output_dir: Path, config_yaml: str, resolved: dict) -> None:
    """The config as given (a resume compares it, a new run can start from it), then what the run resolved."""
    (output_dir / "config.yaml").write_text(
        config_yaml + "# What this run resolved from its data and machine: read by scaletune.predict,\n"
                      "# skipped when this file is read as a config.\n"
        + yaml.safe_dump({RESOLVED_SECTION: resolved}, sort_keys=False))


def resolved_record(task: Task, prepared: PreparedData, training, dataloader_workers: int) -> dict:
    """What the run resolved rather than was given (detected columns, the task chosen from the labels, the label
    set, the precision that runs, the dataloader workers per process): the `resolved:` section of the output
    dir's config.yaml."""
    labels = prepared.label_list
    return {"task": task.name, "text_columns": list(prepared.text_columns), "label_column": prepared.label_column,
            "label_names": [str(x) for x in labels] if labels is not None else None,
            "mixed_precision": effective_mixed_precision(training), "dataloader_num_workers": dataloader_workers}


def check_fp16_autocast(accelerator: Accelerator, backend: Backend) -> None:
    """fp16 where accelerate has no fp16 autocast (CPU) trains in fp32 while the config and the model card say
    fp16: refused (Trainer 5.25 accepts it and trains in fp32 as silently). DeepSpeed runs fp16 itself (its
    engine, not autocast)."""
    if accelerator.mixed_precision == "fp16" and not accelerator.native_amp and not backend.runs_fp16_itself:
        raise ConfigError(f"fp16 mixed precision needs a GPU; on {accelerator.device.type} it would train in fp32: "
                          f"use bf16 (--bf16 true; bf16 autocast runs on CPU), or drop fp16 (--fp16 / the "
                          f"Accelerate config's mixed_precision).")


def set_tf32(tf32: Optional[bool]) -> None:
    """TF32 matmuls: as asked, else on for an Ampere or newer GPU (fast_path.resolve_tf32); a CPU run keeps
    torch's default."""
    tf32 = resolve_tf32(tf32, torch.cuda.get_device_capability() if torch.cuda.is_available() else None)
    if tf32 is None:
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32

