"""Text-to-blocks helpers shared by the language-model tasks (masked LM, causal LM), as run_mlm.py / run_clm.py:
block size, text column, grouping into blocks, line-by-line filtering, embedding resizing, perplexity, and the
`datasets` shapes (streams, truncation) they work on. No torch import at module level."""

from __future__ import annotations

import logging
import math
from itertools import chain
from typing import Callable, Optional

from ..errors import ConfigError, DataError
from ..model_source import max_position_embeddings
from .base import present_splits

logger = logging.getLogger("scaletune.tasks.mlm")  # the name users and tests already filter on

DEFAULT_MAX_BLOCK = 1024


def resolve_max_seq_length(requested: Optional[int], tokenizer_max: int,
                           max_position_embeddings: Optional[int] = None) -> int:
    """Block size as run_mlm.py: default min(1024, tokenizer limit); a larger request is capped (warned).

    The model's position table also caps it: a block longer than `max_position_embeddings` would crash
    in the first forward pass, after the whole dataset has been tokenized.
    """
    limits = [tokenizer_max] + ([max_position_embeddings] if max_position_embeddings else [])
    limit = min(limits)
    if requested is None:
        if limit > DEFAULT_MAX_BLOCK:
            logger.warning("The tokenizer allows %d tokens; using max_seq_length=%d as run_mlm.py does "
                           "(set max_seq_length to override).", limit, DEFAULT_MAX_BLOCK)
        return min(limit, DEFAULT_MAX_BLOCK)
    if requested < 1:
        raise ConfigError(f"max_seq_length must be >= 1, got {requested}.")
    if requested > limit:
        logger.warning("max_seq_length=%d exceeds the model's limit %d; using %d.", requested, limit, limit)
    return min(requested, limit)


def find_text_column(column_names: list[str], requested: Optional[str],
                     string_columns: Optional[list[str]] = None) -> str:
    """The column holding the text: `requested`, else `text`, else the first string column.

    run_mlm.py takes the first column; preferring a string one avoids training on an `idx` column.
    `string_columns` is None when the types are unknown (some streams): then the first column.
    """
    if requested is not None:
        if requested not in column_names:
            raise ConfigError(f"text_column_name={requested!r} is not a column of the dataset; columns: "
                              f"{', '.join(column_names)}. Set --text_column_name to one of them.")
        return requested
    if "text" in column_names:
        return "text"
    candidates = column_names if string_columns is None else [c for c in column_names if c in string_columns]
    if not candidates:
        raise ConfigError(f"No text column among {', '.join(column_names) or 'no columns'}; "
                          "set --text_column_name.")
    return candidates[0]


