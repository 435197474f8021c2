"""The migration guide's own Trainer script runs on scaletune with two edits, on 1 and on 2 processes.

The script (a custom torch Dataset over pre-tokenized encodings, Trainer's one-argument compute_metrics,
EarlyStoppingCallback, load_best_model_at_end, predictions for an unlabelled test set then argmax) is taken
from docs/migrating-from-trainer.md; the two documented edits are applied; the hub model and the data files
are swapped for a small local BERT and small CSV files.
"""

from __future__ import annotations

import csv
import json
import sys

import pytest

from support import docs
from support.docs import swap
from support.tiny import REPO, accelerate_launch, make_tiny_bert, run_cli, write_sentiment_csv

DOC = (REPO / "docs" / "migrating-from-trainer.md").read_text()


def block_after(marker: str) -> str:
    return docs.block_after(DOC, marker, "python")


def scaletune_script() -> tuple[str, str]:
    """(the Trainer script, the same script with the two documented edits)."""
    trainer = block_after("dropin:trainer")
    import_line, call_line = block_after("dropin:scaletune").strip().splitlines()
    trainer_call = next(line for line in trainer.splitlines() if line.startswith("trainer = Trainer("))
    ours = swap(trainer, "from transformers import Trainer\n", import_line + "\n")
    ours = swap(ours, trainer_call, call_line)
    return trainer, ours


def test_the_edit_is_two_lines():
    trainer, ours = scaletune_script()
    changed = [(a, b) for a, b in zip(trainer.splitlines(), ours.splitlines()) if a != b]
    assert len(trainer.splitlines()) == len(ours.splitlines()) and len(changed) == 2, changed


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dropin")
    model = str(make_tiny_bert(tmp / "bert_like", mlm=True))  # no classification head, as a hub checkpoint
    train = write_sentiment_csv(tmp / "train.csv", 96, seed=1, label_names=(0, 1))
    val = write_sentiment_csv(tmp / "val.csv", 37, seed=2, label_names=(0, 1))
    test = tmp / "test.csv"
    with open(write_sentiment_csv(tmp / "test_labelled.csv", 21, seed=3), newline="") as f:
        rows = [{"text": r["text"]} for r in csv.DictReader(f)]
    with open(test, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text"])
        w.writeheader()
        w.writerows(rows)

    def script(out_dir, result_file) -> str:
        _, ours = scaletune_script()
        ours = swap(ours, 'MODEL = "distilbert-base-uncased"', f"MODEL = {model!r}")
        ours = swap(ours, '"imdb_train.csv"', repr(str(train)))
        ours = swap(ours, '"imdb_val.csv"', repr(str(val)))
        ours = swap(ours, '"imdb_test_unlabelled.csv"', repr(str(test)))
        ours = swap(ours, 'output_dir="./results"', f"output_dir={str(out_dir)!r}")
        # What the test reads back (rank 0 only): the script's own variables.
        ours += (f"\nimport os\nif os.environ.get('RANK', '0') == '0':\n"
                 f"    json.dump({{'labels': predicted_labels.tolist(), 'shape': list(predictions.predictions.shape),"
                 f" 'label_ids': predictions.label_ids is None, 'test_metrics': predictions.metrics}},"
                 f" open({str(result_file)!r}, 'w'))\n")
        return "import json\n" + ours

    return tmp, script, len(rows)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_tutorial_script_runs_with_two_edits(job, processes):
    tmp, script, n_test = job
    out, result_file = tmp / f"out{processes}", tmp / f"result{processes}.json"
    path = tmp / f"script{processes}.py"
    path.write_text(script(out, result_file))
    if processes == 1:
        proc = run_cli([sys.executable, str(path)], timeout=300)
    else:
        proc = accelerate_launch(2, [], script=str(path), timeout=300)
    log = proc.stdout + proc.stderr
    result = json.loads(result_file.read_text())
    assert result["shape"] == [n_test, 2] and len(result["labels"]) == n_test  # every unlabelled row predicted
    assert set(result["labels"]) <= {0, 1} and result["label_ids"]  # no labels -> label_ids None, as Trainer
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [h for h in state["log_history"] if "eval_accuracy" in h]
    assert evals and state["best_model_checkpoint"]
    best = max(evals, key=lambda h: h["eval_accuracy"])  # the first of equal bests wins (§9)
    assert state["best_global_step"] == best["step"]
    assert f"Loading best model from {out / state['best_model_checkpoint']}" in log
    saved = (out / "config.yaml").read_text()
    assert "early_stopping_patience: 3" in saved and "metric_for_best_model: accuracy" in saved
