"""A script goes on after run() (issue 23, item 4): Trainer users train, then train again or use the process group
themselves in the same script. tests/support/two_stages.py runs two fine-tuning stages (the second from the
first one's export, in bf16 with accumulation 2, where the first ran fp32 without) and then, under several
processes, a barrier and an all_reduce of its own. Every rank must finish with exit 0: a destroyed process group
fails the second stage, a kept accelerate state refuses its precision, and a group destroyed under the GIL
hangs the exit (pytorch#56297, distributed/accelerator.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from support.tiny import REPO, accelerate_launch, run_cli

SCRIPT = str(REPO / "tests" / "support" / "two_stages.py")


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_script_runs_twice_then_uses_the_process_group(processes, tiny_bert, sentiment_files, tmp_path):
    args = [tiny_bert, sentiment_files["train_file"], sentiment_files["validation_file"], str(tmp_path)]
    if processes == 1:
        proc = run_cli([sys.executable, SCRIPT, *args], check=False, timeout=300)
    else:
        proc = accelerate_launch(processes, args, script=SCRIPT, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads(p.read_text()) for p in sorted(Path(tmp_path).glob("report-*.json"))]
    assert len(reports) == processes, proc.stdout[-2000:]
    for report in reports:
        assert "eval_loss" in report["stage1"] and "eval_loss" in report["stage2"], report
        assert report["stage2_steps"] == 2
        assert report["precision_after"] == "bf16"  # the second run's own setting, not the first one's
        if processes > 1:
            assert report["all_reduce"] == processes  # the script's own collective, after both runs
    if processes > 1:
        assert sorted(r["rank"] for r in reports) == list(range(processes))
    assert (Path(tmp_path) / "stage2" / "config.json").is_file()  # stage 2 exported its model too
