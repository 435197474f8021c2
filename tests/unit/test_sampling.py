"""Length-grouped sampling (`train_sampling_strategy: group_by_length`): the order, its purity in (seed, epoch),
and what accelerate does with it (set_epoch forwarding, skip_first_batches for a mid-epoch resume).

The 2-process DDP sharding and an exact resume of a real run are in tests/e2e/test_perf_features.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from scaletune.config import ConfigError, load_config
from scaletune.data import LengthGroupedSampler, build_dataloader, length_grouped_indices, sequence_lengths

BATCH = 4


@pytest.fixture
def lengths() -> np.ndarray:
    return np.random.default_rng(3).integers(5, 500, size=203)


def padded_tokens(lengths, order, batch=BATCH) -> int:
    return sum(int(lengths[order[i:i + batch]].max()) * len(order[i:i + batch]) for i in range(0, len(order), batch))


def test_order_is_a_permutation_and_a_pure_function_of_seed_and_epoch(lengths):
    order = length_grouped_indices(lengths, BATCH, seed=7, epoch=0)
    assert sorted(order) == list(range(len(lengths)))
    assert length_grouped_indices(lengths, BATCH, seed=7, epoch=0) == order  # no global RNG involved
    assert length_grouped_indices(lengths, BATCH, seed=7, epoch=1) != order
    assert length_grouped_indices(lengths, BATCH, seed=8, epoch=0) != order
    # (seed, epoch) are hashed together: seed 7 epoch 1 is not seed 8 epoch 0.
    assert length_grouped_indices(lengths, BATCH, seed=7, epoch=1) != length_grouped_indices(lengths, BATCH, 8, 0)


def test_batches_hold_similar_lengths_and_the_longest_comes_first(lengths):
    order = length_grouped_indices(lengths, BATCH, seed=0, epoch=0)
    shuffled = np.random.default_rng(0).permutation(len(lengths))
    assert padded_tokens(lengths, order) < 0.75 * padded_tokens(lengths, shuffled)
    assert lengths[order[0]] == lengths.max()  # an out-of-memory batch fails in the first step
    mult = min(len(lengths) // (BATCH * 4), 50)
    mega = mult * BATCH
    for start in range(mega, len(order), mega):  # after the first, each mega-batch is sorted, longest first
        chunk = lengths[order[start:start + mega]]
        assert list(chunk[1:]) == sorted(chunk[1:], reverse=True)


def test_every_mega_batch_is_shuffled_in_not_sorted_globally(lengths):
    order = length_grouped_indices(lengths, BATCH, seed=0, epoch=0)
    # A global sort would make the epoch's lengths monotone; mega-batches keep randomness across the epoch.
    assert list(lengths[order]) != sorted(lengths, reverse=True)


def test_tiny_and_empty_datasets():
    assert length_grouped_indices([3], BATCH, 0, 0) == [0]
    assert length_grouped_indices([], BATCH, 0, 0) == []
    assert sorted(length_grouped_indices([1, 5, 2], 8, 0, 0)) == [0, 1, 2]


def test_sequence_lengths_read_arrow_and_honour_a_selection():
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in (3, 1, 4, 1, 5, 9, 2, 6)]})
    assert sequence_lengths(ds).tolist() == [3, 1, 4, 1, 5, 9, 2, 6]
    assert sequence_lengths(ds.select([5, 0, 7])).tolist() == [9, 3, 6]
    assert sequence_lengths([{"input_ids": [1, 2]}, {"input_ids": [1]}]).tolist() == [2, 1]


def _dataset(n=40, seed=0):
    import datasets

    rng = np.random.default_rng(seed)
    return datasets.Dataset.from_dict({"input_ids": [list(range(int(k))) for k in rng.integers(1, 60, size=n)],
                                       "idx": list(range(n))})


def _collate(rows):
    import torch

    return {"idx": torch.tensor([r["idx"] for r in rows]), "width": max(len(r["input_ids"]) for r in rows)}


def _args(**kw):
    return load_config({"train_file": "x.csv", "train_sampling_strategy": "group_by_length", "data_seed": 5,
                        **kw}).training


def _epoch(loader, epoch, skip=0, accelerator=None):
    loader.set_epoch(epoch)
    it = accelerator.skip_first_batches(loader, skip) if skip else loader
    return [b["idx"].tolist() for b in it]


def test_prepared_loader_follows_the_sampler_and_set_epoch(accelerator):
    ds = _dataset()
    loader = accelerator.prepare(build_dataloader(ds, _collate, BATCH, True, _args()))
    lengths = sequence_lengths(ds)
    for epoch in (0, 1, 0):
        batches = _epoch(loader, epoch)
        assert [i for b in batches for i in b] == length_grouped_indices(lengths, BATCH, 5, epoch)


def test_resume_mid_epoch_skips_to_the_same_batches(accelerator):
    """What the loop does on a mid-epoch resume: set_epoch, then skip_first_batches on the prepared loader."""
    loader = accelerator.prepare(build_dataloader(_dataset(), _collate, BATCH, True, _args()))
    full = _epoch(loader, 1)
    for skip in (1, 3, len(full) - 1):
        assert _epoch(loader, 1, skip, accelerator) == full[skip:]


def test_random_strategy_and_evaluation_loaders_keep_their_order(accelerator):
    ds = _dataset()
    random_loader = build_dataloader(ds, _collate, BATCH, True, _args(train_sampling_strategy="random"))
    assert not isinstance(random_loader.sampler, LengthGroupedSampler)
    eval_loader = build_dataloader(ds, _collate, BATCH, False, _args())
    assert [i for b in eval_loader for i in b["idx"].tolist()] == list(range(len(ds)))  # predictions keep row order


def test_ddp_shards_of_one_order_are_disjoint_and_cover_the_epoch():
    """accelerate's BatchSamplerShard hands the batches of the one (rank-independent) order out round-robin.
    The same with real processes: tests/e2e/test_perf_features.py."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    lengths = np.random.default_rng(1).integers(1, 90, size=64)
    shards = []
    for rank in (0, 1):
        sampler = LengthGroupedSampler(lengths, BATCH, seed=3)
        sampler.set_epoch(2)
        shards.append([i for b in BatchSamplerShard(BatchSampler(sampler, BATCH, False), 2, rank) for i in b])
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(64))


