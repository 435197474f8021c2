"""Raw datasets (hub, local files, packaged) and dataloaders.

Tokenization is the task's job (`tasks/`); this module only finds the rows,
names the splits `train` / `validation` / `test`, carves validation out of
train when it is missing, and builds dataloaders.
"""

from __future__ import annotations

import codecs
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from . import assets
from .errors import DataError, ScaletuneError, first_line
from .mixture import mixed_train
from .model_source import DATASETS_OFFLINE, hub_offline
from .splits import carve_validation_split

# File extension -> `datasets` builder (and its options).
_BUILDERS = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
    ".conll": ("text", {}),  # token classification re-reads CoNLL files as sentences (tasks/token_classification)
}


def _builder_for(path: str):
    suffix = Path(path).suffix.lower()
    if suffix not in _BUILDERS:
        raise DataError(f"Data file {path!r} has extension {suffix!r}; supported: {', '.join(_BUILDERS)}.")
    return _BUILDERS[suffix]


def data_files(cfg) -> dict[str, str]:
    """Local files per split: packaged datasets resolved to their CSVs, then explicit files (which win)."""
    d = cfg.data
    files: dict[str, str] = {}
    if assets.is_packaged(d.dataset_name):
        files.update(assets.dataset_files(d.dataset_name))
    for split, path in (("train", d.train_file), ("validation", d.validation_file), ("test", d.test_file)):
        if path is not None:
            files[split] = path
    return files


def check_files(cfg) -> None:
    """Fail in milliseconds on missing or unsupported files, before torch or the model is loaded."""
    d = cfg.data
    # (what the data is, the key that names the file) -> path
    paths = {(f"{split} split", f"{split}_file"): p for split, p in (("train", d.train_file),
                                                                     ("validation", d.validation_file),
                                                                     ("test", d.test_file)) if p is not None}
    paths.update({(f"validation set {name!r}", f"validation_files[{name!r}]"): p
                  for name, p in (d.validation_files or {}).items()})
    paths.update({(f"train mixture source {i}", f"train_mixture[{i}].path"): s["path"]
                  for i, s in enumerate(d.train_mixture or ()) if s.get("path") is not None})
    for (what, key), path in paths.items():
        if not os.path.isfile(path):
            raise DataError(f"{key} {path!r} does not exist.")
        _check_utf8(key, path)
        if _has_no_rows(path):
            raise DataError(f"The {what} is empty: {key} {path!r} holds no rows.")
    # A mixture's sources are read one by one (scaletune.mixture): they may mix formats, the splits may not.
    builders = {_builder_for(p)[0] for (_, key), p in paths.items() if not key.startswith("train_mixture")}
    if len(builders) > 1:
        raise DataError(f"Data files mix formats ({', '.join(sorted(builders))}); use one format for all splits.")
    name = d.dataset_name
    if name and not assets.is_packaged(name) and not os.path.isdir(name) and hub_offline(DATASETS_OFFLINE):
        import datasets

        with _hub_dataset(d):  # offline, the cache answers at once: said before the output dir is made
            datasets.load_dataset_builder(name, d.dataset_config_name, cache_dir=cfg.model.cache_dir)


@contextmanager
def _hub_dataset(d):
    """A Hub dataset that cannot be had (offline and not cached, a wrong name or config) is one line."""
    try:
        yield
    except (ConnectionError, FileNotFoundError, ValueError) as e:
        if isinstance(e, ScaletuneError):
            raise
        which = d.dataset_name + (f" ({d.dataset_config_name})" if d.dataset_config_name else "")
        offline = " The Hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): it must be in the datasets cache." \
            if hub_offline(DATASETS_OFFLINE) else ""
        raise DataError(f"dataset_name={which!r} could not be loaded: {first_line(e)}.{offline} Check the name and "
                        f"config, or use train_file.") from None


def _check_utf8(key: str, path: str) -> None:
    """Text formats are read as UTF-8 (as `datasets` does): say so, naming the encoding problem, before loading."""
    if Path(path).suffix.lower() == ".parquet":
        return
    offset = 0
    with open(path, "rb") as f:
        decoder = codecs.getincrementaldecoder("utf-8")()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise DataError(f"{key} {path!r} is not UTF-8 (byte {offset + e.start}: 0x{chunk[e.start]:02x}); "
                                f"convert it, e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`.") from None
            offset += len(chunk)


