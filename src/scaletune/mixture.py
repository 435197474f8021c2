"""`train_mixture`: several training sources mixed by weight into one train set, and the samples trained on from
each (the rules that need no data are `config.mixture`'s).

The sources are read one by one, their columns renamed (`columns`), classification labels compared, a source id
column added, and `datasets.interleave_datasets(probabilities=weights, seed=data_seed)` draws them into ONE
deterministic train set. Everything downstream treats it as one file: the seeded sampler (order = f(data seed,
epoch)), the exact mid-epoch resume and the resume on another process count. The position in the mixture is
therefore the sampler's position, saved in every checkpoint already.

A stream (`streaming: true`, the LM tasks) is interleaved the same way, lazily; it resumes by the stream's rule
(re-read from the start, the consumed batches skipped), and the seeded draws repeat, so the resumed run reads
the same rows. Its rows are cut into blocks that straddle sources, so per-source counts are not reported.

The per-source counts are derived from the data position, not counted as batches pass: the samples trained on
are the first batches of each epoch's order, which every rank computes alike (no collective) and which a
resumed run recomputes from the checkpoint's position (so they need no state of their own).
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Optional, Sequence

from . import assets
from .config.mixture import probabilities, source_names, stopping_strategy
from .errors import DataError, first_line

SOURCE_COLUMN = "mixture_source"
"""The source index of each mixed row; the tasks' tokenization drops every raw column, this one included."""


def mixed_train(cfg, streaming: bool, load_files: Callable):
    """The mixed train split (a Dataset, or an IterableDataset when streaming) with SOURCE_COLUMN.
    `load_files` is data.load_files (passed in: data calls this module)."""
    import datasets

    d = cfg.data
    names = source_names(d.train_mixture)
    parts = [_renamed(i, _load_source(source, cfg, streaming, load_files), source.get("columns"))
             for i, source in enumerate(d.train_mixture)]
    parts = _aligned(parts, names)
    if d.task == "classification" and not streaming:
        check_labels_agree({n: label_set(ds, d.label_column_name) for n, ds in zip(names, parts)}, d.label_column_name)
    parts = [ds.map(lambda _, i=i: {SOURCE_COLUMN: i}) if streaming else ds.add_column(SOURCE_COLUMN, [i] * len(ds))
             for i, ds in enumerate(parts)]
    seed = cfg.training.resolved_data_seed

    def mix(sources):
        return datasets.interleave_datasets(sources, probabilities=probabilities(d.train_mixture), seed=seed,
                                            stopping_strategy=stopping_strategy(d.train_mixture_stop,
                                                                                d.train_mixture_samples))

    mixed = mix(parts)
    n = d.train_mixture_samples
    if n is None:
        return mixed
    if streaming:
        return mixed.take(n)
    if len(mixed) < n:  # every source repeated, so that the weighted draws reach n before all are used up
        copies = math.ceil(n / len(mixed)) + 1
        mixed = mix([datasets.concatenate_datasets([ds] * copies) for ds in parts])
    return mixed.select(range(n))


def _load_source(source: dict, cfg, streaming: bool, load_files: Callable):
    import datasets

    if source.get("path") is not None:
        return load_files({"train": source["path"]}, cfg.model.cache_dir, streaming)["train"]
    name = source["name"]
    if assets.is_packaged(name):
        return load_files({"train": assets.dataset_files(name)["train"]}, cfg.model.cache_dir, streaming)["train"]
    try:
        return datasets.load_dataset(name, source.get("config"), split="train", cache_dir=cfg.model.cache_dir,
                                     streaming=streaming)
    except (ConnectionError, FileNotFoundError, ValueError) as e:
        raise DataError(f"train_mixture source name={name!r} could not be loaded (its train split): "
                        f"{first_line(e)}. Check the name and config, or give the source as a path.") from None