def group_texts(examples: dict[str, list[list]], block_size: int) -> dict[str, list[list]]:
    """Concatenate every column's sequences and cut them into blocks of `block_size`.

    The tail shorter than a block is dropped (as run_mlm.py), so a batch of texts totalling T tokens
    yields T // block_size blocks and loses T % block_size tokens.
    """
    concatenated = {k: list(chain.from_iterable(v)) for k, v in examples.items()}
    total = len(next(iter(concatenated.values()), []))
    total = (total // block_size) * block_size
    return {k: [t[i: i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()}


def non_empty_lines(texts: list) -> list[str]:
    """line_by_line keeps lines with any non-space character (run_mlm.py)."""
    return [t for t in texts if t and not t.isspace()]


def embedding_resize_target(num_tokens: int, embedding_rows: int) -> Optional[int]:
    """New embedding size when the tokenizer knows more tokens than the model embeds, else None."""
    return num_tokens if num_tokens > embedding_rows else None


def perplexity(loss: float) -> float:
    """exp(loss); a huge or infinite loss gives inf instead of an OverflowError."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def string_columns(ds) -> Optional[list[str]]:
    features = getattr(ds, "features", None)
    if not features:
        return None
    return [name for name, f in features.items() if getattr(f, "dtype", None) in ("string", "large_string")]


def column_names(ds) -> list[str]:
    names = getattr(ds, "column_names", None)
    if names is None:  # a stream whose features are unknown until read
        names = list(next(iter(ds)).keys())
    return list(names)


def is_stream(ds) -> bool:
    import datasets

    return isinstance(ds, datasets.IterableDataset)


def untrained_head_weights(missing_keys, base_model_prefix: str) -> list[str]:
    """Checkpoint tensors missing outside the encoder (`bert.`, `roberta.`...): the head starts random."""
    return sorted(k for k in missing_keys if not k.startswith(base_model_prefix + "."))


def resize_token_embeddings(model, num_tokens: int) -> Optional[int]:
    """Grow the embedding matrix when the tokenizer has added tokens (the check run_mlm.py makes)."""
    target = embedding_resize_target(num_tokens, model.get_input_embeddings().weight.shape[0])
    if target is not None:
        logger.info("Resizing token embeddings from %d to %d rows to fit the tokenizer.",
                    model.get_input_embeddings().weight.shape[0], target)
        model.resize_token_embeddings(target)
    return target


def first_rows(ds, limit: Optional[int]):
    """The first `limit` rows (max_*_samples); all of them when `limit` is None."""
    if limit is None:
        return ds
    if is_stream(ds):
        return ds.take(limit)
    return ds.select(range(min(limit, len(ds))))


def empty_split_error(split: str, block_size: int, line_by_line: bool, script: str) -> DataError:
    """Why a split yields no example after grouping or line filtering; `script`: the example script whose rule
    this follows (run_mlm.py, run_clm.py)."""
    if line_by_line:
        return DataError(f"The {split} split has no non-empty line; check text_column_name and the data file.")
    return DataError(f"The {split} split has fewer than max_seq_length={block_size} tokens in total, so grouping "
                     f"yields no block ({script} drops the remainder); lower max_seq_length, add data, or use "
                     f"line_by_line.")


def text_splits(raw, tokenizer, cfg) -> tuple[dict, str, int]:
    """The language-model tasks' start: the splits present, the text column (train's, else the first split's)
    and the block size (max_seq_length capped by the tokenizer's and the model's limits)."""
    d = cfg.data
    splits = present_splits(raw)
    first = splits.get("train", next(iter(splits.values())))
    text_column = find_text_column(column_names(first), d.text_column_name, string_columns(first))
    block_size = resolve_max_seq_length(d.max_seq_length, tokenizer.model_max_length,
                                        max_position_embeddings(cfg.model))
    return splits, text_column, block_size


def map_settings(ds, d, split: str) -> tuple[dict, Callable[[str], dict]]:
    """`datasets.map` keywords for a split (workers, cache) and its progress-bar label: a map on a stream runs
    lazily and has no cache, workers or progress bar."""
    if is_stream(ds):
        return {}, lambda step: {}
    return (dict(num_proc=d.preprocessing_num_workers, load_from_cache_file=not d.overwrite_cache),
            lambda step: {"desc": f"{step} ({split})"})


def tokenized_splits(splits: dict, tokenize: Callable, d, main_process_first: Callable, info: dict,
                     block_size: int, script: str) -> dict:
    """Each split as `tokenize(split, ds)` makes it (on the main process first: the others read its cache), cut
    to its max_*_samples. A split left with no example is an error; the example counts go into `info`."""
    limits = {"train": d.max_train_samples, "validation": d.max_eval_samples, "test": d.max_predict_samples}
    out = {}
    with main_process_first():
        for split, ds in splits.items():
            out[split] = first_rows(tokenize(split, ds), limits[split])
    for split, ds in out.items():
        if not is_stream(ds):
            info[f"{split}_examples"] = len(ds)
            if len(ds) == 0:
                raise empty_split_error(split, block_size, d.line_by_line, script)
    return out


def row_indices(ds) -> Optional[list[int]]:
    """The identifiers of a split's rows in a prediction file: their indices (None for a stream or no split)."""
    return list(range(len(ds))) if ds is not None and not is_stream(ds) else None
