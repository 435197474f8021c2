"""The exported model's README.md, as Trainer's `create_model_card` writes it, so the folder can be shared as is.

Built with transformers' own `TrainingSummary` (the code behind `Trainer.create_model_card`): base model,
data, hyperparameters, final metrics and a table of the evaluation history; scaletune adds the best metric
and its step, and how the run stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from . import metric_names


def hyperparameters(cfg, world_size: int) -> dict:
    """The hyperparameters Trainer's card lists, under its names."""
    from .distributed.backend import effective_mixed_precision

    t = cfg.training
    out = {
        "learning_rate": t.learning_rate,
        "train_batch_size": t.per_device_train_batch_size,
        "eval_batch_size": t.per_device_eval_batch_size,
        "seed": t.seed,
        "distributed_type": "multi-process" if world_size > 1 else "single process",
        "num_devices": world_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "total_train_batch_size": t.global_batch_size(world_size),
        "optimizer": f"{t.optim} with betas=({t.adam_beta1},{t.adam_beta2}) and epsilon={t.adam_epsilon}",
        "lr_scheduler_type": t.lr_scheduler_type,
        # A fraction of the steps under the name Trainer gave fractions (warmup_ratio), a step count as steps.
        **({"lr_scheduler_warmup_ratio": t.warmup_steps} if 0 < t.warmup_steps < 1
           else {"lr_scheduler_warmup_steps": int(t.warmup_steps)}),
        "training_steps" if t.max_steps > 0 else "num_epochs": t.max_steps if t.max_steps > 0 else t.num_train_epochs,
    }
    precision = effective_mixed_precision(t)  # also when the Accelerate config chose it (fp16 on CPU is refused)
    if precision != "no":
        out["mixed_precision_training"] = precision
    if t.label_smoothing_factor:
        out["label_smoothing_factor"] = t.label_smoothing_factor
    return out


def write_model_card(folder: str | Path, cfg, model, log_history: list, world_size: int, best_metric: Optional[float],
                     best_step: Optional[int], stop_reason: str) -> Path:
    from transformers.modelcard import TrainingSummary, parse_log_history

    d = cfg.data
    finetuned_from, named = base_model(cfg, model)
    dataset = d.dataset_name or d.train_file
    # Trainer's parser starts the table at its end-of-training summary entry (train_runtime); ours has none.
    _, eval_lines, eval_results = parse_log_history([*_evaluations_marked(log_history), {"train_runtime": None}])
    eval_lines = [{k: v for k, v in line.items() if v is not _NO_LOSS} for line in eval_lines or ()]
    eval_results = {k: v for k, v in (eval_results or {}).items() if v is not _NO_LOSS}
    summary = TrainingSummary(
        model_name=Path(cfg.training.output_dir).resolve().name, tags=["scaletune", "generated_from_trainer"],
        finetuned_from=finetuned_from, tasks=_card_task(d.task), dataset=dataset, eval_results=eval_results or None,
        eval_lines=eval_lines, hyperparameters=hyperparameters(cfg, world_size), source="trainer")
    card = summary.to_model_card().replace("generated automatically by the Trainer",
                                           "generated automatically by scaletune")
    if named:  # TrainingSummary calls a model without a Hub id "trained from scratch"
        card = card.replace("This model was trained from scratch on ",
                            f"This model is a fine-tuned version of {named} on ")
    if best_metric is not None:
        metric = metric_names.best_metric(cfg.training.metric_for_best_model)
        card += (f"\n### Best checkpoint\n\n- {metric}: {best_metric:.4g} at step {best_step}"
                 f"{' (its weights are these)' if cfg.training.load_best_model_at_end else ''}\n"
                 f"- training stopped by: {stop_reason.replace('_', ' ')}\n")
    path = Path(folder) / "README.md"
    path.write_text(card)
    return path


_NO_LOSS = object()


def _evaluations_marked(log_history: list) -> list:
    """The history with several evaluation sets' entries (eval_<set>_loss, no eval_loss) marked with an eval_loss
    of `_NO_LOSS` (dropped from the card after parsing): Trainer's parser takes only an entry with eval_loss for
    an evaluation, and Trainer's own card leaves such runs with an empty table."""
    return [{**h, "eval_loss": _NO_LOSS} if "eval_loss" not in h and any(metric_names.split_of(k) == "eval"
                                                                          for k in h) else h
            for h in log_history]


def base_model(cfg, model) -> tuple[Optional[str], Optional[str]]:
    """(the Hub id the card links as base_model, or None; how the card names a base model that is not on the Hub:
    a local folder by its name, a packaged asset by its `packaged:` name). (None, None): trained from scratch."""
    from .assets import is_packaged, model_path

    given = cfg.model.model_name_or_path
    name = getattr(model.config, "_name_or_path", None) or given
    if not name:
        return None, None
    if is_packaged(name):
        return None, f"{name} (a model packaged with scaletune)"
    if Path(name).expanduser().exists():  # as Trainer: a folder is no Hub id
        if given and is_packaged(given) and _same_folder(name, lambda: model_path(given)):
            return None, f"{given} (a model packaged with scaletune)"
        return None, f"{Path(name).name} (a local model)"
    return name, None


def _same_folder(path: str, asset_folder) -> bool:
    from .errors import ScaletuneError

    try:
        return Path(path).resolve() == Path(asset_folder()).resolve()
    except ScaletuneError:  # the asset is not installed (the user's own model was trained): not its folder
        return False


def _card_task(task: str) -> Optional[str]:
    # The Hub's pipeline tags for what the exported model does.
    return {"classification": "text-classification", "regression": "text-classification",
            "multilabel": "text-classification", "mlm": "fill-mask", "token_classification": "token-classification",
            "clm": "text-generation"}.get(task)
