"""Issue #26, "everything a run tells the user is true", without a training run: the messages of a Ctrl-C after
the last update and the end box after a stop (8), the NER tag error (9), the files the end box names (10) and
the suggestion for a misspelt choice (13). The same items through real runs: tests/e2e/test_truthful_messages.py.
"""

from __future__ import annotations

import contextlib
import json
import signal

import pytest

from scaletune import assets
from scaletune import tracking as tr
from scaletune.config import ConfigError, load_config
from scaletune.data import load_raw_datasets
from scaletune.errors import DataError
from scaletune.preemption import PreemptionWatcher
from scaletune.tasks import get_task


# --------------------------------------------------------------------------- 8: Ctrl-C after the last update


def test_a_signal_after_the_last_update_says_the_run_is_finishing_and_a_stop_box_says_stopped(capfd):
    promise = "will checkpoint after the current update and stop"

    finishing = PreemptionWatcher()
    finishing.training_over()
    finishing._handle(signal.SIGINT, None)  # what the signal thread does with a Ctrl-C
    err = capfd.readouterr().err
    assert promise not in err
    assert "after the last update" in err and "finishing" in err and "Ctrl-C again" in err

    # A Ctrl-C between the last stop agreement and the end of training promised a checkpoint: it is corrected.
    late = PreemptionWatcher()
    late._handle(signal.SIGINT, None)
    assert promise in capfd.readouterr().err
    late.training_over()
    assert "finishing" in capfd.readouterr().err

    stopped = tr.format_summary({"global_step": 7, "stop_reason": "preempted", "output_dir": "o"}, None, {},
                                "demo (run id x)", 3)
    assert "run finished" not in stopped and "stopped at step 7" in stopped
    finished = tr.format_summary({"global_step": 7, "output_dir": "o"}, None, {}, "demo (run id x)", 3)
    assert "run finished" in finished and "stopped" not in finished


# --------------------------------------------------------------------------- 9: the NER tag error


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_ner_tag_error_lists_every_tag_and_names_the_sample_cut(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.model_path("packaged:minilm"))
    kinds = [f"T{i:02d}" for i in range(7)]  # 15 training tags: B-/I- of 7 types and O
    first = {"tokens": ["w"] * 15, "ner_tags": ["O"] + [f"{p}-{k}" for k in kinds for p in "BI"]}
    train = [first, {"tokens": ["x", "y"], "ner_tags": ["B-LATE", "I-LATE"]}]
    validation = [{"tokens": ["w"] * 8, "ner_tags": ["B-LATE", "I-LATE"] + [f"B-NEW{i}" for i in range(6)]}]
    files = {"train_file": _write_jsonl(tmp_path / "train.jsonl", train),
             "validation_file": _write_jsonl(tmp_path / "validation.jsonl", validation)}
    cfg = load_config({"model_name_or_path": "packaged:minilm", "task": "token_classification", **files,
                       "max_train_samples": 1})
    task = get_task("token_classification")
    with pytest.raises(DataError) as e:
        task.prepare_data(load_raw_datasets(cfg), tokenizer, cfg, contextlib.nullcontext)
    message = str(e.value)
    unknown = ["B-LATE", "I-LATE", *[f"B-NEW{i}" for i in range(6)]]
    for tag in [*unknown, *first["ner_tags"]]:
        assert tag in message, (tag, message)
    # The cut left out B-LATE and I-LATE, which the whole training split has; the B-NEW tags it has nowhere.
    assert "max_train_samples=1 keeps the first 1 training sentences, and only later ones have ['B-LATE', " \
        "'I-LATE']: raise or unset max_train_samples" in message
    assert f"(no training sentence has {[f'B-NEW{i}' for i in range(6)]}: fix the data)" in message
    assert "\n" not in message, message


# --------------------------------------------------------------------------- 10: the files the end box names


def test_the_end_box_names_no_metrics_log_that_was_not_written(tmp_path, accelerator, capsys):
    cfg = load_config({"train_file": str(tmp_path / "unused.csv"), "output_dir": str(tmp_path / "out"),
                       "report_to": "none", "disable_tqdm": True})
    tracker = tr.RunTracker(cfg, accelerator)
    tracker.finish({"global_step": 2, "output_dir": str(tmp_path / "out")})  # nothing was logged
    box = capsys.readouterr().out
    assert not (tmp_path / "out" / tr.METRICS_FILE).exists()
    assert tr.METRICS_FILE not in box, box

    tracker.log({"loss": 1.0}, 1)
    tracker.finish({"global_step": 2, "output_dir": str(tmp_path / "out")})
    assert str(tmp_path / "out" / tr.METRICS_FILE) in capsys.readouterr().out


# --------------------------------------------------------------------------- 13: a misspelt choice


def test_a_misspelt_choice_gets_did_you_mean_like_a_misspelt_key():
    with pytest.raises(ConfigError, match=r"eval_strategy='step' is not one of .*Did you mean 'steps'\?"):
        load_config({"eval_strategy": "step"})
    with pytest.raises(ConfigError, match=r"Did you mean 'learning_rate'\?"):
        load_config({"learnig_rate": 1e-4})
    with pytest.raises(ConfigError) as e:  # nothing close: no guess
        load_config({"eval_strategy": "sometimes"})
    assert "Did you mean" not in str(e.value)
