"""auto_find_batch_size end to end: a run that starts at a micro-batch that runs out of memory (the test hook
SCALETUNE_TEST_OOM_ABOVE_ROWS makes the model's forward raise torch.OutOfMemoryError above N rows, and stays on
for the real run) settles on a smaller one with more accumulation, and trains exactly the run of that size;
the chosen sizes are logged, in config.yaml and reused on resume. Under DDP, ZeRO-2 and FSDP2 (launched on two
CPU processes) it matches a one-process run with the same global batch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from scaletune.batch_search import TEST_OOM_RANK, TEST_OOM_ROWS
from support.tiny import REPO, make_tiny_bert, run_cli


def _losses(out: Path) -> dict:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def _args(model: str, files: dict, out: Path, **kw) -> dict:
    return {"model_name_or_path": model, **files, "output_dir": str(out), "max_steps": 4, "logging_steps": 1,
            "eval_strategy": "steps", "eval_steps": 2, "save_steps": 2, "do_predict": False, "disable_tqdm": True,
            "plot_curves": False, "learning_rate": 1e-3, **kw}


@pytest.mark.slow
def test_a_run_that_settles_at_8_is_the_run_of_8_times_4_and_resumes_without_a_search(
        tiny_bert, sentiment_files, tmp_path, monkeypatch, capfd):
    from scaletune.train import run

    # Dropout on: the probe's random draws must not move the run's (build re-seeds after it).
    reference = tmp_path / "8x4"
    run(_args(tiny_bert, sentiment_files, reference, per_device_train_batch_size=8, gradient_accumulation_steps=4,
              per_device_eval_batch_size=8))
    capfd.readouterr()

    monkeypatch.setenv(TEST_OOM_ROWS, "8")
    searched = tmp_path / "searched"
    run(_args(tiny_bert, sentiment_files, searched, per_device_train_batch_size=32, auto_find_batch_size=True))
    log = capfd.readouterr().out
    assert ("auto_find_batch_size: per_device_train_batch_size 32 -> 8, gradient_accumulation_steps 1 -> 4, "
            "per_device_eval_batch_size 32 -> 8 (global batch 32)") in log
    expected, got = _losses(reference), _losses(searched)
    assert sorted(got) == [1, 2, 3, 4]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), (step, got, expected)
    for config in (searched / "config.yaml", searched / "checkpoint-2" / "config.yaml"):
        saved = yaml.safe_load(config.read_text())
        assert (saved["per_device_train_batch_size"], saved["gradient_accumulation_steps"],
                saved["per_device_eval_batch_size"], saved["auto_find_batch_size"]) == (8, 4, 8, True)

    # The same command, resumed from checkpoint-2: the checkpoint's sizes, no search (a search would print its
    # line; the hook is still on, so a run at 32 would fail).
    resumed = tmp_path / "resumed"
    run(_args(tiny_bert, sentiment_files, resumed, per_device_train_batch_size=32, auto_find_batch_size=True,
              resume_from_checkpoint=str(searched / "checkpoint-2")))
    out, err = capfd.readouterr()
    assert ("auto_find_batch_size: checkpoint-2's sizes are reused, no search: per_device_train_batch_size 8, "
            "gradient_accumulation_steps 4, per_device_eval_batch_size 8.") in err
    assert "auto_find_batch_size: per_device_train_batch_size" not in out + err
    assert "changed settings" not in err  # nothing differs from the checkpoint's run
    for step in (3, 4):
        assert _losses(resumed)[step] == pytest.approx(got[step], abs=1e-5)
    assert yaml.safe_load((resumed / "config.yaml").read_text())["per_device_train_batch_size"] == 8


@pytest.mark.slow
def test_gives_up_in_one_line_before_anything_is_written(tiny_bert, sentiment_files, tmp_path, monkeypatch):
    from scaletune.config import ConfigError
    from scaletune.train import run

    monkeypatch.setenv(TEST_OOM_ROWS, "0")  # not even one row fits
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="even a training micro-batch of 1 runs out of memory"):
        run(_args(tiny_bert, sentiment_files, out, auto_find_batch_size=True))
    assert not (out / "config.yaml").exists() and not list(out.glob("checkpoint-*"))


@pytest.fixture(scope="module")
def no_dropout_work(tmp_path_factory, sentiment_files):
    """A tiny BERT without dropout (one process and two compute the same thing) and the one-process reference:
    global batch 16 as 4 x 4."""
    from scaletune.train import run

    root = tmp_path_factory.mktemp("batch_search_launched")
    model = make_tiny_bert(root / "tiny_bert_nodrop", dropout=0.0)
    run(_args(str(model), sentiment_files, root / "one", per_device_train_batch_size=4,
              gradient_accumulation_steps=4, save_steps=4))
    return {"root": root, "model": str(model), "files": sentiment_files, "one": root / "one"}


@pytest.mark.slow
@pytest.mark.parametrize("preset, oom_rank", [("multi_gpu", "1"), ("deepspeed_zero2", None), ("fsdp2", None)])
def test_two_processes_agree_on_the_size_and_match_one_process(preset, oom_rank, no_dropout_work):
    """8 per device runs out of memory (on rank 1 only under DDP: rank 0 must follow): both settle at 4 x 2,
    the one-process run's 4 x 4 global batch of 16, and train the same losses."""
    w = no_dropout_work
    out = w["root"] / preset
    args = _args(w["model"], w["files"], out, per_device_train_batch_size=8, auto_find_batch_size=True,
                 save_steps=4)
    cli = [part for k, v in args.items() for part in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]
    env = {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", TEST_OOM_ROWS: "4",
           **({TEST_OOM_RANK: oom_rank} if oom_rank else {})}
    proc = run_cli([str(REPO / "launch"), preset, "--cpu", "2", *cli], env=env, cwd=w["root"], timeout=600)
    assert ("auto_find_batch_size: per_device_train_batch_size 8 -> 4, gradient_accumulation_steps 1 -> 2, "
            "per_device_eval_batch_size 32 -> 4 (global batch 16)") in proc.stdout + proc.stderr
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["per_device_train_batch_size"], saved["gradient_accumulation_steps"]) == (4, 2)
    expected, got = _losses(w["one"]), _losses(out)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step in expected:  # the tolerance of tests/e2e/test_scale_out.py
        assert got[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5), (step, got, expected)
