"""Weighted training mixtures (issue #23, item 2): the config rules (each bad input one line), the label agreement of
classification sources, the mixed set's shares (real packaged:rotten_tomatoes text), and the per-source counts
derived from a loader's batches (1 and 2 ranks, accelerate's own shards)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scaletune import assets
from scaletune.config import load_config
from scaletune.config.mixture import source_names
from scaletune.data import check_files, load_raw_datasets
from scaletune.errors import ConfigError, DataError
from scaletune.mixture import SOURCE_COLUMN, MixtureCounts, check_labels_agree, counts_of, epoch_shards
from scaletune.state import TrainingState

A, B = {"path": "a.csv", "weight": 0.7}, {"path": "b.jsonl", "weight": 0.3}


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("values, fragment", [
    ({"train_mixture": [A, {**B, "weight": 0}]}, "train_mixture[1].weight=0 must be a positive number"),
    ({"train_mixture": [A, {**B, "weight": -1}]}, "train_mixture[1].weight=-1 must be a positive number"),
    ({"train_mixture": [A, {**B, "weight": "0.3"}]}, "train_mixture[1].weight='0.3' must be a positive number"),
    ({"train_mixture": [A, {"weight": 1}]}, "train_mixture[1] has neither path nor name"),
    ({"train_mixture": [{**A, "name": "packaged:rotten_tomatoes"}]}, "train_mixture[0] has both path and name"),
    ({"train_mixture": [A, B], "train_mixture_stop": "longest"}, "train_mixture_stop='longest' is not one of"),
    ({"train_mixture": [A, B], "train_file": "t.csv"}, "train_mixture and train_file are both set"),
    ({"train_mixture": [A, B], "dataset_name": "packaged:bbc_news"}, "train_mixture and dataset_name are both set"),
    ({"train_mixture": [A, {**B, "wieght": 1}]}, "train_mixture[1] has unknown key(s) 'wieght'"),
    ({"train_mixture": [A, {**B, "columns": ["text"]}]}, "train_mixture[1].columns=['text'] must map"),
    ({"train_mixture": []}, "train_mixture must be a non-empty list"),
    ({"train_mixture": [A, B], "train_mixture_stop": "all_exhausted", "train_mixture_samples": 10},
     "train_mixture_stop and train_mixture_samples are both set"),
    ({"train_mixture_samples": 10}, "without train_mixture"),
])
def test_bad_mixture_config_is_one_line(values, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(values)
    assert fragment in _one_line(e)


def test_the_key_has_no_command_line_form():
    with pytest.raises(ConfigError) as e:
        load_config(["--train_mixture", "a=a.csv,b=b.csv"])
    assert "YAML/JSON config file (no command-line form)" in _one_line(e)


def test_a_missing_source_file_is_named_before_anything_loads(tmp_path):
    (tmp_path / "a.csv").write_text("text,label\ngood,pos\n")
    cfg = load_config({"train_mixture": [{"path": str(tmp_path / "a.csv"), "weight": 1},
                                         {"path": str(tmp_path / "gone.csv"), "weight": 1}]})
    with pytest.raises(DataError) as e:
        check_files(cfg)
    assert _one_line(e) == f"train_mixture[1].path {str(tmp_path / 'gone.csv')!r} does not exist."


def test_source_names_are_log_safe_and_unique():
    assert source_names([{"path": "d/news 2024.csv"}, {"name": "packaged:rotten_tomatoes"},
                         {"path": "x/news 2024.jsonl"}, {"name": "glue", "config": "sst2"}]) == [
        "news_2024", "rotten_tomatoes", "news_2024_2", "glue_sst2"]


def test_labels_that_differ_stop_the_run_naming_both_sources_and_labels():
    check_labels_agree({"a": {"neg", "pos"}, "b": {"pos", "neg"}}, "label")
    with pytest.raises(DataError) as e:
        check_labels_agree({"a": {"neg", "pos"}, "b": {"negative", "pos"}}, "label")
    assert _one_line(e) == ("train_mixture: sources 'a' and 'b' have different labels in 'label' (only in 'a': neg; "
                            "only in 'b': negative); give them one label set (map the labels in the data), or drop "
                            "a source.")


def test_label_refusal_comes_after_the_column_mapping_and_before_tokenization(tmp_path):
    pd.DataFrame({"text": ["good", "bad"], "label": ["fresh", "rotten"]}).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame({"review": ["fine", "dull"], "stars": ["fresh", "stale"]}).to_json(
        tmp_path / "b.jsonl", orient="records", lines=True)
    mixture = [{"path": str(tmp_path / "a.csv"), "weight": 1},
               {"path": str(tmp_path / "b.jsonl"), "weight": 1, "columns": {"review": "text", "stars": "label"}}]
    with pytest.raises(DataError) as e:
        load_raw_datasets(load_config({"train_mixture": mixture, "validation_split_percentage": 0}))
    assert "sources 'a' and 'b' have different labels in 'label' (only in 'a': rotten; only in 'b': stale)" in \
        _one_line(e)


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> str:
    """packaged:rotten_tomatoes' validation and test rows (2562) as JSONL under other column names: a second real
    source with the same labels, aligned by `columns`."""
    source = assets.dataset_files("packaged:rotten_tomatoes")
    path = tmp_path_factory.mktemp("mixture") / "reviews.jsonl"
    rows = pd.concat([pd.read_csv(source["validation"]), pd.read_csv(source["test"])])
    rows.rename(columns={"text": "review", "label": "stars"}).to_json(path, orient="records", lines=True)
    return str(path)


def _mixture(reviews, **extra):
    return load_config({"train_mixture": [{"name": "packaged:rotten_tomatoes", "weight": 0.7},
                                          {"path": reviews, "weight": 0.3,
                                           "columns": {"review": "text", "stars": "label"}}],
                        "validation_split_percentage": 0, **extra})


def test_a_70_30_mixture_draws_within_2_percent_of_the_weights(reviews):
    train = load_raw_datasets(_mixture(reviews))["train"]
    ids = np.asarray(train[SOURCE_COLUMN])
    # 2000 draws: the binomial standard deviation of a 30% share is 1.0 point, so 2 points is 2 sd; the whole set
    # (first_exhausted ends when the 2562 reviews are used up, ~8500 rows) has sd 0.5 points.
    assert abs(ids[:2000].mean() - 0.3) < 0.02
    assert len(train) > 8000 and abs(ids.mean() - 0.3) < 0.02
    assert set(train.column_names) == {"id", "text", "label", SOURCE_COLUMN}
    again = load_raw_datasets(_mixture(reviews))["train"]  # seeded: the same set every time, on every rank
    assert again["id"][:500] == train["id"][:500]
    other_seed = load_raw_datasets(_mixture(reviews, data_seed=1))["train"]
    assert other_seed["id"][:500] != train["id"][:500]


def test_a_fixed_number_of_samples_oversamples_and_cuts(reviews):
    train = load_raw_datasets(_mixture(reviews, train_mixture_samples=30000))["train"]
    ids = np.asarray(train[SOURCE_COLUMN])
    assert len(train) == 30000 and abs(ids.mean() - 0.3) < 0.02  # more than both sources hold: they start again


def test_counts_over_a_known_index_sequence():
    ids = [0, 1, 1, 0, 2, 0]
    assert counts_of([0, 1, 2, 3], ids, 3) == [2, 2, 0]
    assert counts_of([5, 5, 4], ids, 3) == [2, 0, 1]  # a row drawn twice counts twice
    assert counts_of([], ids, 3) == [0, 0, 0]


@pytest.mark.parametrize("processes", [1, 2])
def test_counts_follow_the_data_position_over_each_rank_shard(processes):
    """The counts are those of the batches each rank's prepared loader yields (accelerate's seedable sampler and
    its shards, the padded last round included), whole epochs and the current one's first batches."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    rows, batch = 21, 4
    ids = np.random.default_rng(0).integers(0, 2, rows)
    loaders = [prepare_data_loader(DataLoader(list(range(rows)), batch_size=batch, shuffle=True),
                                   num_processes=processes, process_index=rank, put_on_device=False,
                                   use_seedable_sampler=True, data_seed=5) for rank in range(processes)]
    counter = MixtureCounts(["a", "b"], ids, loaders[0])
    seen = []
    for epoch in range(2):
        per_rank = []
        for loader in loaders:
            loader.set_epoch(epoch)
            per_rank.append([b.tolist() for b in loader])
        assert [[list(b) for b in shard] for shard in epoch_shards(loaders[0], epoch)] == per_rank
        for k in range(len(per_rank[0]) + 1):
            position = TrainingState(epochs_completed=epoch, batches_in_epoch=k)
            now = seen + [i for shard in per_rank for b in shard[:k] for i in b]
            expected = {"mixture_a_samples": int(np.sum(ids[now] == 0)), "mixture_b_samples": int(np.sum(ids[now] == 1))}
            assert counter.metrics(position) == expected
        seen += [i for shard in per_rank for b in shard for i in b]
    assert counter.metrics(TrainingState(epochs_completed=2))["mixture_a_samples"] == int(np.sum(ids[seen] == 0))
    assert len(seen) == 2 * (rows if processes == 1 else 24)  # 2 ranks: the last round of 2 x 4 padded to 24