def _renamed(i: int, ds, columns: Optional[dict]):
    """The source with its columns renamed as `columns` says (applied before anything reads them)."""
    if not columns:
        return ds
    have = list(ds.column_names or [])
    missing = [c for c in columns if c not in have]
    if missing:
        raise DataError(f"train_mixture[{i}].columns renames {', '.join(map(repr, missing))}, which the source "
                        f"lacks; its columns: {', '.join(have)}.")
    return ds.rename_columns(columns)


def _aligned(parts: list, names: list[str]) -> list:
    """The sources with the columns they all have, each of one type: interleaving needs one schema. A column
    some sources lack is dropped (said once); a shared column of different types is refused. A stream whose
    columns are unknown until read is left to interleave_datasets."""
    if any(ds.column_names is None for ds in parts):
        return parts
    common = [c for c in parts[0].column_names if all(c in ds.column_names for ds in parts[1:])]
    dropped = sorted({c for ds in parts for c in ds.column_names} - set(common))
    if dropped:
        print(f"scaletune: train_mixture: column(s) {', '.join(dropped)} are not in every source and are not "
              f"trained on.", flush=True)
    parts = [ds.select_columns(common) for ds in parts]
    first = parts[0].features
    out = parts[:1]
    for name, ds in zip(names[1:], parts[1:]):
        if ds.features is not None and first is not None and ds.features != first:
            try:  # string vs large_string, int32 vs int64: the same values
                ds = ds.cast(first)
            except Exception:  # noqa: BLE001 (pyarrow's and datasets' kinds): the column is named below
                column = next(c for c in common if ds.features[c] != first[c])
                raise DataError(f"train_mixture: column {column!r} is {_kind(first[column])} in source "
                                f"{names[0]!r} and {_kind(ds.features[column])} in source {name!r}: give it one "
                                f"type in every source (or rename it away with `columns`).") from None
        out.append(ds)
    return out


def _kind(feature) -> str:
    return getattr(feature, "dtype", None) or type(feature).__name__


def label_set(ds, column: str) -> set[str]:
    """The labels a (map-style) source holds, as text; a ClassLabel's ids as its names."""
    if column not in ds.column_names:
        raise DataError(f"train_mixture: a source has no label column {column!r} (its columns: "
                        f"{', '.join(ds.column_names)}); rename one with the source's `columns`.")
    feature = ds.features[column]
    values = ds.unique(column)
    if hasattr(feature, "int2str"):
        values = [feature.int2str(v) for v in values if v is not None and v >= 0]
    return {str(v) for v in values if v is not None and str(v).strip() != ""}


def check_labels_agree(labels: dict[str, set[str]], column: str) -> None:
    """Classification sources train one head: every source must have the same label set."""
    names = list(labels)
    for name in names[1:]:
        if labels[name] != labels[names[0]]:
            a, b = names[0], name
            only_a, only_b = sorted(labels[a] - labels[b]), sorted(labels[b] - labels[a])
            raise DataError(f"train_mixture: sources {a!r} and {b!r} have different labels in {column!r} (only in "
                            f"{a!r}: {', '.join(only_a) or 'none'}; only in {b!r}: {', '.join(only_b) or 'none'}); "
                            f"give them one label set (map the labels in the data), or drop a source.")


def source_ids(raw_train):
    """Each mixed row's source (None for a stream or a train set not from a mixture)."""
    if not hasattr(raw_train, "__len__") or SOURCE_COLUMN not in (raw_train.column_names or ()):
        return None
    import numpy as np

    return np.asarray(raw_train[SOURCE_COLUMN], dtype=np.int64)


def counter(cfg, raw_train, prepared_train, say: Callable) -> Optional["MixtureCounts"]:
    """The per-source counter of a train_mixture run (its loader is set once prepared), or None: no mixture, a
    stream, or a task that does not keep one example per mixed row (text cut into blocks, dropped rows), said
    once."""
    if not cfg.data.train_mixture or raw_train is None or prepared_train is None:
        return None
    ids = source_ids(raw_train)
    if ids is None or not hasattr(prepared_train, "__len__") or len(prepared_train) != len(ids):
        say("scaletune: train_mixture: samples per source are not logged: the training examples are not the mixed "
            "rows one for one (a stream, text cut into blocks, or dropped rows).", flush=True)
        return None
    return MixtureCounts(source_names(cfg.data.train_mixture), ids, None)


