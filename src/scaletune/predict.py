"""`python -m scaletune.predict MODEL_DIR --test_file data.csv [--output_file preds.csv]`

Predictions for new data with a model exported by `scaletune.train` -- the tutorial's `trainer.predict(test)`
step as a command. The run's own `config.yaml`, saved in the model folder, supplies the task, the text and
label columns, the maximum length and the label settings, so none of them is repeated here; the text columns are
those the run resolved (its `resolved:` section), and a file without them is refused. Classification:
one row per example with its id, the predicted label and every label's probability; regression: the value;
multi-label: the label set and every label's probability; token classification: the words with their
predicted tags in CoNLL form. When the file has labels, the metrics of the run's test pass are printed too.
Masked and causal language models have no prediction file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import NamedTuple, Optional

# The config keys predict takes from the run's config.yaml: what decides how a row becomes model inputs.
_RUN_KEYS = ("task", "text_column_names", "text_column_name", "label_column_name", "label_delimiter",
             "multilabel_threshold", "max_seq_length", "label_all_tokens", "return_entity_level_metrics",
             "label_smoothing_factor", "pad_to_multiple_of")
_ARCHITECTURE_TASKS = (("ForTokenClassification", "token_classification"), ("ForCausalLM", "clm"),
                       ("ForMaskedLM", "mlm"))
_NO_FILE = {
    "mlm": "a masked-LM model has no prediction file (as run_mlm.py: its test split gives metrics only); fill masks "
           "with transformers.pipeline('fill-mask', model={dir!r}).",
    "clm": "a causal-LM model has no prediction file (as run_clm.py: its test split gives metrics only); generate "
           "text with transformers.pipeline('text-generation', model={dir!r}).",
}


class Prediction(NamedTuple):
    output_file: str
    metrics: dict
    """`test_`-prefixed metrics when the file has labels for every row, else empty."""


def predict(model_dir: str, test_file: str, output_file: str | None = None, text_column_names: str | None = None,
            max_seq_length: int | None = None, batch_size: int = 32) -> str:
    """Write the predictions file and return its path (metrics, when the file has labels, are printed)."""
    result = run_prediction(model_dir, test_file, output_file, text_column_names, max_seq_length, batch_size)
    if result.metrics:
        from .tracking.summary import format_metrics

        print(format_metrics(result.metrics))
    return result.output_file


def run_prediction(model_dir: str, test_file: str, output_file: Optional[str] = None,
                   text_column_names: Optional[str] = None, max_seq_length: Optional[int] = None,
                   batch_size: int = 32) -> Prediction:
    """Everything is checked -- model folder, task, file, columns, labels -- before the model loads."""
    from .config import ConfigError
    from .errors import DataError
    from .model_source import check_source

    model_dir = str(model_dir)
    model_config = _read_model_config(model_dir)
    run = _read_run_config(model_dir)
    task_name = _task_name(run, model_config)
    if task_name in _NO_FILE:
        raise ConfigError(f"{model_dir}: " + _NO_FILE[task_name].format(dir=model_dir))
    # the weights and the tokenizer, as train's preflight checks a model folder
    check_source("model_dir", model_dir, None, "main", wants_config=False, wants_weights=True, wants_tokenizer=True)
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1.")
    if not Path(test_file).is_file():
        raise DataError(f"test_file {test_file!r} does not exist.")
    overrides = {k: v for k, v in (("text_column_names", text_column_names), ("max_seq_length", max_seq_length))
                 if v is not None}
    if task_name == "token_classification" and text_column_names is not None:
        overrides["text_column_name"] = overrides.pop("text_column_names")  # the words column
    trained = _trained_columns(run, task_name, test_file) if text_column_names is None else ()
    if trained:  # the columns the run read, not a new detection on this file (which may find other ones)
        overrides["text_column_name" if task_name == "token_classification" else "text_column_names"] = \
            ",".join(trained)
    output_file = output_file or str(Path(model_dir) / ("predictions_new.conll" if task_name == "token_classification"
                                                        else "predictions_new.csv"))
    cfg = _prediction_config(model_dir, test_file, task_name, run, overrides, batch_size)
    labels = _label_names(model_config)
    if task_name == "token_classification":
        return _predict_tokens(model_dir, cfg, labels, output_file, batch_size, trained)
    return _predict_sequences(model_dir, cfg, task_name, labels, output_file, batch_size, trained)


# --------------------------------------------------------------------------- what the run saved


def _read_model_config(model_dir: str) -> dict:
    from .errors import DataError

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise DataError(f"{model_dir!r} is not a model folder (no config.json); pass the output_dir of a run.")
    from .model_source import check_source

    check_source("model_dir", model_dir, None, "main", wants_config=True)  # a config.json that parses
    return json.loads(path.read_text())


def _read_run_config(model_dir: str) -> dict:
    """The run's effective config (config.yaml, written by scaletune.train into output_dir); {} for a plain
    `save_pretrained` folder."""
    import yaml

    from .config import ConfigError

    path = Path(model_dir) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML ({' '.join(str(e).split())}); restore it from the run or "
                          f"delete it to predict with the model's config.json alone.") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} does not hold a mapping of config keys; restore it or delete it.")
    return values


def _trained_columns(run: dict, task_name: str, test_file: str) -> tuple:
    """The text columns the run resolved (its config.yaml's `resolved:` section), or () when it recorded none
    (a run before the record, a plain `save_pretrained` folder). A CoNLL file's columns are named by its reader."""
    from .config import RESOLVED_SECTION

    if task_name == "token_classification":
        from .conll_format import is_conll_file

        if is_conll_file(test_file):
            return ()
    return tuple((run.get(RESOLVED_SECTION) or {}).get("text_columns") or ())


def _check_trained_columns(columns: list, trained: tuple, test_file: str) -> None:
    """Before the model loads: a file without a column the model was trained on is refused, not read otherwise."""
    from .errors import DataError

    missing = [c for c in trained if c not in columns]
    if missing:
        raise DataError(f"{test_file!r} has no {', '.join(repr(c) for c in missing)} column, and the model was "
                        f"trained on text column(s) {', '.join(trained)}; add {'it' if len(missing) == 1 else 'them'}"
                        f" to the file, or name the file's own column(s) with --text_column_names (its columns: "
                        f"{', '.join(columns)}).")


def _task_name(run: dict, model_config: dict) -> str:
    """The run's task; `classification` that chose regression or multi-label from its labels is read back from
    the exported head's problem_type. Without config.yaml: from the architecture and problem_type."""
    from .tasks import TASKS, task_for_problem_type

    task = run.get("task")
    if task is not None and task not in TASKS:
        from .config import ConfigError

        raise ConfigError(f"The run's config.yaml names task {task!r}, which this scaletune does not know; "
                          f"choose one of {', '.join(TASKS)}.")
    if task in (None, "classification"):
        for suffix, name in _ARCHITECTURE_TASKS:
            if any(a.endswith(suffix) for a in model_config.get("architectures") or ()):
                return name
        return task_for_problem_type(model_config.get("problem_type"))
    return task


def _prediction_config(model_dir, test_file, task_name, run, overrides, batch_size):
    from .config import load_config

    values = {k: run[k] for k in _RUN_KEYS if k in run}
    values.update({"task": task_name, "model_name_or_path": model_dir, "test_file": test_file, "do_train": False,
                   "validation_split_percentage": 0, "per_device_eval_batch_size": batch_size,
                   "output_dir": str(Path(model_dir) / ".predict"), **overrides})
    return load_config(values)


def _label_names(model_config: dict) -> list[str]:
    id2label = model_config.get("id2label") or {}
    return [id2label[str(i)] for i in range(len(id2label))]


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load(auto_class, model_dir: str):
    from .model_source import load_exported

    return load_exported(auto_class, model_dir).to(_device()).eval()


def _prepare_output(output_file: str) -> None:
    Path(output_file).parent.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------- classification, regression, multi-label


def _predict_sequences(model_dir, cfg, task_name, labels, output_file, batch_size, trained=()) -> Prediction:
    from transformers import AutoTokenizer

    from .data import check_files, load_raw_datasets
    from .tasks import PreparedData, get_task
    from .tasks.labels import id_column

    check_files(cfg)
    raw = load_raw_datasets(cfg)
    rows = raw["test"]
    _check_trained_columns(rows.column_names, trained, cfg.data.test_file)
    task = get_task(task_name)
    text_cols = task.text_columns(rows.column_names, cfg)
    targets = _sequence_targets(task, raw, cfg, labels)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    max_len = min(cfg.data.max_seq_length or 128, tokenizer.model_max_length)
    encoded = rows.map(lambda b: tokenizer(*[b[c] for c in text_cols], truncation=True, max_length=max_len),
                       batched=True, remove_columns=rows.column_names, desc="Tokenizing")
    if targets is not None:  # labels in the batches: the loss and metrics come as in the run's own test pass
        encoded = encoded.add_column("labels", targets)
    id_col = id_column(rows.column_names)
    ids = list(rows[id_col]) if id_col else list(range(len(rows)))
    _prepare_output(output_file)

    from transformers import AutoModelForSequenceClassification

    model = _load(AutoModelForSequenceClassification, model_dir)
    result = _infer(model, encoded, task, task.collator(tokenizer, cfg, for_training=False), cfg, batch_size,
                    scored=targets is not None)
    task.write_predictions(output_file, result.predictions, PreparedData(test_ids=ids), model.config)
    return Prediction(output_file, result.metrics if targets is not None else {})


def _infer(model, dataset, task, collate, cfg, batch_size, scored: bool):
    """The run's test pass on one process (`evaluation.evaluate`): the predictions, and when `scored` the `test_`
    metrics (else none are computed)."""
    from torch.utils.data import DataLoader

    from .evaluation import SingleProcess, evaluate

    def on_device(examples):
        return {k: v.to(model.device) for k, v in collate(examples).items()}

    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=on_device)
    return evaluate(model, loader, task, task.loss(cfg), SingleProcess(), prefix="test", with_metrics=scored)


