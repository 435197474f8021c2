"""The launch guard of tests/conftest.py, which keeps the `slow` marker honest, checked on a throwaway suite run
by a real pytest with the real conftest: a test not marked slow that launches a process fails with the guard's
line, a slow one passes, and a not-slow test that uses a fixture whose setup launched one fails too, whichever
test set the fixture up. A program a library runs to look something up (matplotlib's fc-list) is not a launch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]

SUITE = '''
import subprocess
import sys

import pytest


def launch():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


@pytest.fixture(scope="module")
def launched():
    launch()
    return "made by a process"


def test_unmarked_launch():
    launch()


@pytest.mark.slow
def test_marked_launch():
    launch()


@pytest.mark.slow
def test_marked_sets_up_the_fixture(launched):
    assert launched


def test_unmarked_uses_the_fixture(launched):
    assert launched


def test_unmarked_pure():
    assert sum(range(4)) == 6


def test_unmarked_font_lookup():
    try:  # what matplotlib runs to build its font cache: a lookup, not a launch (the guard acts before the exec)
        subprocess.run(["fc-list", "--help"], capture_output=True)
    except FileNotFoundError:
        pass
'''


@pytest.mark.slow  # it runs pytest in a process of its own
def test_the_guard_fails_exactly_the_unmarked_launches(tmp_path):
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_suite.py").write_text(SUITE)
    (tmp_path / "pytest.ini").write_text(f"[pytest]\npythonpath = {TESTS}\nmarkers =\n    slow: launches\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-q", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "COLUMNS": "400"})  # the summary lines whole
    outcome = {}
    for line in out.stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("PASSED", "FAILED", "ERROR") and "::" in rest:
            outcome[rest.split("::")[1].split(" ")[0]] = (word, rest)
    assert {name: word for name, (word, _) in outcome.items()} == {
        "test_unmarked_launch": "FAILED",
        "test_marked_launch": "PASSED",
        "test_marked_sets_up_the_fixture": "PASSED",
        "test_unmarked_uses_the_fixture": "ERROR",  # refused in setup, before the test body
        "test_unmarked_pure": "PASSED",
        "test_unmarked_font_lookup": "PASSED",
    }, out.stdout + out.stderr
    assert "mark it slow (a subprocess)" in outcome["test_unmarked_launch"][1], out.stdout
    assert "it uses launched, which launches one" in outcome["test_unmarked_uses_the_fixture"][1], out.stdout