def _has_no_rows(path: str) -> bool:
    """Cheap check on text formats (header-only CSV, blank JSONL/txt, `[]`); binary formats pass."""
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        return False
    with open(path, errors="replace") as f:
        lines = []
        for line in f:
            if line.strip():
                lines.append(line.strip())
            if len(lines) >= 2:
                break
    if suffix in (".csv", ".tsv"):
        return len(lines) < 2  # a header alone
    return not lines or lines[0] in ("[]", "{}")


def load_raw_datasets(cfg, streaming: bool = False):
    """A `DatasetDict` with `train` and, where available, `validation` and `test`."""
    import datasets

    d, m = cfg.data, cfg.model
    files = data_files(cfg)
    if d.dataset_name is not None and not assets.is_packaged(d.dataset_name):
        if os.path.isdir(d.dataset_name) and (Path(d.dataset_name) / "dataset_dict.json").exists():
            raw = datasets.load_from_disk(d.dataset_name)  # a `save_to_disk` folder
        else:
            # Hub name (`imdb`, `glue`+`cola`) or a local folder / script, exactly as run_classification.py.
            with _hub_dataset(d):
                raw = datasets.load_dataset(d.dataset_name, d.dataset_config_name, cache_dir=m.cache_dir,
                                            streaming=streaming)
        if files:  # explicit files override the hub's splits
            extra = load_files(files, m.cache_dir, streaming)
            for split in extra:
                raw[split] = extra[split]
    else:
        raw = load_files(files, m.cache_dir, streaming) if files or not d.train_mixture else {}
    if d.train_mixture:
        raw["train"] = mixed_train(cfg, streaming, load_files)
    raw = datasets.DatasetDict(raw) if not streaming else datasets.IterableDatasetDict(raw)
    raw = _rename_splits(raw)
    if d.validation_files:  # they replace the dataset's validation split, and nothing is carved from train
        raw.pop("validation", None)
    _check_one_type(raw, d)
    if "train" not in raw and cfg.training.do_train:
        raise DataError(f"The dataset has no train split (splits: {', '.join(raw) or 'none'}); set train_file.")
    if "validation" not in raw and "train" in raw and d.validation_split_percentage > 0 and not d.validation_files:
        raw = carve_validation_split(raw, d.validation_split_percentage, cfg.training.seed, streaming)
    for split, limit in (("train", d.max_train_samples), ("validation", d.max_eval_samples),
                         ("test", d.max_predict_samples)):
        # MLM counts max_*_samples in blocks after grouping, as run_mlm.py (tasks/mlm.py truncates).
        if split in raw and limit is not None and d.task not in ("mlm", "clm"):
            raw[split] = raw[split].take(limit) if streaming else raw[split].select(range(min(limit, len(raw[split]))))
    if not streaming:
        for split, ds in raw.items():
            if len(ds) == 0:
                raise DataError(f"The {split} split is empty; check the {split} data file or max_*_samples.")
    return raw


def _check_one_type(raw, d) -> None:
    """A JSON column whose rows hold values of different types (1 and "neg") is read as datasets' `Json` feature
    (any JSON value), which no task can read: pyarrow would fail inside the task with a traceback. Checked for
    the columns the config names (another column's types are no concern of the run)."""
    named = {d.label_column_name, *(c.strip() for c in (d.text_column_names or "").split(","))}
    for split, ds in raw.items():
        for column, feature in (getattr(ds, "features", None) or {}).items():
            if column in named and type(feature).__name__ == "Json":
                kinds = sorted({type(v).__name__ for v in ds[:1000][column]}) if hasattr(ds, "__len__") else []
                raise DataError(f"The {column!r} column of the {split} split mixes value types"
                                f"{' (' + ', '.join(kinds) + ')' if kinds else ''}: give every row the same type "
                                f"(labels all strings or all integers).")