def _sequence_targets(task, raw, cfg, labels):
    """The file's labels as the run's targets (class ids in the model's label order, floats, multi-hot rows), or
    None when it has no label column or some row has no label. Labels the model does not know are an error."""
    import logging

    from .tasks.labels import is_missing

    col = cfg.data.label_column_name
    rows = raw["test"]
    if col not in rows.column_names:
        return None
    classlabel = hasattr(rows.features[col], "names")
    values = rows[col]
    missing = sum(1 for v in values if is_missing(v) or (classlabel and not isinstance(v, list) and v == -1))
    if missing:
        logging.getLogger(__name__).warning("%d of %d rows have no %r label: predicting without metrics.",
                                            missing, len(rows), col)
        return None
    if task.name == "regression":
        task.label_list(raw, cfg)  # checks the column holds numbers
        return [float(v) for v in values]
    if task.name == "multilabel":
        task.threshold, task.delimiter = cfg.data.multilabel_threshold, cfg.data.label_delimiter
    if classlabel:  # the file's own ClassLabel ids -> their names, encoded in the model's label order below
        import datasets

        names = rows.features[col].names
        features = rows.features.copy()
        features[col] = datasets.Value("string")
        raw["test"] = rows = rows.map(lambda b: {col: [names[v] for v in b[col]]}, batched=True, features=features)
        values = rows[col]
    encode = task.label_encoder(raw, cfg, labels)  # raises DataError for a label the model does not know
    return [encode(v) for v in values]


