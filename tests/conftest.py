"""Test environment (offline W&B and Hub, one thread) and the shared fixtures: tiny real BERT models and the
toy sentiment CSVs (built by support/tiny.py).

Layout: unit/ runs in seconds; e2e/ (training runs), parity/ (against transformers.Trainer) and cluster/
(a real Slurm) are all marked `slow` here, by folder, so `pytest -m "not slow" tests` is unit/ less the few
unit tests marked `slow` by hand (a race of hundreds of processes).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support.tiny import make_tiny_bert, write_sentiment_csv

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

TESTS = Path(__file__).resolve().parent
SLOW_FOLDERS = {"e2e", "parity", "cluster"}


# tryfirst: the mark is set before pytest's own hook deselects by `-m`.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        try:
            folder = item.path.resolve().relative_to(TESTS).parts[0]
        except ValueError:  # a test collected from outside tests/
            continue
        if folder in SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return str(make_tiny_bert(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture(scope="session")
def tiny_bert_no_dropout(tmp_path_factory) -> str:
    """Deterministic forward passes: for comparisons where dropout masks would differ by construction."""
    return str(make_tiny_bert(tmp_path_factory.mktemp("tiny_bert_nodrop"), dropout=0.0))


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("sentiment")
    return {
        "train_file": str(write_sentiment_csv(d / "train.csv", 96, seed=1)),
        "validation_file": str(write_sentiment_csv(d / "validation.csv", 37, seed=2)),
        "test_file": str(write_sentiment_csv(d / "test.csv", 21, seed=3)),
    }


@pytest.fixture(scope="session")
def finished_run(tiny_bert, sentiment_files, tmp_path_factory) -> Path:
    """The output dir of a real 2-step run with a checkpoint per step: bad-input tests point runs at it and
    check that nothing in it changes (so sharing it between them is safe)."""
    from scaletune.train import run

    out = tmp_path_factory.mktemp("finished") / "run"
    run({"model_name_or_path": tiny_bert, **sentiment_files, "output_dir": str(out), "max_steps": 2,
         "save_steps": 1, "do_predict": False, "disable_tqdm": True})
    return out


@pytest.fixture
def accelerator():
    """A one-process CPU Accelerator, reset afterwards so that no singleton state leaks into other tests."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    acc = Accelerator(cpu=True)
    yield acc
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one mixed precision per process: a test that runs in-process with another precision
    (bf16) starts from a clean state and leaves one, pass or fail, so no other run's precision answers."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