def test_a_stream_is_mixed_lazily_with_the_same_seeded_draws(reviews):
    """streaming (the LM tasks): the mixed stream is an IterableDataset whose draws repeat for a seed, which is what
    the stream's resume (re-read, consumed batches skipped) needs to read the same rows again."""
    import itertools

    cfg = _mixture(reviews, task="mlm", streaming=True, max_steps=5)
    first = list(itertools.islice(load_raw_datasets(cfg, streaming=True)["train"], 300))
    again = list(itertools.islice(load_raw_datasets(cfg, streaming=True)["train"], 300))
    assert first == again and not hasattr(load_raw_datasets(cfg, streaming=True)["train"], "__len__")
    share = np.mean([row[SOURCE_COLUMN] for row in first])
    assert abs(share - 0.3) < 0.08  # 300 draws: sd 2.6 points, 3 sd


def test_a_mixture_next_to_datasets_given_to_run_is_refused(reviews):
    import datasets

    from scaletune.dropin import UserParts
    from scaletune.preflight import preflight

    user = UserParts(train_dataset=datasets.Dataset.from_dict({"text": ["a"], "label": ["fresh"]}))
    with pytest.raises(ConfigError) as e:
        preflight(_mixture(reviews), user)
    assert "train_mixture is set and run() was given datasets" in _one_line(e)
