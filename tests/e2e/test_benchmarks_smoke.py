"""Every benchmark script runs end to end at its tiny size and prints its ratio lines (the figures themselves
mean nothing at that size: benchmarks/RESULTS.md holds the measured ones).

A script whose `--tiny` run trains its sides in its own process runs its `main()` in the pytest process, which
has torch and transformers imported already: a fresh process would spend most of the smoke run importing them
(~6 s of CPU) to train for one. The processes a script starts itself (the lockstep sides, startup.py's cases)
are still real processes."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import sys

import pytest

from support.tiny import REPO, run_cli

BENCH = REPO / "benchmarks"
NUMBER = r"[0-9]+\.[0-9]+"

# name: (the script's arguments, the lines it must print, whether its main() runs in the pytest process)
SCRIPTS = {
    "step_time_vs_trainer": (["--tiny"], [rf"ratio scaletune/trainer: {NUMBER}", rf"ratio scaletune/bare: {NUMBER}",
                                          "same batches on every side: True"], True),
    # All three sides at once, taking turns update by update (common.lockstep): each in its own process.
    "step_time_vs_trainer --lockstep": (
        ["--tiny", "--lockstep"],
        [rf"per-update ratios scaletune/trainer \(the same batch, seconds apart\): median {NUMBER}",
         rf"per-update ratios scaletune/bare \(the same batch, seconds apart\): median {NUMBER}",
         "same batches on every side: True"], True),
    "group_by_length": (["--tiny"], [rf"ratio group_by_length/random samples/s: {NUMBER}",
                                     rf"eval accuracy difference group_by_length - random: [+-]{NUMBER}"], True),
    "mlm_sparse_logits": (["--tiny"], [rf"ratio sparse/full ms/update: {NUMBER}",
                                       r"largest relative difference of the per-step train loss: [0-9.e+-]+"], True),
    # checkpoint_stall.py, gpu_suite.py and padding_free.py (which gpu_suite.py runs) run with --tiny and print
    # their ratios in test_gpu_check_runs_its_parts_into_one_markdown_file: scripts/gpu_check.sh runs them, and
    # running them here again would cost a minute and check nothing more.
    # startup.py times fresh interpreters and imports no torch itself: a process of its own costs nothing.
    "startup": (["--tiny"], [rf"typo: {NUMBER} s wall-clock", rf"bad_file: {NUMBER} s wall-clock"], False),
}


def script_main_in_process(script, args: list[str]) -> str:
    """`python SCRIPT ARGS` made by this process (the script's main() under its argv); what it printed. Not
    support.inprocess.main_in_process: a benchmark script is a file, not a module with a CLI main(argv)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    printed, argv = io.StringIO(), sys.argv
    sys.argv = [str(script), *args]
    try:
        with contextlib.redirect_stdout(printed):
            code = module.main()
    finally:
        sys.argv = argv
    assert code in (None, 0), f"{script.name} {' '.join(args)} returned {code}:\n{printed.getvalue()[-3000:]}"
    return printed.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_benchmark_runs_at_tiny_size_and_prints_its_ratios(name, tmp_path, monkeypatch):
    args, expected, in_process = SCRIPTS[name]
    script = BENCH / f"{name.split()[0]}.py"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHON", sys.executable)
    if in_process:
        stdout = script_main_in_process(script, args)
    else:
        stdout = run_cli([sys.executable, str(script), *args], timeout=300).stdout
    for pattern in expected:
        assert re.search(pattern, stdout), f"{pattern!r} not in the output of {name}:\n{stdout[-3000:]}"


def table_rows(markdown: str) -> list[dict]:
    """The rows of the first markdown table in a results file, as {column: cell}."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_the_clock_times_a_window_of_updates_and_counts_its_tokens():
    """common.window_clock, on a toy loop: the window is updates start+1 .. end, trained on batches start ..
    end-1; with every_update it also has one time per update."""
    import torch
    from torch.utils.data import DataLoader

    sys.path.insert(0, str(BENCH))
    from common import window_clock

    rows = [{"attention_mask": torch.tensor([1] * (i % 5 + 1) + [0] * (4 - i % 5))} for i in range(20)]
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with window_clock(3, 8, every_update=True) as window:
        for batch in DataLoader(rows, batch_size=2):
            model(batch["attention_mask"].float().sum(1, keepdim=True)).sum().backward()
            optimizer.step()
    record = window.record()
    assert record["updates"] == 5 and len(record["gaps"]) == 5 and record["seconds"] > 0
    assert record["seconds"] == pytest.approx(sum(record["gaps"]))
    per_row = [i % 5 + 1 for i in range(20)]
    assert record["tokens"] == sum(per_row[6:16]) and record["samples"] == 10  # batches 3..7


def test_the_consistency_check_flags_the_unsynced_figures_of_issue_21():
    """An unsynchronised clock gave bare 53.6 ms/update and 62k tokens/s at s128 b64 (8192 tokens an update
    at most): the two cannot describe the same window."""
    sys.path.insert(0, str(BENCH))
    from common import consistent

    assert not consistent({"ms/update": 53.6, "tokens/s": 62_000, "tokens/update": 8192})
    assert not consistent({"ms/update": 32.7, "tokens/s": 243_000, "tokens/update": 8192})  # 3% off
    assert consistent({"ms/update": 32.7, "tokens/s": 8192 / 0.0327, "tokens/update": 8192})


@pytest.mark.slow
def test_gpu_check_runs_its_parts_into_one_markdown_file(tmp_path):
    """scripts/gpu_check.sh in its CPU mode: every part runs (tests/gpu skips without CUDA) and the file has
    each part's section, the summary, and the whole tiny GPU suite (benchmarks/gpu_suite.py: every CPU group,
    2 repeats, benchmarks/padding_free.py's lines) with its ratio lines -- the smoke run of both."""
    out = tmp_path / "check.md"
    proc = run_cli(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu", "--tiny", "--out", str(out)],
                   env={"PYTHON": sys.executable}, timeout=480, cwd=tmp_path)
    text = out.read_text()
    for section in ("# GPU check", "## Machine", "## tests/gpu", "## Benchmarks: benchmarks/gpu_suite.py",
                    "## Checkpoint save stall: benchmarks/checkpoint_stall.py", "## Summary"):
        assert f"\n{section}\n" in f"\n{text}", f"{section!r} missing from {out}:\n{text[-3000:]}"
    assert re.search(r"torch \S+ ", text) and "skipped" in text  # versions; the GPU tier skips on CPU
    suite = text.split("## Benchmarks: benchmarks/gpu_suite.py")[1].split("\n## ")[0]
    for pattern in (rf"seq 64 no: ratio scaletune/trainer {NUMBER}, ratio scaletune/bare {NUMBER}",
                    r"\| scaletune \| 64 \| 8 \| no \| 2 \| .* \| ok \| - \|",
                    r"\| scaletune group_by_length \| 64 \| 8 \|",
                    rf"ratio padding_free/padded samples/s: {NUMBER}",  # benchmarks/padding_free.py --tiny
                    r"largest per-step training-loss difference padding_free vs padded: [0-9.e+-]+",
                    r"\| scaletune \+ 1 checkpoint save \|"):
        assert re.search(pattern, suite), f"{pattern!r} not in the suite's section of {out}:\n{suite[-3000:]}"
    rows = table_rows(suite)
    assert len(rows) >= 5, rows  # the table was written: bare, trainer, scaletune, then the options
    for row in rows:  # every measured row passes the clock's consistency check, and it can be recomputed
        assert row["check"] == "ok" and row["error"] == "-", row
        implied = number(row["tokens/s"]) * number(row["ms/update"]) / 1000
        assert implied == pytest.approx(number(row["tokens/update"]), rel=0.02), row
        assert row["repeats"] == "2" and row["data wait"].endswith("%"), row
    assert number(next(r for r in rows if "checkpoint save" in r["case"])["save stall s"]) > 0
    assert re.search(rf"stall ratio background/synchronous: {NUMBER}", text)
    summary = text.split("## Summary")[1]
    assert summary.count("| ok |") == 4, summary
    assert f"writing {out}" in proc.stdout
    # benchmarks/gpu_suite.sh, the suite's own command, finds its Python and the script (gpu_check.sh runs
    # the script directly).
    usage = run_cli(["bash", str(BENCH / "gpu_suite.sh"), "--help"], env={"PYTHON": sys.executable}, timeout=60)
    assert "--budget" in usage.stdout and "--tiny" in usage.stdout, usage.stdout


# The scripts scripts/gpu_check.sh runs (test_gpu_check_runs_its_parts_into_one_markdown_file checks their output).
IN_GPU_CHECK = {"gpu_suite", "checkpoint_stall", "padding_free"}


def test_every_benchmark_script_has_a_smoke_run():
    # gpu_suite.py runs through gpu_suite.sh; common.py is the scripts' shared helper.
    scripts = {p.stem for p in BENCH.glob("*.py")} - {"common"}
    covered = {name.split()[0] for name in SCRIPTS} | IN_GPU_CHECK  # a script's name, then the options of that run
    assert scripts == covered, f"add a --tiny smoke run for: {sorted(scripts - covered)}"
