"""Raw datasets (hub, local files, packaged) and dataloaders.

Tokenization is the task's job (`tasks/`); this module only finds the rows,
names the splits `train` / `validation` / `test`, carves validation out of
train when it is missing, and builds dataloaders.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import assets
from .errors import DataError

# File extension -> `datasets` builder (and its options).
_BUILDERS = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
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
    paths = {split: p for split, p in (("train", d.train_file), ("validation", d.validation_file),
                                        ("test", d.test_file)) if p is not None}
    for split, path in paths.items():
        if not os.path.isfile(path):
            raise DataError(f"{split}_file {path!r} does not exist.")
        if _has_no_rows(path):
            raise DataError(f"The {split} split is empty: {split}_file {path!r} holds no rows.")
    builders = {_builder_for(p)[0] for p in paths.values()}
    if len(builders) > 1:
        raise DataError(f"Data files mix formats ({', '.join(sorted(builders))}); use one format for all splits.")


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
            raw = datasets.load_dataset(d.dataset_name, d.dataset_config_name, cache_dir=m.cache_dir,
                                        streaming=streaming)
        if files:  # explicit files override the hub's splits
            extra = _load_files(files, m.cache_dir, streaming)
            for split in extra:
                raw[split] = extra[split]
    else:
        raw = _load_files(files, m.cache_dir, streaming)
    raw = datasets.DatasetDict(raw) if not streaming else datasets.IterableDatasetDict(raw)
    raw = _rename_splits(raw)
    if "train" not in raw and cfg.training.do_train:
        raise DataError(f"The dataset has no train split (splits: {', '.join(raw) or 'none'}); set train_file.")
    if "validation" not in raw and "train" in raw and d.validation_split_percentage > 0:
        raw = _carve_validation(raw, d.validation_split_percentage, cfg.training.seed, streaming)
    for split, limit in (("train", d.max_train_samples), ("validation", d.max_eval_samples),
                         ("test", d.max_predict_samples)):
        # MLM counts max_*_samples in blocks after grouping, as run_mlm.py (tasks/mlm.py truncates).
        if split in raw and limit is not None and d.task != "mlm":
            raw[split] = raw[split].take(limit) if streaming else raw[split].select(range(min(limit, len(raw[split]))))
    if not streaming:
        for split, ds in raw.items():
            if len(ds) == 0:
                raise DataError(f"The {split} split is empty; check the {split} data file or max_*_samples.")
    return raw


def _load_files(files: dict, cache_dir, streaming: bool):
    import datasets

    if not files:
        raise DataError("No data: set dataset_name, or train_file (and validation_file / test_file).")
    builder, options = _builder_for(next(iter(files.values())))
    for split, path in files.items():
        if not os.path.isfile(path):
            raise DataError(f"{split}_file {path!r} does not exist.")
    try:
        return datasets.load_dataset(builder, data_files=files, cache_dir=cache_dir, streaming=streaming, **options)
    except Exception as e:  # datasets wraps parser errors in several types
        raise DataError(f"Could not read the data files {files}: {e}") from e


def _rename_splits(raw):
    # Hub datasets name splits differently (`validation_matched`, `dev`); keep ours canonical.
    for alias, canonical in (("dev", "validation"), ("valid", "validation"), ("eval", "validation")):
        if alias in raw and canonical not in raw:
            raw[canonical] = raw.pop(alias)
    return raw


def _carve_validation(raw, percentage: int, seed: int, streaming: bool):
    if streaming:
        k = max(2, round(100 / percentage))
        train = raw["train"]
        raw["validation"] = train.filter(lambda _, i: i % k == 0, with_indices=True)
        raw["train"] = train.filter(lambda _, i: i % k != 0, with_indices=True)
        return raw
    split = raw["train"].train_test_split(test_size=percentage / 100, seed=seed, shuffle=True)
    raw["train"], raw["validation"] = split["train"], split["test"]
    return raw


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def build_dataloader(dataset, collator, batch_size: int, training: bool, args):
    from torch.utils.data import DataLoader

    # Shuffling goes through accelerate's seedable sampler (order = f(data_seed, epoch)), see distributed.py.
    # No generator of its own: starting an iterator draws a seed from the global RNG, as Trainer's loaders do,
    # so the dropout stream matches Trainer's (tests/test_parity_loss.py); loop.epoch_batches keeps that draw
    # out of a mid-epoch resume.
    is_iterable = not hasattr(dataset, "__len__")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=training and not is_iterable,
        collate_fn=collator,
        drop_last=training and args.dataloader_drop_last,
        num_workers=args.dataloader_num_workers,
        pin_memory=args.dataloader_pin_memory and _has_gpu(),  # pinning without a GPU only warns
    )
