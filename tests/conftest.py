"""Test environment (offline W&B and Hub, one thread) and the shared fixtures: tiny real BERT models and the
toy sentiment CSVs (built by support/tiny.py).

`slow` is set by what a test does, not by its folder: a test that launches a training run (`scaletune.train.run`)
or a process (subprocess, multiprocessing, fork) is marked `slow` by hand (`pytestmark = pytest.mark.slow` in a
module where every test does, `@pytest.mark.slow` on one test). The marker is kept honest here: while a test
that is NOT marked slow sets up or runs, such a launch fails with "this test launches a run/process: mark it
slow", and so does using a fixture that launched one for an earlier (slow) test. So `pytest -m "not slow" tests`
is every pure test, whichever folder it lives in (unit/, e2e/, parity/, cluster/).
Layout: unit/ rules, config, docs; e2e/ real runs in-process and with accelerate launch; parity/ against
transformers.Trainer; cluster/ a real Slurm (tests/gpu marks its own tests slow).
The suite runs on two pytest-xdist workers, a file at a time (`-n 2 --dist loadfile`, README): what tests share
outside their tmp_path (the Slurm cluster of cluster/test_slurm.py, which edits /etc/hosts; the benchmarks'
tiny models, cached under fixed names in the temp dir) is shared within one file only.
A run made in this process with a dict or argument-list config draws no curves.png unless its config says
`plot_curves` (`_without_curves`): the plot is ~0.5 s of matplotlib a run, and only tests/e2e/test_tracking_runs.py
and tests/unit/test_tracking_units.py look at it.
"""

from __future__ import annotations

import functools
import multiprocessing.process
import os
import subprocess
from pathlib import Path

import pytest

from support.tiny import make_tiny_bert, without_curves, write_sentiment_csv

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

LAUNCH_REFUSED = "this test launches a run/process: mark it slow"


class LaunchGuard:
    """Every way a test launches something goes through `check`. While a test not marked slow is set up or
    called, a launch fails; otherwise it is only noted against the fixture being set up, so that a later
    not-slow test using that (cached) fixture fails too, whichever test happened to run first."""

    def __init__(self):
        self.refusing = False
        self.fixtures: list[str] = []  # the fixtures being set up, innermost last
        self.launching: set[str] = set()  # fixtures whose setup launched a run or a process

    def check(self, what: str) -> None:
        if self.fixtures:
            self.launching.add(self.fixtures[-1])
        if self.refusing:
            pytest.fail(f"{LAUNCH_REFUSED} ({what})", pytrace=True)

    def guarding(self, what: str, function, exempt=lambda *args: False):
        @functools.wraps(function)
        def guarded(*args, **kwargs):
            if not exempt(*args):
                self.check(what)
            return function(*args, **kwargs)

        return guarded


# Programs a library runs to look something up, not a run: matplotlib lists the system's fonts with fc-list when
# it builds its font cache (~/.cache/matplotlib), so on a fresh machine the first plot of the session runs it
# (a CI failure: a not-slow test of curves.png was refused on a machine without that cache).
LOOKUPS = {"fc-list"}


def _looks_up(popen, args, *rest) -> bool:
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
    return bool(argv) and os.path.basename(os.fsdecode(argv[0]).split(" ")[0]) in LOOKUPS


GUARD = LaunchGuard()


def pytest_configure(config):
    # Patched once, before collection: test modules bind `from scaletune.train import run` at import time.
    # A process start is caught where every API ends up (subprocess.run/check_output/Popen, multiprocessing
    # and torch.multiprocessing, DataLoader workers, os.fork, os.system); a run at its entry point.
    patches = [(subprocess.Popen, "_execute_child", "a subprocess", _looks_up),
               (multiprocessing.process.BaseProcess, "start", "a multiprocessing process"),
               (os, "fork", "os.fork"), (os, "system", "os.system")]
    try:
        import scaletune.train
    except Exception:  # a src/ being edited fails the tests that import it, not the whole session
        pass
    else:
        scaletune.train.run = _without_curves(scaletune.train.run)
        patches.append((scaletune.train, "run", "a training run"))
        # What a run without DeepSpeed does (distributed/deepspeed.py), for the tests' own save_pretrained calls
        # (support/tiny.py): accelerate's unwrap_model would import DeepSpeed, which imports mlflow when it is
        # installed (the test extra has it), which runs `uname -p` -- a subprocess in a not-slow test. Each run made in
        # this process sets the check for itself when it builds its Accelerator.
        from scaletune.distributed.deepspeed import deepspeed_unwrapping

        deepspeed_unwrapping(False)
    for owner, name, what, *exempt in patches:
        setattr(owner, name, GUARD.guarding(what, getattr(owner, name), *exempt))
    config.pluginmanager.register(FixtureStack(), "scaletune-launch-guard-fixtures")


def pytest_collection_finish(session):
    # Collection imported what every test uses (torch, transformers, datasets, ...): millions of objects that
    # each full garbage collection walked -- Python's own, and the gc.collect() that ends every run made in this
    # process (free_finished_run), 0.25 s a time. Frozen once here, a collection walks only what tests made since
    # (measured: test_parity_decisions + test_trainer_args, 56 -> 48 CPU-s). Nothing collectable is lost: what
    # is frozen is what collection left alive.
    import gc

    gc.collect()
    gc.freeze()


def _without_curves(run):
    @functools.wraps(run)
    def run_without_curves(args=None, **kwargs):
        if isinstance(args, dict) and "plot_curves" not in args:
            args = {**args, "plot_curves": False}
        elif isinstance(args, list):
            args = without_curves(args)
        return run(args, **kwargs)

    return run_without_curves


class FixtureStack:
    """A plugin, not a conftest hook: a conftest's pytest_fixture_setup is not called for session fixtures."""

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        GUARD.fixtures.append(fixturedef.argname)
        try:
            return (yield)
        finally:
            GUARD.fixtures.pop()


def _refusing(item) -> bool:
    return item.get_closest_marker("slow") is None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    # Fixtures are set up here, session- and module-scoped ones included (before any autouse fixture could act).
    GUARD.refusing = _refusing(item)
    if GUARD.refusing:
        used = sorted(GUARD.launching.intersection(getattr(item, "fixturenames", ())))
        if used:
            GUARD.refusing = False
            pytest.fail(f"{LAUNCH_REFUSED} (it uses {', '.join(used)}, which launches one)", pytrace=False)
    try:
        return (yield)
    finally:
        GUARD.refusing = False


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    GUARD.refusing = _refusing(item)
    try:
        return (yield)
    finally:
        GUARD.refusing = False


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
