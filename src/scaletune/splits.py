"""Validation carved out of train when the data has none (`validation_split_percentage`): the sizes (datasets'
`train_test_split` rule), the refusal of a carve that would leave a part empty, and the rule for a stream.
data.py carves rows, tasks/conll.py sentences, both through `carve_validation`.
"""

from __future__ import annotations

import math

from .errors import DataError


def carve_validation_split(raw, percentage: int, seed: int, streaming: bool):
    """`raw` with a validation split carved out of its train split (validation_split_percentage)."""
    if streaming:
        # Every k-th row of the stream is validation (row 0 first), so validation is never empty, and train is
        # when the stream has one row: a stream is not counted, but its first two rows are read cheaply.
        k = max(2, round(100 / percentage))
        train = raw["train"]
        if sum(1 for _ in train.take(2)) < 2:
            raise DataError("The streamed train split holds fewer than 2 rows, so carving validation from it "
                            "(streaming=true: every k-th row) leaves training none: add rows to train, or set "
                            "validation_file.")
        raw["validation"] = train.filter(lambda _, i: i % k == 0, with_indices=True)
        raw["train"] = train.filter(lambda _, i: i % k != 0, with_indices=True)
        return raw
    raw["train"], raw["validation"] = carve_validation(raw["train"], percentage, seed)
    return raw


def carve_sizes(rows: int, percentage: int) -> tuple[int, int]:
    """(train, validation) sizes that carving `percentage`% of `rows` gives: datasets' `train_test_split` rule
    (the validation part rounded up)."""
    validation = math.ceil(rows * percentage / 100)
    return rows - validation, validation


def carve_validation(train, percentage: int, seed: int, unit: str = "rows"):
    """(train, validation) carved from a train split by a seeded shuffle; refused in one line, before the model
    loads, when a part would be empty (datasets would raise a ValueError from inside the run)."""
    rows = len(train)
    kept, carved = carve_sizes(rows, percentage)
    if rows and not (kept and carved):
        # the largest percentage that leaves training a row: validation = ceil(rows * p / 100) <= rows - 1
        most = (100 * (rows - 1)) // rows
        fix = f"set validation_split_percentage to at most {most}, " if most > 0 else ""
        raise DataError(f"validation_split_percentage={percentage} of the {rows} {unit} in train leaves {kept} for "
                        f"training and {carved} for validation: add {unit} to train, {fix}or set validation_file.")
    split = train.train_test_split(test_size=percentage / 100, seed=seed, shuffle=True)
    return split["train"], split["test"]