# --------------------------------------------------------------------------- token classification


def _predict_tokens(model_dir, cfg, labels, output_file, batch_size, trained=()) -> Prediction:
    import datasets
    from transformers import AutoTokenizer

    from .conll_format import conll_dataset, is_conll_file
    from .data import check_files, load_raw_datasets
    from .tasks import get_task

    if is_conll_file(cfg.data.test_file):  # read here: predicting needs no tag column
        raw = datasets.DatasetDict({"test": conll_dataset(cfg.data.test_file, require_tags=False)})
        if cfg.data.max_predict_samples:
            raw["test"] = raw["test"].select(range(min(cfg.data.max_predict_samples, len(raw["test"]))))
    else:
        check_files(cfg)
        raw = load_raw_datasets(cfg)
        _check_trained_columns(raw["test"].column_names, trained, cfg.data.test_file)
    task = get_task("token_classification")
    task.fixed_labels = labels
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prepared = task.prepare_data(raw, tokenizer, cfg, contextlib.nullcontext)  # every row checked here
    scored = "labels" in prepared.test.column_names and any(
        lab != -100 for row in prepared.test["labels"] for lab in row)
    # An untagged file: each word's first sub-word is marked as a labelled position, so the predictions come back
    # at the positions that name the words (the loss and metrics of the marks mean nothing: not reported).
    test = prepared.test if scored else task.mark_words(prepared.test)
    _prepare_output(output_file)

    from transformers import AutoModelForTokenClassification

    model = _load(AutoModelForTokenClassification, model_dir)
    result = _infer(model, test, task, task.collator(tokenizer, cfg, for_training=False), cfg, batch_size, scored)
    task.write_predictions(output_file, result.predictions, prepared, model.config)
    return Prediction(output_file, result.metrics if scored else {})


