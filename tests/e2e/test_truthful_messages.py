"""Issue #26, "everything a run tells the user is true", through real runs: a Ctrl-C after the last update (8),
the NER tag error after a sample cut (9), the files the end box names (10). The misspelt choice (13) is a row of
tests/e2e/test_bad_input_table.py; the end box of a run stopped by Ctrl-C mid-run ("run stopped at step N") is
checked by the Ctrl-C test of tests/e2e/test_faults.py; the message pieces without runs:
tests/unit/test_truthful_message_units.py.

Signals go to real `python -m scaletune.train` processes, paused (SIGSTOP) at a chosen point so that the signal
provably arrives while the run is there, as in tests/e2e/test_faults.py.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from scaletune.errors import DataError
from scaletune.train import run
from support.faults import describe, logs, pause, start, stop, train_cmd, wait_for

pytestmark = pytest.mark.slow  # every test here launches a training run or a process

START_TIMEOUT = 300  # bound for start-up and a few steps on 2 busy cores (prevents hangs; not a timing)
PROMISE = "will checkpoint after the current update and stop"
FINISHING = "received SIGINT after the last update: training is over, finishing the final evaluation"


def cli(tiny_bert: str, files: dict, out: Path, **overrides) -> list[str]:
    values = {"model_name_or_path": tiny_bert, **files, "per_device_train_batch_size": 8, "logging_steps": 1,
              "disable_tqdm": "true", "report_to": "none", "output_dir": str(out), **overrides}
    return [a for key, value in values.items() for a in (f"--{key}", str(value))]


def interrupt(proc) -> None:
    """One Ctrl-C while the run is provably alive: paused, signalled, resumed."""
    pause(proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)


# --------------------------------------------------------------------------- 8: Ctrl-C after the last update


def test_ctrl_c_after_the_last_update_says_the_run_finishes_and_a_second_one_aborts(tiny_bert, sentiment_files,
                                                                                      tmp_path):
    out = tmp_path / "once"
    proc = start(train_cmd(cli(tiny_bert, sentiment_files, out, max_steps=2)), tmp_path, "once")
    try:
        # The exported model: training is over, the final evaluation, predictions and summary are still to come.
        wait_for(lambda: (out / "model.safetensors").exists(), proc, START_TIMEOUT, "the export")
        interrupt(proc)
        proc.wait(timeout=120)
    finally:
        stop(proc)
    stdout, stderr = logs(proc)
    assert proc.returncode == 0, describe(proc)
    assert FINISHING in stderr and PROMISE not in stderr, describe(proc)
    assert "scaletune: run finished" in stdout
    assert (out / "all_results.json").exists(), describe(proc)  # the final evaluation ran to its end

    # The second Ctrl-C must land while the run is still finishing: 4,200 test rows to predict keep it there for
    # seconds after the message (21 rows took milliseconds, and a tiny run could print its end box first).
    rows = Path(sentiment_files["test_file"]).read_text().splitlines()
    big_test = tmp_path / "big_test.csv"
    big_test.write_text("\n".join([rows[0], *rows[1:] * 200]) + "\n")
    out = tmp_path / "twice"
    proc = start(train_cmd(cli(tiny_bert, sentiment_files, out, max_steps=2, test_file=big_test)), tmp_path, "twice")
    try:
        wait_for(lambda: (out / "model.safetensors").exists(), proc, START_TIMEOUT, "the export")
        interrupt(proc)
        wait_for(lambda: FINISHING in logs(proc)[1], proc, 60, "the finishing message")
        interrupt(proc)  # the second Ctrl-C still aborts at once
        proc.wait(timeout=60)
    finally:
        stop(proc)
    stdout, stderr = logs(proc)
    assert proc.returncode == 130, describe(proc)
    assert "second interrupt; aborting now" in stderr and "Traceback" not in stderr, describe(proc)
    assert "scaletune: run finished" not in stdout


# --------------------------------------------------------------------------- 9: NER tags cut by max_train_samples


def test_ner_tag_error_after_a_sample_cut_lists_every_tag_and_names_max_train_samples(tmp_path):
    """The packaged tweets: the first 64 training tweets have 15 of the tags; the validation split has 6 more,
    all of which later training tweets have."""
    with pytest.raises(DataError) as e:
        run("ner_tweets", overrides={"max_train_samples": 64, "output_dir": str(tmp_path / "out"),
                                     "report_to": "none", "disable_tqdm": True})
    message = str(e.value)
    missing = ["B-movie", "B-tvshow", "I-company", "I-geo-loc", "I-movie", "I-tvshow"]
    assert f"The validation split has tags {missing} that are not among the 15 training tags [" in message
    assert "'I-sportsteam', 'O']" in message  # the last of the 15: the list is whole
    assert f"max_train_samples=64 keeps the first 64 training sentences, and only later ones have {missing}" \
        in message


# --------------------------------------------------------------------------- 10: the files the end box names


def test_the_end_box_of_a_run_that_logged_nothing_names_no_metrics_log(tiny_bert, sentiment_files, tmp_path,
                                                                       capsys):
    out = tmp_path / "out"
    run({"model_name_or_path": tiny_bert, **sentiment_files, "output_dir": str(out), "max_steps": 2,
         "logging_steps": 50, "do_predict": False, "disable_tqdm": True, "report_to": "none"})
    box = capsys.readouterr().out
    assert "scaletune: run finished" in box
    assert not (out / "metrics.jsonl").exists()
    assert "metrics.jsonl" not in box, box
    for path in re.findall(r"(/\S+)", box.split("scaletune: run finished", 1)[1]):
        assert Path(path).exists(), (path, box)  # every path the box names is there
