"""What a `transformers.Trainer` script brings, turned into scaletune's config and collaborators.

`run(args, model=..., train_dataset=..., compute_metrics=..., compute_loss_func=..., callbacks=...)` takes
Trainer's keyword names. This module maps each of them:

* a `TrainingArguments` instance -> config keys (same names, same meaning); a field set to a value scaletune
  does not support is an error naming it and what to do instead -- never silently ignored;
* `callbacks=[EarlyStoppingCallback(...)]` -> early_stopping_patience / early_stopping_threshold; any other
  callback is an error (one visible loop, no callback bus, on purpose);
* `compute_metrics(EvalPrediction)` (Trainer's form) or `compute_metrics(predictions, label_ids)`;
* `compute_loss_func(outputs, labels, num_items_in_batch)` -> a loss on the seam of `losses.py`, called with
  the item count of the *whole accumulation window on every rank*, so the update is exactly the one of a single
  big batch (§17) -- Trainer passes that count too, but its BERT loss path ignores it (issue 47688);
* user datasets (a `datasets.Dataset`, tokenized or raw text; a map-style torch `Dataset` returning dicts of
  tensors; a list of dicts) -> the task's `PreparedData`.
  `eval_dataset={name: dataset}` is several evaluation sets, as Trainer's dict (`eval_sets.py`).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import TYPE_CHECKING, Any, Callable, Optional

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

# TrainingArguments fields without a scaletune key of the same name: what to do instead when they are set.
INSTEAD = {
    "use_cpu": "it is automatic without a GPU; `./launch PRESET --cpu N` runs N CPU processes",
    "deepspeed": "use an Accelerate config: ./launch deepspeed_zero2 (or deepspeed_zero1/_zero3/_zero3_offload)",
    "accelerator_config": "use an Accelerate config file (accelerate_configs/, or ./launch path.yaml)",
    "fsdp": "use an Accelerate config (./launch fsdp2)",
    "fsdp_config": "use an Accelerate config (./launch fsdp2)",
    "push_to_hub": "push the exported output_dir yourself (it is a save_pretrained folder with a model card)",
    "logging_strategy": "logging is by steps: set logging_steps",
    "label_names": "labels must be in the batch under `labels`",
}


@dataclasses.dataclass
class UserParts:
    """The objects a Trainer script builds itself (Trainer's keyword names); None: scaletune builds it."""

    model: Optional[torch.nn.Module] = None
    processing_class: Optional[Any] = None
    """A tokenizer (or processor); saved with checkpoints and the export when given."""
    train_dataset: Optional[Any] = None
    eval_dataset: Optional[Any] = None
    test_dataset: Optional[Any] = None
    data_collator: Optional[Callable] = None
    compute_metrics: Optional[Callable] = None
    """As `compute_metrics(predictions, label_ids)` (see metrics_function)."""
    preprocess_logits_for_metrics: Optional[Callable] = None
    compute_loss_func: Optional[Callable] = None
    on_checkpoint_saved: Optional[Callable] = None
    """Not Trainer's: `checkpointer.OnSaved`, set by an engine that must hear of each checkpoint (scaletune.ray)."""

    @property
    def brings_data(self) -> bool:
        return any(d is not None for d in (self.train_dataset, self.eval_dataset, self.test_dataset))

    @property
    def brings_tokenization(self) -> bool:
        """No tokenizer is read from the config's names: the user passed one, or their model with their data."""
        return self.processing_class is not None or (self.model is not None and self.brings_data)


def _honoured(name: str, value: Any) -> bool:
    """Non-default values that ask for what scaletune does anyway."""
    if name == "use_cpu":
        import torch

        return bool(value) and not torch.cuda.is_available()  # no GPU: CPU it is
    if name in ("average_tokens_across_devices", "restore_callback_states_from_checkpoint"):
        return bool(value)  # always on in scaletune (§13, §17)
    return False


def _plain(value: Any) -> Any:
    """Enums (IntervalStrategy, SchedulerType, OptimizerNames) -> their string values, for comparison."""
    return getattr(value, "value", value)


def config_from_training_arguments(args) -> dict:
    """A `transformers.TrainingArguments` -> scaletune config keys. Fields scaletune shares are copied (so a
    Trainer user keeps Trainer's defaults); any other field set away from its default is an error."""
    from transformers import TrainingArguments

    from .config import FIELD_GROUP

    defaults = TrainingArguments(output_dir=args.output_dir)
    out, unsupported = {}, []
    for f in dataclasses.fields(TrainingArguments):
        # Trainer itself ignores do_train/do_eval/do_predict (scripts read them): run() trains on the given
        # train_dataset, evaluates eval_dataset and predicts test_dataset, as the script's calls would.
        if not f.init or f.name in ("do_train", "do_eval", "do_predict"):
            continue
        value, default = _plain(getattr(args, f.name)), _plain(getattr(defaults, f.name))
        if f.name in FIELD_GROUP:
            out[f.name] = value
        elif value != default and not _honoured(f.name, value):
            unsupported.append(f"{f.name}={value!r} ({INSTEAD.get(f.name, 'not supported by scaletune')})")
    if unsupported:
        raise ConfigError("TrainingArguments fields scaletune does not support were set: " + "; ".join(unsupported)
                          + ". Unset them; docs/migrating-from-trainer.md lists every field.")
    if isinstance(out.get("report_to"), list) and not out["report_to"]:
        out["report_to"] = "none"
    return out


def config_from_callbacks(callbacks: Optional[list]) -> dict:
    """`EarlyStoppingCallback` -> early-stopping keys; anything else is an error naming the alternative."""
    if not callbacks:
        return {}  # and no transformers (torch) import before the config is checked
    from transformers import EarlyStoppingCallback

    out: dict = {}
    for cb in callbacks or ():
        cls = cb if isinstance(cb, type) else type(cb)
        if issubclass(cls, EarlyStoppingCallback):
            instance = cb() if isinstance(cb, type) else cb
            out["early_stopping_patience"] = instance.early_stopping_patience
            out["early_stopping_threshold"] = instance.early_stopping_threshold
            continue
        raise ConfigError(f"callbacks: {cls.__name__} is not supported: scaletune has one visible loop and no callback "
                          f"bus, on purpose. Early stopping is EarlyStoppingCallback (or early_stopping_patience); "
                          f"for custom logging use metrics.jsonl or report_to; for anything else edit the loop "
                          f"(src/scaletune/loop.py).")
    return out


def metrics_function(compute_metrics: Optional[Callable]) -> Optional[Callable[[Any, Any], dict]]:
    """Trainer's `compute_metrics(EvalPrediction)` or `compute_metrics(predictions, label_ids)`, as the latter."""
    if compute_metrics is None:
        return None
    try:
        params = [p for p in inspect.signature(compute_metrics).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    except (TypeError, ValueError):  # a builtin or C callable: assume Trainer's form
        params = [None]
    if len(params) >= 2:
        return compute_metrics

    def from_eval_prediction(predictions, label_ids):
        from transformers import EvalPrediction

        return compute_metrics(EvalPrediction(predictions=predictions, label_ids=label_ids))

    return from_eval_prediction


def is_tokenized(dataset) -> bool:
    names = getattr(dataset, "column_names", None)
    return names is None or "input_ids" in names  # a torch Dataset / list: the user built the inputs


def user_prepared_data(task, tokenizer, cfg, main_process_first, train_dataset, eval_dataset, test_dataset,
                       model_config):
    """The user's datasets as the task's PreparedData. Raw-text `datasets.Dataset`s are tokenized by the task
    (a tokenizer is needed); tokenized ones, torch Datasets and lists are used as they are."""
    from .eval_sets import prepare_with_sets
    from .tasks import PreparedData

    sets = eval_dataset if isinstance(eval_dataset, dict) else None  # several named sets, as Trainer's dict
    splits = {name: ds for name, ds in (("train", train_dataset), ("validation", None if sets else eval_dataset),
                                         ("test", test_dataset)) if ds is not None}
    raw_text = [name for name, ds in {**splits, **(sets or {})}.items() if not is_tokenized(ds)]
    if raw_text:
        if tokenizer is None:
            raise ConfigError(f"The {', '.join(raw_text)} dataset holds raw text (no input_ids column): pass "
                              f"processing_class=<tokenizer> to tokenize it, or tokenize it yourself.")
        import datasets

        if sets:
            return prepare_with_sets(task, datasets.DatasetDict(splits), sets, tokenizer, cfg, main_process_first)
        return task.prepare_data(datasets.DatasetDict(splits), tokenizer, cfg, main_process_first)
    labels = getattr(model_config, "id2label", None)
    test = splits.get("test")
    return PreparedData(train=splits.get("train"), validation=sets or splits.get("validation"), test=test,
                        label_list=[labels[i] for i in sorted(labels)] if labels else None,
                        test_ids=list(range(len(test))) if test is not None else None)


def default_collator(tokenizer, task, cfg, training: bool):
    """As Trainer: the task's padding collator when a tokenizer is known, else `default_data_collator`
    (tensors already padded to one length, as the tutorial's Dataset returns them)."""
    flatten = training and cfg.data.padding_free
    if tokenizer is not None or (flatten and task.name == "clm"):  # clm's flattening needs no tokenizer
        return task.collator(tokenizer, cfg, training)
    from transformers import default_data_collator

    if flatten:  # an encoder task's tensors as given, their real tokens (attention_mask) put in one row
        from .tasks.packing import FlattenedPadding

        return FlattenedPadding(default_data_collator)
    return default_data_collator

