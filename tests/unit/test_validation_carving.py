"""Carving validation out of train (validation_split_percentage): the sizes follow datasets' `train_test_split`,
and a split that would leave a part empty is one line naming the sizes and the fixes (issue 23, item 5)."""

from __future__ import annotations

import pytest

from scaletune.splits import carve_sizes, carve_validation
from scaletune.errors import DataError


@pytest.mark.parametrize("rows,percentage", [(1, 5), (2, 50), (2, 60), (3, 67), (10, 5), (20, 99), (96, 10)])
def test_carve_sizes_are_what_train_test_split_gives(rows, percentage):
    import datasets

    train = datasets.Dataset.from_dict({"x": list(range(rows))})
    kept, carved = carve_sizes(rows, percentage)
    try:
        split = train.train_test_split(test_size=percentage / 100, seed=0)
    except ValueError:  # datasets refuses an empty train part
        assert kept == 0
        return
    assert (len(split["train"]), len(split["test"])) == (kept, carved)


def test_a_carve_that_leaves_train_empty_names_the_sizes_and_the_fixes():
    import datasets

    with pytest.raises(DataError) as e:
        carve_validation(datasets.Dataset.from_dict({"x": [1, 2]}), 60, seed=0)
    assert str(e.value) == ("validation_split_percentage=60 of the 2 rows in train leaves 0 for training and 2 for "
                            "validation: add rows to train, set validation_split_percentage to at most 50, or set "
                            "validation_file.")
    with pytest.raises(DataError, match="of the 1 sentences in train leaves 0 for training and 1 for validation: "
                                        "add sentences to train, or set validation_file"):
        carve_validation(datasets.Dataset.from_dict({"x": [1]}), 5, seed=0, unit="sentences")


def test_a_carve_keeps_every_row_once():
    import datasets

    train, validation = carve_validation(datasets.Dataset.from_dict({"x": list(range(20))}), 10, seed=3)
    assert (len(train), len(validation)) == (18, 2)
    assert sorted([*train["x"], *validation["x"]]) == list(range(20))
