"""Entry point: `accelerate launch -m scaletune.train [CONFIG] [--key value ...]` and `run(config)`.

parse -> preflight (cheap checks, no torch; claims the output dir) -> build (build.py) -> fit (loop.py) ->
finish (finish.py). Each step is a call into the module that owns it; docs/architecture.md says why in this
order.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from .config import Config, ConfigError, ConfigSource, load_config
from .dropin import UserParts
from .errors import NonFiniteError, ScaletuneError
from .preflight import preflight, run_config
from .startup import freeze_imported_objects, one_run_per_process

if TYPE_CHECKING:
    from .finish import RunResult


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
        callbacks: Optional[list] = None, overrides: Optional[dict] = None,
        on_checkpoint_saved: Optional[Callable] = None) -> RunResult:
    """Train, evaluate, export and predict. Trainer's keyword names (see dropin.py):

    `args`: a config dict, a YAML/JSON path or recipe name, a CLI argument list, a Config, or a
    `transformers.TrainingArguments`. Everything else is optional and replaces what scaletune would build:
    `model` (any PreTrainedModel), `processing_class` (tokenizer), the datasets (`datasets.Dataset`, a torch
    Dataset of dicts, a list of dicts), `data_collator`, `compute_metrics` (Trainer's one-argument form or
    `(predictions, label_ids)`), `preprocess_logits_for_metrics`, `compute_loss_func(outputs, labels,
    num_items_in_batch)` and `callbacks` (EarlyStoppingCallback). Not Trainer's: `on_checkpoint_saved(folder,
    state)`, called on every rank once each checkpoint is complete (checkpointer.OnSaved; scaletune.ray).
    """
    cpu_allocator_defaults()
    from . import dropin
    from .lock import release_lock

    user = dropin.UserParts(model=model, processing_class=processing_class, train_dataset=train_dataset,
                            eval_dataset=eval_dataset, test_dataset=test_dataset, data_collator=data_collator,
                            compute_metrics=dropin.metrics_function(compute_metrics),
                            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                            compute_loss_func=compute_loss_func, on_checkpoint_saved=on_checkpoint_saved)
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
        return _run(cfg, user)
    finally:
        release_lock(Path(cfg.training.output_dir))
        if "scaletune.distributed.accelerator" in sys.modules:
            sys.modules["scaletune.distributed.accelerator"].free_finished_run()
        if "scaletune.preemption" in sys.modules:
            sys.modules["scaletune.preemption"].PreemptionWatcher.uninstall_current()


def _run(cfg: Config, user: UserParts) -> RunResult:
    resumed = preflight(cfg, user)
    from .build import build  # torch: imported once the cheap checks have passed
    from .finish import finish
    from .loop import fit

    if one_run_per_process():
        freeze_imported_objects()

    run = build(run_config(cfg, resumed), user, resumed)
    stop_reason = "no_training"
    if run.loop is not None:
        try:
            stop_reason = fit(run.loop, run.state, run.plan)
        except NonFiniteError:
            run.checkpointer.flush()  # a save in flight is of a good step: complete it (every rank agreed to stop)
            raise
        run.checkpointer.flush()
    return finish(run, stop_reason)


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
        from .distributed.collectives import wait_for_the_error_line

        first = os.environ.get("RANK", "0") == "0"
        if first:
            print(f"scaletune: error: {e}", file=sys.stderr, flush=True)
        wait_for_the_error_line(first)
        return 2
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
