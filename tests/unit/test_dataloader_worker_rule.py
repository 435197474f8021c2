"""DataLoader workers (issue 21, item 4): the auto rule (`dataloader_num_workers` unset), the loader it builds, and
that workers change neither the order nor the batches, from an epoch start or from a mid-epoch position.

Real runs with workers (exact resume, equal to a run without workers) are in tests/e2e/test_dataloader_workers.py.
"""

from __future__ import annotations

import pytest
import torch

from scaletune import data
from scaletune.config import ConfigError, load_config
from scaletune.data import WORKERS_CAP, build_dataloader, resolve_dataloader_workers


def _args(**kw):
    return load_config({"train_file": "x.csv", **kw}).training


def _workers(requested=None, cuda=True, cpus=32, processes_on_node=1, user_collator=False) -> int:
    return resolve_dataloader_workers(requested, cuda=cuda, cpus=cpus, processes_on_node=processes_on_node,
                                      user_collator=user_collator)[0]


def test_the_default_is_auto_and_an_explicit_value_is_checked():
    assert _args().dataloader_num_workers is None
    assert _args(dataloader_num_workers=0).dataloader_num_workers == 0
    with pytest.raises(ConfigError, match="dataloader_num_workers=-1 must be >= 0"):
        _args(dataloader_num_workers=-1)


def test_cpu_runs_keep_loading_in_the_main_process():
    assert _workers(cuda=False) == 0
    assert _workers(cuda=False, cpus=64) == 0


@pytest.mark.parametrize("cpus, processes, expected", [
    (64, 1, WORKERS_CAP),  # capped: more workers only add memory and start-up time
    (32, 8, 3),            # 4 CPUs per process: one for the training process, 3 for its workers
    (16, 8, 1),
    (8, 8, 0),             # one CPU per process: nothing to spare, load in the process
    (2, 1, 1),
    (1, 1, 0),
])
def test_cuda_workers_come_from_the_cpus_per_process(cpus, processes, expected):
    assert _workers(cpus=cpus, processes_on_node=processes) == expected


def test_an_explicit_number_is_kept_whatever_the_machine():
    assert _workers(0, cuda=True, cpus=64) == 0
    assert _workers(3, cuda=False) == 3
    assert _workers(16, cuda=True, cpus=2) == 16


def test_auto_loads_in_the_process_for_a_user_collator_and_says_why():
    workers, why = resolve_dataloader_workers(None, cuda=True, cpus=64, processes_on_node=1, user_collator=True)
    assert workers == 0
    assert "data_collator" in why and "dataloader_num_workers" in why
    assert resolve_dataloader_workers(2, cuda=True, cpus=64, processes_on_node=1, user_collator=True)[0] == 2


def test_the_machine_is_read_from_affinity_and_local_world_size(monkeypatch):
    """sched_getaffinity is what Slurm's cpuset allows this process; LOCAL_WORLD_SIZE the processes sharing it."""
    monkeypatch.setattr(data, "_has_gpu", lambda: True)
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    workers, why = data.dataloader_workers(_args())
    assert workers == 2
    assert "12 CPUs" in why and "4 processes" in why
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert data.dataloader_workers(_args())[0] == WORKERS_CAP
    assert data.dataloader_workers(_args(dataloader_num_workers=1))[0] == 1
    monkeypatch.setattr(data, "_has_gpu", lambda: False)
    assert data.dataloader_workers(_args())[0] == 0


def _dataset(n=42):
    import datasets

    return datasets.Dataset.from_dict({"input_ids": [[1] * (1 + i % 7) for i in range(n)], "idx": list(range(n))})


def _collate(rows):
    return {"idx": torch.tensor([r["idx"] for r in rows])}


def test_a_loader_with_workers_does_not_keep_them_across_epochs():
    loader = build_dataloader(_dataset(), _collate, 4, True, _args(), num_workers=2)
    assert loader.num_workers == 2
    # Persistent workers would draw the iterator's base seed from the global RNG once per run instead of once
    # per epoch (shifting dropout) and keep a stale copy of an epoch-seeded collator (docs/scale-out.md).
    assert loader.persistent_workers is False
    assert build_dataloader(_dataset(), _collate, 4, True, _args()).num_workers == 0  # CPU: auto is 0


def _epoch_ids(loader, epoch, skip=0, accelerator=None):
    loader.set_epoch(epoch)
    torch.manual_seed(epoch)  # the global RNG the iterator start draws from: the same for both loaders
    it = accelerator.skip_first_batches(loader, skip) if skip else loader
    ids = [b["idx"].tolist() for b in it]
    return ids, torch.random.get_rng_state()


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
def test_workers_see_the_same_batches_in_the_same_order_and_draw_the_same_rng(accelerator):
    """The seeded order (and a mid-epoch skip) is decided in the main process: workers only collate. The global
    RNG after an epoch (what dropout draws next) is the same too."""
    plain = accelerator.prepare(build_dataloader(_dataset(), _collate, 4, True, _args(), num_workers=0))
    workers = accelerator.prepare(build_dataloader(_dataset(), _collate, 4, True, _args(), num_workers=2))
    for epoch, skip in ((0, 0), (1, 0), (1, 3)):
        ids, rng = _epoch_ids(plain, epoch, skip, accelerator)
        ids_w, rng_w = _epoch_ids(workers, epoch, skip, accelerator)
        assert ids_w == ids
        assert torch.equal(rng_w, rng)
    assert _epoch_ids(plain, 0)[0] != _epoch_ids(plain, 1)[0]  # the order does change with the epoch
