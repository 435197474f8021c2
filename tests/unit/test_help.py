"""`--help` is generated from the schema and answers at once: every configuration key with its type, default
and meaning, grouped; predict's own options in full; no torch import on the way."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from scaletune.config import field_docs, reference_markdown


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
def test_train_help_lists_every_key_of_the_reference_grouped():
    proc = cli("-m", "scaletune.train", "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("usage: python -m scaletune.train [CONFIG] [--key value ...]")
    assert "packaged recipe: " in out and "demo" in out  # where a config comes from
    positions = [out.index(f"\n{group} options (") for group in ("model", "data", "training")]
    assert positions == sorted(positions)
    for group, docs in field_docs().items():
        section = out.split(f"\n{group} options (", 1)[1].split(" options (", 1)[0]
        for key in docs:
            assert f"\n  --{key} " in section, f"--{key} missing from the {group} options"
    # type, default and docstring of one key, as HfArgumentParser shows them
    assert "--eval_strategy {no,steps,epoch}" in out and "(default: no)" in out
    assert "--per_device_train_batch_size INT\n        Micro-batch size per process. (default: 8)" in out


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
def test_predict_help_lists_its_own_options_whole():
    from scaletune import predict

    proc = cli("-m", "scaletune.predict", "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("usage: python -m scaletune.predict MODEL_DIR --test_file")
    # the description is the module docstring's whole paragraph, not its first line
    assert "step as a command." in out
    for name in list(inspect.signature(predict.predict).parameters)[1:]:
        assert f"\n  --{name} " in out
    assert "(default: 32)" in out and "Required." in out


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
@pytest.mark.parametrize("module", ["scaletune.train", "scaletune.predict"])
def test_help_does_not_import_torch(module):
    # runpy with run_name="__main__" is exactly `python -m module --help`, and leaves sys.modules to inspect.
    code = (f"import runpy, sys\nsys.argv = [{module!r}, '--help']\n"
            f"try:\n    runpy.run_module({module!r}, run_name='__main__')\nexcept SystemExit as e:\n"
            f"    assert not e.code, e.code\n"
            f"print('TORCH', 'torch' in sys.modules)\n")
    proc = cli("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "TORCH False"


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
def test_python_m_scaletune_config_prints_the_reference():
    proc = cli("-m", "scaletune.config")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == reference_markdown().strip()
