"""Several evaluation sets end to end (issue #23, item 1): two halves of packaged:rotten_tomatoes' validation split,
a tiny BERT without dropout. One run in this process with run(eval_dataset={"a": ..., "b": ...}) (datasets.Dataset
objects), one on 2 CPU processes with validation_files: the same metrics per set, the best checkpoint chosen by
set b's loss."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from scaletune import assets
from scaletune.train import run
from support.tiny import accelerate_launch

pytestmark = pytest.mark.slow

STEPS = {"max_steps": 4, "eval_strategy": "steps", "eval_steps": 2, "save_steps": 2, "logging_steps": 1,
         "load_best_model_at_end": True, "metric_for_best_model": "eval_b_loss", "learning_rate": 3e-3,
         "per_device_eval_batch_size": 8, "do_predict": False, "report_to": "none", "disable_tqdm": True}
GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """64 train rows; validation halves of 37 and 41 rows (neither divides into 2 x 8: the last shard is padded)."""
    d = tmp_path_factory.mktemp("eval_sets")
    source = assets.dataset_files("packaged:rotten_tomatoes")
    train, validation = pd.read_csv(source["train"]), pd.read_csv(source["validation"])
    out = {"train": d / "train.csv", "a": d / "a.csv", "b": d / "b.csv"}
    train.sample(64, random_state=0).to_csv(out["train"], index=False)
    validation.iloc[:37].to_csv(out["a"], index=False)
    validation.iloc[37:78].to_csv(out["b"], index=False)
    return {k: str(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def one_process(files, tiny_bert_no_dropout, tmp_path_factory):
    import datasets

    out = tmp_path_factory.mktemp("one") / "out"
    result = run({"model_name_or_path": tiny_bert_no_dropout, "output_dir": str(out), **STEPS,
                  "per_device_train_batch_size": GLOBAL_BATCH},
                 train_dataset=datasets.Dataset.from_csv(files["train"]),
                 eval_dataset={name: datasets.Dataset.from_csv(files[name]) for name in ("a", "b")})
    return result, out


def _evaluations(out: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {h["step"]: {k: v for k, v in h.items() if k.startswith("eval_")} for h in lines
            if any(k.startswith("eval_") for k in h)}


def test_each_set_is_logged_and_set_b_chooses_the_best_checkpoint(one_process):
    result, out = one_process
    evals = _evaluations(out)
    assert sorted(evals) == [2, 4]
    for metrics in evals.values():
        assert {"eval_a_loss", "eval_a_accuracy", "eval_b_loss", "eval_b_accuracy"} <= set(metrics)
        assert not {"eval_loss", "eval_accuracy"} & set(metrics)  # no unnamed set
    assert {k for k in result.metrics if k.endswith("_loss")} == {"eval_a_loss", "eval_b_loss"}
    best_step = min(evals, key=lambda s: evals[s]["eval_b_loss"])
    # Set a's loss falls while b's rises (a rate where the tiny model fits what a holds): b's choice is not a's.
    assert best_step != min(evals, key=lambda s: evals[s]["eval_a_loss"])
    assert result.best_global_step == best_step
    assert result.best_metric == pytest.approx(evals[best_step]["eval_b_loss"])
    assert result.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["best_global_step"] == best_step
    # load_best_model_at_end: the final evaluation is of the best weights.
    assert result.metrics["eval_b_loss"] == pytest.approx(evals[best_step]["eval_b_loss"], abs=1e-6)
    card = (out / "README.md").read_text()
    assert "B Loss" in card and f"eval_b_loss: {evals[best_step]['eval_b_loss']:.4g} at step {best_step}" in card


def test_two_processes_give_each_set_the_one_process_metrics(one_process, files, tiny_bert_no_dropout, tmp_path):
    _, one_out = one_process
    out = tmp_path / "two"
    args = ["--model_name_or_path", tiny_bert_no_dropout, "--train_file", files["train"],
            "--validation_files", f"a={files['a']},b={files['b']}", "--output_dir", str(out),
            "--per_device_train_batch_size", str(GLOBAL_BATCH // 2)]
    for key, value in STEPS.items():
        args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    accelerate_launch(2, args)
    one, two = _evaluations(one_out), _evaluations(out)
    assert sorted(two) == sorted(one)
    for step in one:
        assert set(two[step]) == set(one[step])
        for key, expected in one[step].items():
            tolerance = dict(abs=1e-6) if key.endswith("accuracy") else dict(rel=1e-4, abs=1e-5)
            assert two[step][key] == pytest.approx(expected, **tolerance), (step, key, two[step], one[step])
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["best_global_step"] == min(one, key=lambda s: one[s]["eval_b_loss"])
