"""scaletune.startup: a `python -m scaletune.train` process freezes the objects of the libraries it imported, and
only such a process (a script that calls run() again keeps every object collectable)."""

from __future__ import annotations

import gc
import sys
import types

from scaletune.startup import freeze_imported_objects, one_run_per_process


def _main_module(name: str) -> types.ModuleType:
    module = types.ModuleType("__main__")
    module.__spec__ = types.SimpleNamespace(name=name)
    return module


def test_only_python_m_scaletune_train_is_one_run_per_process(monkeypatch):
    assert not one_run_per_process()  # pytest's own __main__: run() and main() called here never freeze
    monkeypatch.setitem(sys.modules, "__main__", _main_module("scaletune.train"))
    assert one_run_per_process()
    for other in ("scaletune.predict", "scaletune.ray"):
        monkeypatch.setitem(sys.modules, "__main__", _main_module(other))
        assert not one_run_per_process()
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # python -c, a script
    assert not one_run_per_process()


def test_the_freeze_takes_what_is_alive_and_the_libraries_every_run_imports():
    kept = [object() for _ in range(1000)]
    before = gc.get_freeze_count()
    try:
        freeze_imported_objects()
        assert gc.get_freeze_count() >= before + len(kept)
        assert "datasets" in sys.modules and "transformers.modeling_utils" in sys.modules
    finally:  # this process goes on: its later objects collectable as before (conftest froze at collection)
        gc.unfreeze()
        gc.freeze()