def test_config_choices_and_conflicts():
    assert load_config({"train_file": "x.csv"}).training.train_sampling_strategy == "random"
    with pytest.raises(ConfigError, match="train_sampling_strategy"):
        load_config({"train_file": "x.csv", "train_sampling_strategy": "sorted"})
    with pytest.raises(ConfigError, match="group_by_length needs every example's length"):
        load_config({"task": "mlm", "train_file": "x.txt", "streaming": True, "max_steps": 5,
                     "train_sampling_strategy": "group_by_length"})
    for task in ("classification", "regression", "multilabel"):  # the per-token tasks: test_padding_free_encoders
        with pytest.raises(ConfigError, match=f"padding_free=true is for the per-token tasks .*; task {task}'s "
                                              f".*group_by_length"):
            load_config({"task": task, "train_file": "x.txt", "padding_free": True})
    assert load_config({"task": "clm", "train_file": "x.txt", "padding_free": True}).data.padding_free
    with pytest.raises(ConfigError, match="attn_implementation=flash must be one of sdpa, .*flash_attention_2"):
        load_config({"train_file": "x.csv", "attn_implementation": "flash"})


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
def test_padding_free_with_the_users_own_collator_is_refused_before_any_work(tmp_path):
    from scaletune.train import run

    with pytest.raises(ConfigError, match="padding_free=true flattens .* data_collator"):
        run({"task": "clm", "train_file": "x.txt", "padding_free": True, "output_dir": str(tmp_path / "out")},
            data_collator=lambda rows: rows)
    assert not (tmp_path / "out").exists()


def test_recipes_group_by_length_where_lengths_vary():
    for recipe in ("bbc_news", "demo"):  # long articles / short reviews, cut at max_seq_length
        assert load_config(recipe).training.train_sampling_strategy == "group_by_length", recipe
    # Grouped MLM blocks all hold max_seq_length tokens: nothing to group.
    assert load_config("mlm_demo").training.train_sampling_strategy == "random"