def load_files(files: dict, cache_dir, streaming: bool):
    """{split: local file} as a DatasetDict (or streams): the one reader of local files, by their extension."""
    import datasets

    if not files:
        raise DataError("No data: set dataset_name, or train_file (and validation_file / test_file).")
    builder, options = _builder_for(next(iter(files.values())))
    for split, path in files.items():
        if not os.path.isfile(path):
            raise DataError(f"{split}_file {path!r} does not exist.")
    try:
        with _builder_errors_quiet():
            return datasets.load_dataset(builder, data_files=files, cache_dir=cache_dir, streaming=streaming,
                                         **options)
    except Exception as e:  # datasets wraps the parser's error (pandas, pyarrow) in its own kinds: say the parser's
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        raise DataError(f"Could not read the data files {files}: {first_line(cause)}") from None


@contextmanager
def _builder_errors_quiet():
    """datasets' builders log a parse failure ("Failed to read file ...") before raising it: the raised error
    is the one line the user gets, so that log is held back."""
    import logging

    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _rename_splits(raw):
    # Hub datasets name splits differently (`validation_matched`, `dev`); keep ours canonical.
    for alias, canonical in (("dev", "validation"), ("valid", "validation"), ("eval", "validation")):
        if alias in raw and canonical not in raw:
            raw[canonical] = raw.pop(alias)
    return raw


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def sequence_lengths(dataset, column: str = "input_ids"):
    """Token count of every row (numpy int64), read from the Arrow column without decoding the rows."""
    import numpy as np

    if hasattr(dataset, "with_format") and column in getattr(dataset, "column_names", ()):
        import pyarrow.compute as pc

        # with_format("arrow") honours a select()/shuffle() indices mapping; list_value_length is vectorised.
        return pc.list_value_length(dataset.with_format("arrow")[column]).to_numpy(zero_copy_only=False).astype(
            np.int64)
    return np.asarray([len(row[column]) for row in dataset], dtype=np.int64)


