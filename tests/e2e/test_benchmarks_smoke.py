"""Every benchmark script runs end to end at its tiny size and prints its ratio lines (the figures themselves
mean nothing at that size: benchmarks/RESULTS.md holds the measured ones)."""

from __future__ import annotations

import re
import sys

import pytest

from support.tiny import REPO, run_cli

BENCH = REPO / "benchmarks"
NUMBER = r"[0-9]+\.[0-9]+"

SCRIPTS = {
    "step_time_vs_trainer": ([sys.executable, str(BENCH / "step_time_vs_trainer.py"), "--tiny"],
                             [rf"ratio scaletune/trainer: {NUMBER}", rf"ratio scaletune/bare: {NUMBER}",
                              "same batches on every side: True"]),
    # All three sides at once, taking turns update by update (common.lockstep): each in its own process.
    "step_time_vs_trainer --lockstep": (
        [sys.executable, str(BENCH / "step_time_vs_trainer.py"), "--tiny", "--lockstep"],
        [rf"per-update ratios scaletune/trainer \(the same batch, seconds apart\): median {NUMBER}",
         rf"per-update ratios scaletune/bare \(the same batch, seconds apart\): median {NUMBER}",
         "same batches on every side: True"]),
    "group_by_length": ([sys.executable, str(BENCH / "group_by_length.py"), "--tiny"],
                        [rf"ratio group_by_length/random samples/s: {NUMBER}",
                         rf"eval accuracy difference group_by_length - random: [+-]{NUMBER}"]),
    "mlm_sparse_logits": ([sys.executable, str(BENCH / "mlm_sparse_logits.py"), "--tiny"],
                          [rf"ratio sparse/full ms/update: {NUMBER}",
                           r"largest relative difference of the per-step train loss: [0-9.e+-]+"]),
    "padding_free": ([sys.executable, str(BENCH / "padding_free.py"), "--tiny"],
                     [rf"ratio padding_free/padded samples/s: {NUMBER}",
                      r"largest per-step training-loss difference padding_free vs padded: [0-9.e+-]+"]),
    "checkpoint_stall": ([sys.executable, str(BENCH / "checkpoint_stall.py"), "--tiny"],
                         [rf"stall ratio background/synchronous: {NUMBER}"]),
    "startup": ([sys.executable, str(BENCH / "startup.py"), "--tiny"],
                [rf"typo: {NUMBER} s wall-clock", rf"bad_file: {NUMBER} s wall-clock"]),
    "gpu_suite": (["bash", str(BENCH / "gpu_suite.sh"), "--tiny", "--cpu"],
                  [rf"seq 64 no: ratio scaletune/trainer {NUMBER}, ratio scaletune/bare {NUMBER}",
                   r"\| scaletune group_by_length \| 64 \| 8 \|", rf"ratio padding_free/padded samples/s: {NUMBER}",
                   r"\| scaletune \+ 1 checkpoint save \|"]),
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_benchmark_runs_at_tiny_size_and_prints_its_ratios(name, tmp_path):
    cmd, expected = SCRIPTS[name]
    if name == "gpu_suite":
        cmd = [*cmd, "--out", str(tmp_path / "results.md")]
    proc = run_cli(cmd, env={"PYTHON": sys.executable}, timeout=300, cwd=tmp_path)
    for pattern in expected:
        assert re.search(pattern, proc.stdout), f"{pattern!r} not in the output of {name}:\n{proc.stdout[-3000:]}"
    if name == "gpu_suite":
        assert (tmp_path / "results.md").read_text().count("\n| ") >= 6  # the table was written


def test_every_benchmark_script_has_a_smoke_run():
    # gpu_suite.py runs through gpu_suite.sh; common.py is the scripts' shared helper.
    scripts = {p.stem for p in BENCH.glob("*.py")} - {"common"}
    covered = {name.split()[0] for name in SCRIPTS}  # a script's name, then the options of that run
    assert scripts == covered, f"add a --tiny smoke run for: {sorted(scripts - covered)}"