def counts_of(indices: Sequence[int], ids: Sequence[int], sources: int) -> list[int]:
    """Samples per source among the given row indices (a row drawn twice counts twice)."""
    import numpy as np

    picked = np.asarray(ids, dtype=np.int64)[np.asarray(indices, dtype=np.int64)]
    return np.bincount(picked, minlength=sources).tolist()


class MixtureCounts:
    """The samples trained on from each source, a pure function of the data position (epochs completed,
    batches into the current one): the first `batches_in_epoch` batches of every rank's shard of that epoch's
    order, plus every whole epoch before. Exact under DDP, including accelerate's padding of an epoch's last
    round (each rank's shard is replayed); after a resume on another process count, the epochs completed
    before are recounted with this run's count (the same samples, unless an epoch end was padded). Host-only:
    no device work, no collective. Each epoch's order is replayed once into a table of running counts."""

    def __init__(self, names: list[str], ids, dataloader):
        import numpy as np

        self.names = names
        self.ids = np.asarray(ids, dtype=np.int64)
        self.dataloader = dataloader
        self._tables: dict[int, object] = {}  # epoch -> running counts after k batches per rank, (batches + 1, sources)

    def metrics(self, state) -> dict:
        """`mixture_<source>_samples` at this position."""
        import numpy as np

        total = sum((self._table(e)[-1] for e in range(state.epochs_completed)), np.zeros(len(self.names), np.int64))
        if state.batches_in_epoch:
            total = total + self._table(state.epochs_completed)[state.batches_in_epoch]
        return {f"mixture_{n}_samples": int(c) for n, c in zip(self.names, total)}

    def summary(self, state) -> str:
        """The end screen's line: each source's samples and share."""
        counts = self.metrics(state)
        total = sum(counts.values()) or 1
        return "  ".join(f"{n} {c} ({100 * c / total:.1f}%)" for n, c in zip(self.names, counts.values()))

    def _table(self, epoch: int):
        import numpy as np

        if epoch not in self._tables:
            shards = epoch_shards(self.dataloader, epoch)
            table = np.zeros((max(len(s) for s in shards) + 1, len(self.names)), dtype=np.int64)
            for shard in shards:
                rows = np.fromiter((i for batch in shard for i in batch), dtype=np.int64)
                ordinal = np.repeat(np.arange(1, len(shard) + 1), [len(batch) for batch in shard])
                np.add.at(table, (ordinal, self.ids[rows]), 1)
            self._tables = {epoch: np.cumsum(table, axis=0),  # the current epoch's, and the whole ones' totals
                            **{e: t[-1:] for e, t in self._tables.items()}}
        return self._tables[epoch]


def epoch_shards(dataloader, epoch: int) -> list[list[list[int]]]:
    """Every rank's batches (row indices) of one epoch of a prepared training loader, replayed on copies of its
    samplers: the loader's own sampler, and its position, are not touched."""
    from accelerate.data_loader import BatchSamplerShard

    batch_sampler = dataloader.batch_sampler
    shard = batch_sampler if isinstance(batch_sampler, BatchSamplerShard) else None

    def replay():  # a fresh copy each time: the seedable sampler moves to the next epoch when iterated through
        inner = copy.copy(shard.batch_sampler if shard is not None else batch_sampler)
        inner.sampler = copy.copy(inner.sampler)
        if hasattr(inner.sampler, "generator") and hasattr(inner.sampler, "initial_seed"):
            inner.sampler.generator = None  # accelerate's seedable sampler makes a fresh one seeded from (seed, epoch)
        if hasattr(inner.sampler, "set_epoch"):
            inner.sampler.set_epoch(epoch)
        return inner

    if shard is None:
        return [list(replay())]
    return [list(BatchSamplerShard(replay(), shard.num_processes, rank, split_batches=shard.split_batches,
                                   even_batches=shard.even_batches)) for rank in range(shard.num_processes)]
