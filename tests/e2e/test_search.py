"""`python -m scaletune.search` for real: trials as `./launch` processes reporting to one SQLite study, a bad trial
pruned, best.yaml reproducing the best trial, the plots; and a search killed during a trial that resumes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from support.faults import QUIET, clean_env, describe, processes_of, wait_for  # noqa: E402

SPACE = "learning_rate: {type: float, low: 1.0e-6, high: 5.0e-2, log: true}\nwarmup_steps: {type: int, low: 0, high: 2}\n"


def _search_cmd(tiny_bert, sentiment_files, out: Path, space: Path, n_trials: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "scaletune.search", "--space", str(space), "--n_trials", str(n_trials), *extra,
            "--model_name_or_path", tiny_bert, "--train_file", sentiment_files["train_file"],
            "--validation_file", sentiment_files["validation_file"], "--output_dir", str(out), "--max_steps", "6",
            "--eval_strategy", "steps", "--eval_steps", "2", "--save_steps", "2", "--disable_tqdm", "true"]


def _study(out: Path):
    return optuna.load_study(study_name="scaletune", storage=f"sqlite:///{out / 'study.db'}")


@pytest.mark.slow
def test_a_search_prunes_a_bad_trial_and_best_yaml_reproduces_the_best(tiny_bert_no_dropout, sentiment_files,
                                                                       tmp_path):
    """Trials of two processes each (gloo on CPU): the pruning decision is agreed by both ranks."""
    out, space = tmp_path / "search", tmp_path / "space.yaml"
    space.write_text(SPACE)
    out.mkdir()
    # Optuna's own way to try given values first: a reasonable trial, then one whose learning rate diverges (its
    # eval_loss at step 2 is far above the first's, so the median pruner stops it there); the third is TPE's.
    study = optuna.create_study(study_name="scaletune", storage=f"sqlite:///{out / 'study.db'}")
    study.enqueue_trial({"learning_rate": 1e-4, "warmup_steps": 0})
    study.enqueue_trial({"learning_rate": 5e-2, "warmup_steps": 0})
    proc = subprocess.run(_search_cmd(tiny_bert_no_dropout, sentiment_files, out, space, 3, "--preset", "multi_gpu",
                                      "--cpu", "2"),
                          capture_output=True, text=True, timeout=400, env=clean_env())
    assert proc.returncode == 0, describe(proc)

    trials = _study(out).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    pruned = trials[1]
    assert pruned.user_attrs["pruned_at_step"] == 2 and pruned.intermediate_values[2] > trials[0].values[0]
    kept = out / "trial-1"
    assert (kept / "checkpoint-2").is_dir() and (kept / "config.yaml").is_file()
    assert json.loads((kept / "trainer_state.json").read_text())["global_step"] == 2  # stopped early, ended cleanly
    for t in trials:  # every trial keeps what a run writes
        assert {"config.yaml", "metrics.jsonl", "all_results.json"} <= {p.name for p in (out / f"trial-{t.number}").iterdir()}

    table = (out / "trials.md").read_text()
    assert table in proc.stdout and len(table.strip().splitlines()) == 2 + 3 and "| 1 | pruned |" in table

    from PIL import Image

    for name in ("history.png", "importance.png"):
        with Image.open(out / name) as image:
            image.verify()

    best = min((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.values[0])
    from scaletune.config import load_config
    from scaletune.train import run

    cfg = load_config(str(out / "best.yaml"))
    assert cfg.training.learning_rate == best.params["learning_rate"]
    assert cfg.training.output_dir == str(out / "best")
    # The trial ran 2 processes x 8 per device; in-process, 1 x 16 is the same global batch: the same metric
    # within the scale-out tolerance (tests/e2e/test_scale_out.py), without dropout (a mask per rank).
    result = run(str(out / "best.yaml"), overrides={"per_device_train_batch_size": 16})
    assert result.metrics["eval_loss"] == pytest.approx(best.values[0], rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_a_killed_search_keeps_its_trials_and_resumes_the_running_one(tiny_bert, sentiment_files, tmp_path):
    out, space = tmp_path / "search", tmp_path / "space.yaml"
    space.write_text(SPACE)
    # One process per trial (the other test runs two); no pruning, so that every trial runs to its end.
    cmd = _search_cmd(tiny_bert, sentiment_files, out, space, 3, "--cpu", "1", "--pruner", "none")
    env = clean_env(QUIET)
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for(lambda: (out / "trial-2" / "checkpoint-2").is_dir(), first, 300, "trial 2's first checkpoint")
        os.killpg(first.pid, signal.SIGTERM)  # the search and its trial's processes, as a job scheduler would
        first.wait(timeout=60)
        wait_for(lambda: not processes_of(out / "trial-2"), None, 60, "the trial's processes to end")
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        log.close()
    before = _study(out).get_trials()
    assert [t.state.name for t in before] == ["COMPLETE", "COMPLETE", "RUNNING"], (tmp_path / "first.log").read_text()
    done = {n: (out / f"trial-{n}" / "all_results.json").stat().st_mtime_ns for n in (0, 1)}

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, describe(again)
    assert "resuming trial 2 from its latest checkpoint" in again.stderr
    after = _study(out).get_trials()
    assert [t.state.name for t in after] == ["COMPLETE"] * 3
    assert [t.values for t in after[:2]] == [t.values for t in before[:2]]
    assert {n: (out / f"trial-{n}" / "all_results.json").stat().st_mtime_ns for n in (0, 1)} == done  # not re-run
    assert after[2].params == before[2].params and sorted(after[2].intermediate_values) == [2, 4, 6]
    assert json.loads((out / "trial-2" / "trainer_state.json").read_text())["global_step"] == 6
