"""docs/migrating-from-trainer.md tells the truth.

- Its side-by-side example runs, both sides, offline: the Trainer script and the scaletune command are taken
  from the page, the hub names swapped for local paths (a small BERT checkpoint without a classification
  head, as `bert-base-uncased`; small CSV files in IMDB's format) and `report_to` for `none`. Both give the
  same evaluations, best checkpoint, metrics and predictions.
- Its field tables cover every `TrainingArguments` field of the pinned transformers exactly once, and every
  scaletune key they name exists.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shlex

import pytest
import torch

from support import docs
from support.docs import swap
from support.parity import rel, step_of
from support.tiny import REPO, accelerate_launch, make_tiny_bert, write_sentiment_csv

DOC = (REPO / "docs" / "migrating-from-trainer.md").read_text()


def block_after(marker: str, language: str) -> str:
    return docs.block_after(DOC, marker, language)


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("migration")
    model = str(make_tiny_bert(tmp / "bert_base_like", mlm=True))  # a pretraining checkpoint: no classifier
    files = {"train": str(write_sentiment_csv(tmp / "train.csv", 96, seed=1, label_names=(0, 1))),
             "test": str(write_sentiment_csv(tmp / "test.csv", 21, seed=3, label_names=(0, 1)))}

    # --- the Trainer script, as documented
    script = block_after("side-by-side:trainer", "python")
    script = swap(script, 'MODEL = "bert-base-uncased"', f"MODEL = {model!r}")
    script = swap(script, 'load_dataset("imdb")', f'load_dataset("csv", data_files={files!r})')
    script = swap(script, 'report_to="wandb"', 'report_to="none"')
    script = swap(script, 'output_dir="outputs/imdb_bert"', f'output_dir={str(tmp / "trainer")!r}')
    namespace: dict = {"__name__": "documented_trainer_script"}
    exec(compile(script, "docs/migrating-from-trainer.md (Trainer script)", "exec"), namespace)

    # --- the scaletune command, as documented
    command = shlex.split(block_after("side-by-side:scaletune", "bash").strip())
    prefix = ["accelerate", "launch", "-m", "scaletune.train"]
    assert command[:4] == prefix, command
    out = tmp / "scaletune"
    accelerate_launch(1, [*command[4:], "--model_name_or_path", model, "--dataset_name", "none",
                          "--train_file", files["train"], "--test_file", files["test"], "--report_to", "none",
                          "--output_dir", str(out)], timeout=300)
    return namespace, out


@pytest.mark.slow
def test_documented_trainer_script_and_command_make_the_same_run(side_by_side):
    namespace, out = side_by_side
    trainer, predictions = namespace["trainer"], namespace["predictions"]
    ours_state = json.loads((out / "trainer_state.json").read_text())
    ours = json.loads((out / "all_results.json").read_text())

    # 86 rows after the 10% validation carve-out, batches of 16: 6 updates per epoch, 18 in 3 epochs. With
    # eval_steps=500 both evaluate once, at the last step, which is then the best checkpoint.
    theirs_evals = [h for h in trainer.state.log_history if "eval_accuracy" in h]
    ours_evals = [h for h in ours_state["log_history"] if "eval_accuracy" in h]
    assert [h["step"] for h in ours_evals] == [h["step"] for h in theirs_evals] == [18]
    assert ours_state["global_step"] == trainer.state.global_step == 18
    assert step_of(ours_state["best_model_checkpoint"]) == step_of(trainer.state.best_model_checkpoint) == 18
    for key in ("eval_loss", "eval_accuracy"):
        assert rel(ours_evals[-1][key], theirs_evals[-1][key]) < 1e-5, key
        assert rel(ours[key], theirs_evals[-1][key]) < 1e-5, key  # the final evaluation of the reloaded best

    # trainer.predict(test) vs all_results.json's test_* and predictions.csv
    for key in ("test_loss", "test_accuracy"):
        assert rel(ours[key], predictions.metrics[key]) < 1e-5, key
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["prediction"]) for r in rows] == predictions.predictions.argmax(-1).tolist()
    probabilities = torch.softmax(torch.tensor(predictions.predictions, dtype=torch.float64), dim=-1)
    for row, p in zip(rows, probabilities):
        assert abs(float(row["prob_1"]) - p[1].item()) < 2e-6  # the CSV keeps 6 decimals


def field_tables() -> list[tuple[str, str]]:
    """(Trainer field, scaletune column) for every row of the three field tables."""
    section = DOC.split("<!-- fields:start -->", 1)[1].split("<!-- fields:end -->", 1)[0]
    rows = re.findall(r"^\| `([a-z0-9_]+)` \|(.*?)\|", section, flags=re.M)
    return [(name, text.strip()) for name, text in rows]


def test_field_tables_cover_every_training_argument_exactly_once():
    from transformers import TrainingArguments

    documented = [name for name, _ in field_tables()]
    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    duplicates = sorted({n for n in documented if documented.count(n) > 1})
    assert not duplicates, f"listed more than once: {duplicates}"
    assert set(documented) - fields == set(), "not TrainingArguments fields (renamed or removed upstream?)"
    assert fields - set(documented) == set(), "TrainingArguments fields missing from the migration guide"


def test_supported_fields_name_real_scaletune_keys():
    from transformers import TrainingArguments

    from scaletune.config import FIELD_GROUP

    same_name = {}
    section = DOC.split("### Same name, same meaning", 1)[1].split("###", 1)[0]
    for trainer_field, ours in re.findall(r"^\| `([a-z0-9_]+)` \| `([a-z0-9_]+)` \|", section, flags=re.M):
        same_name[trainer_field] = ours
    assert same_name and all(k == v for k, v in same_name.items())
    assert set(same_name) <= set(FIELD_GROUP)
    # Every scaletune key that shares a name with a TrainingArguments field is in that table.
    trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    assert (set(FIELD_GROUP) & trainer_fields) - set(same_name) == set()
    # Keys named elsewhere in the tables (in backticks) exist too.
    for _, text in field_tables():
        for key in re.findall(r"`([a-z][a-z0-9_]+)`", text):
            if "_" in key and key not in trainer_fields and not key.startswith(("adamw_", "deepspeed_")):
                assert key in FIELD_GROUP or key in ("tokens_per_second", "mixed_precision"), key