# --------------------------------------------------------------------------- command line


# The meaning of predict's options in --help (name, type and default come from predict()'s signature; an option
# not here is documented by the config field of the same name).
_OPTION_DOCS = {
    "model_dir": "Folder with the model: the output_dir of a `scaletune.train` run (its config.yaml gives the task, "
                 "columns, maximum length and label settings), or any classification / token-classification "
                 "`save_pretrained` folder (task read from its config.json).",
    "test_file": "CSV/TSV/JSON/JSONL/parquet file with the examples to predict, in the run's columns (token "
                 "classification: also a CoNLL `.conll`/`.txt` file, with or without a tag column). Labels, if "
                 "every row has one, give test metrics; they must be among the model's labels.",
    "output_file": "Where the predictions are written (its folder is created). Default: "
                   "MODEL_DIR/predictions_new.csv (token classification: MODEL_DIR/predictions_new.conll).",
    "text_column_names": "The text column(s), comma separated (token classification: the column of word lists), "
                         "when the file's differ from the run's. Default: the run's.",
    "max_seq_length": "Longer inputs are truncated (>= 1). Default: the run's max_seq_length (128 for "
                      "classification when the run left it unset), capped at the tokenizer's limit.",
    "batch_size": "Examples per forward pass (on the GPU when there is one).",
}


def main(argv=None) -> int:
    if any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv)):
        from .config.reference import function_help  # from predict()'s signature: the options below mirror it

        print(function_help("scaletune.predict", predict, __doc__.strip().split("\n\n", 1)[1], _OPTION_DOCS))
        return 0
    p = argparse.ArgumentParser(prog="python -m scaletune.predict", description=__doc__.strip().splitlines()[2])
    p.add_argument("model_dir")
    p.add_argument("--test_file", required=True)
    p.add_argument("--output_file")
    p.add_argument("--text_column_names")
    p.add_argument("--max_seq_length", type=int)
    p.add_argument("--batch_size", type=int, default=32)
    args = p.parse_args(argv)
    from .errors import ScaletuneError

    try:
        out = predict(args.model_dir, args.test_file, args.output_file, args.text_column_names,
                      args.max_seq_length, args.batch_size)
    except ScaletuneError as e:
        print(f"scaletune.predict: error: {e}", file=sys.stderr)
        return 2
    print(f"Predictions written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