def length_grouped_indices(lengths, batch_size: int, seed: int, epoch: int,
                           mega_batch_mult: Optional[int] = None) -> list[int]:
    """One epoch's order: shuffled, cut into mega-batches, each sorted by length (longest first), and the
    longest sample moved to the very first position. A pure function of its arguments.

    Same recipe as transformers' `get_length_grouped_indices` (so the batches are as homogeneous as
    Trainer's), but the shuffle is drawn from (seed, epoch) instead of torch's global RNG: a resumed run
    replays the epoch's order exactly and every rank computes the same order without communicating.
    The longest sample first makes an out-of-memory batch fail in the first step, not hours in.
    """
    import numpy as np

    lengths = np.asarray(lengths)
    n = len(lengths)
    if n == 0:
        return []
    if mega_batch_mult is None:
        # Trainer's default: 50 batches, or fewer so that there are at least 4 mega-batches to shuffle.
        mega_batch_mult = max(1, min(n // (batch_size * 4), 50))
    order = np.random.default_rng([seed, epoch]).permutation(n)
    size = mega_batch_mult * batch_size
    megas = []
    for start in range(0, n, size):
        chunk = order[start:start + size]
        # Stable on ties: the shuffled order decides among equal lengths, so ties are not biased by index.
        megas.append(chunk[np.argsort(-lengths[chunk], kind="stable")])
    longest = int(np.argmax([lengths[m[0]] for m in megas]))
    megas[0][0], megas[longest][0] = megas[longest][0], megas[0][0]
    return np.concatenate(megas).tolist()


class LengthGroupedSampler:
    """`train_sampling_strategy: group_by_length`: batches of similar length, in an order that is a pure
    function of (data seed, epoch).

    The loop calls `set_epoch` on the prepared dataloader each epoch, which accelerate forwards here; a
    mid-epoch resume skips whole batches at the batch-sampler level (`skip_first_batches`), so it sees the
    same order. Under DDP accelerate shards the batches of this one order round-robin over the ranks, which
    is why every rank must compute the identical order.
    """

    def __init__(self, lengths, batch_size: int, seed: int, mega_batch_mult: Optional[int] = None):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(length_grouped_indices(self.lengths, self.batch_size, self.seed, self.epoch,
                                           self.mega_batch_mult))


WORKERS_CAP = 4
"""Most DataLoader workers per process that `dataloader_num_workers` unset gives. The data is tokenized once
before training; a worker only pads (and masks) a batch, and with torch's prefetch (2 batches per
worker) 4 workers keep 8 batches ready: on an H200, BERT-base s128 b64 waited 0.9% of its step with
4 workers, against 16% in the process (issue 21). More workers add only host memory (each is a forked copy)
and start-up time at each epoch and evaluation."""


def resolve_dataloader_workers(requested: Optional[int], *, cuda: bool, cpus: int, processes_on_node: int,
                               user_collator: bool = False) -> tuple[int, Optional[str]]:
    """DataLoader workers per process, and why when the number was chosen here (None when it was given).

    Unset (auto): on CUDA, the CPUs this process may use shared among the processes on its node, one kept for
    the training process itself (it launches the GPU work), at most WORKERS_CAP; on CPU, 0 as before (workers
    would take the cores the training itself computes on). A user's `data_collator` keeps 0: its randomness
    (if any) would then come from the workers' RNG, so a resumed run would not draw what the uninterrupted
    one drew.
    """
    if requested is not None:
        return requested, None
    if not cuda:
        return 0, None
    if user_collator:
        return 0, ("0 (run() was given a data_collator, whose randomness workers would make differ on a resume; "
                   "set dataloader_num_workers to use workers with it)")
    workers = max(0, min(WORKERS_CAP, cpus // max(1, processes_on_node) - 1))
    sharing = f"{processes_on_node} processes" if processes_on_node > 1 else "1 process"
    return workers, f"{workers} per process (auto: {cpus} CPUs for {sharing} on this node)"


def dataloader_workers(args, user_collator: bool = False) -> tuple[int, Optional[str]]:
    """`resolve_dataloader_workers` for this process: the CPUs it may use (its affinity, which is what Slurm's
    cpuset or `taskset` allows; the machine's count where that cannot be read) and LOCAL_WORLD_SIZE."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no sched_getaffinity
        cpus = os.cpu_count() or 1
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return resolve_dataloader_workers(args.dataloader_num_workers, cuda=_has_gpu(), cpus=cpus,
                                      processes_on_node=processes, user_collator=user_collator)


def build_dataloader(dataset, collator, batch_size: int, training: bool, args, num_workers: Optional[int] = None):
    """A training or evaluation loader; `num_workers` as `dataloader_workers` resolved it (resolved here when
    not given)."""
    from torch.utils.data import DataLoader

    if num_workers is None:
        num_workers = dataloader_workers(args)[0]
    is_iterable = not hasattr(dataset, "__len__")
    sampler = None
    if training and not is_iterable and args.train_sampling_strategy == "group_by_length":
        sampler = LengthGroupedSampler(sequence_lengths(dataset), batch_size, args.resolved_data_seed)
    # Otherwise shuffling goes through accelerate's seedable sampler (order = f(data_seed, epoch)), see
    # distributed.py. No generator of its own: starting an iterator draws a seed from the global RNG, as
    # Trainer's loaders do, so the dropout stream matches Trainer's (tests/parity/test_parity_loss.py);
    # stepper.without_rng_draw keeps that draw out of a mid-epoch resume. The length-grouped sampler draws
    # nothing from the global RNG, but the iterator start still does, so that stays equal too.
    # Workers only collate: the sampler (the order, a resume's skip) stays in this process, and each iterator
    # start draws the one seed it draws without workers, so runs with and without workers are identical.
    # Not persistent, on purpose (as Trainer's default): a persistent iterator draws that seed once per run,
    # not once per epoch, which would shift the dropout stream against a run resumed at an epoch start, and
    # its workers would keep the collator as it was at the first epoch (MLM masks re-drawn per epoch by
    # `set_epoch` would not be). The cost is starting the workers again at each epoch and evaluation.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=training and not is_iterable and sampler is None,
        sampler=sampler,
        collate_fn=collator,
        drop_last=training and args.dataloader_drop_last,
        num_workers=num_workers,
        pin_memory=args.dataloader_pin_memory and _has_gpu(),  # pinning without a GPU only warns
        persistent_workers=False,
    )
