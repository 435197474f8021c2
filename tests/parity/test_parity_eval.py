"""Evaluation parity with `Trainer.evaluate()` (docs/migrating-from-trainer.md, "Evaluation").

Same model folder, same validation rows: `eval_loss` and the metrics equal Trainer's, on one process and on
two (real gloo DDP; 37 rows in batches of 8 per rank, so the last batch is uneven and accelerate pads it with
duplicates that must not be counted). The two-process run is compared with a one-process
`Trainer.evaluate()`: a distributed evaluation must equal the single-process one.

Known difference, recorded here: for token-level losses (masked-LM) our `eval_loss` is the mean over all
counted tokens of the set; Trainer's is the mean of per-batch means weighted by batch size, so it depends on
`per_device_eval_batch_size`. They coincide when one batch holds the whole set.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scaletune.train import run
from support.parity import make_trainer, prepared_mlm, rel, tokenized_classification, uneven_lines
from support.tiny import accelerate_launch

pytestmark = pytest.mark.slow  # every test here launches a training run or a process

EVAL_BATCH = 8
METRICS = ("accuracy", "precision", "recall", "f1", "matthews_correlation")


def user_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    """What a Trainer user writes with scikit-learn, plus two checks on the gathered arrays themselves: their
    length (duplicated padding rows would change it) and an order-sensitive checksum of the logits."""
    from sklearn.metrics import accuracy_score, matthews_corrcoef, precision_recall_fscore_support

    preds = logits.argmax(-1)
    p, r, f1, _ = precision_recall_fscore_support(labels, preds, average="binary", zero_division=0)
    margin = (logits[:, 1] - logits[:, 0]).astype(np.float64)
    return {"accuracy": accuracy_score(labels, preds), "precision": p, "recall": r, "f1": f1,
            "matthews_correlation": matthews_corrcoef(labels, preds), "rows": len(labels),
            "checksum": float(margin @ np.arange(1, len(margin) + 1))}


@pytest.fixture(scope="module")
def trainer_eval(tiny_bert, sentiment_files, tmp_path_factory):
    """One-process `Trainer.evaluate()` of the model folder on the validation rows."""
    data, tok = tokenized_classification(tiny_bert, {"train": sentiment_files["train_file"],
                                                     "validation": sentiment_files["validation_file"]})
    trainer = make_trainer(tiny_bert, tmp_path_factory.mktemp("trainer_eval"), data, tok,
                           per_device_eval_batch_size=EVAL_BATCH,
                           compute_metrics=lambda p: user_metrics(p.predictions, p.label_ids))
    metrics = trainer.evaluate()
    # Not vacuous: the untrained model's predictions are mixed, so every metric is informative.
    assert 0 < metrics["eval_accuracy"] < 1 and metrics["eval_f1"] > 0 and metrics["eval_rows"] == 37
    return metrics


def eval_only(model, files, output_dir) -> dict:
    return dict(model_name_or_path=model, train_file=files["train_file"], validation_file=files["validation_file"],
                do_train=False, do_predict=False, per_device_eval_batch_size=EVAL_BATCH, output_dir=str(output_dir),
                report_to="none", disable_tqdm=True)


def test_one_process_eval_equals_trainer_evaluate(tiny_bert, sentiment_files, trainer_eval, tmp_path):
    ours = run(eval_only(tiny_bert, sentiment_files, tmp_path / "ours"),
               compute_metrics=lambda predictions, label_ids: user_metrics(predictions, label_ids)).metrics
    for key in ("eval_loss", "eval_checksum", *(f"eval_{m}" for m in METRICS)):
        assert rel(ours[key], trainer_eval[key]) < 1e-6, (key, ours[key], trainer_eval[key])
    assert ours["eval_rows"] == trainer_eval["eval_rows"] == 37


def test_two_process_eval_with_uneven_last_batch_equals_trainer_evaluate(tiny_bert, sentiment_files, trainer_eval,
                                                                         tmp_path):
    """scaletune's built-in metrics (what the CLI reports, all_results.json) from a 2-process evaluation equal
    what a Trainer user computes with scikit-learn on one process; and the 2-process test pass writes each test
    row exactly once, despite the ranks' padding of the last round (21 rows)."""
    assert 37 % (2 * EVAL_BATCH) != 0 and 21 % (2 * EVAL_BATCH) != 0  # the last rounds are uneven across ranks
    out = tmp_path / "ours_2proc"
    args = []
    job = {**eval_only(tiny_bert, sentiment_files, out), "do_predict": True, "test_file": sentiment_files["test_file"]}
    for k, v in job.items():
        args += [f"--{k}", str(v)]
    accelerate_launch(2, args, timeout=300)
    ours = json.loads((out / "all_results.json").read_text())
    for key in ("eval_loss", *(f"eval_{m}" for m in METRICS)):
        assert rel(ours[key], trainer_eval[key]) < 1e-6, (key, ours[key], trainer_eval[key])
    rows = (out / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + 21 and len({r.split(",")[0] for r in rows[1:]}) == 21, rows[:3]
    assert "test_loss" in ours and "test_accuracy" in ours


# --------------------------------------------------------------------------- masked-LM: a documented difference


def wide_init_mlm(path) -> str:
    """A tiny BERT MLM with a wide init, so per-token losses vary a lot (an untrained narrow init predicts
    ~uniformly: every token then costs ~ln(vocab) and any way of averaging gives the same number)."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from scaletune.assets import model_path

    tok = AutoTokenizer.from_pretrained(model_path("packaged:minilm"))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, initializer_range=0.5)
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_masked_lm_eval_loss_is_per_token_where_trainer_averages_batches(tmp_path):
    model = wide_init_mlm(tmp_path / "mlm")
    (tmp_path / "validation.txt").write_text("\n".join(uneven_lines(12, seed=9)) + "\n")
    job = dict(task="mlm", model_name_or_path=model, validation_file=str(tmp_path / "validation.txt"),
               line_by_line=True, max_seq_length=64, do_train=False, do_predict=False, report_to="none",
               disable_tqdm=True, per_device_eval_batch_size=2, output_dir=str(tmp_path / "ours"))
    ours = run(job).metrics["eval_loss"]
    ours_other_batch = run(dict(job, per_device_eval_batch_size=5, output_dir=str(tmp_path / "ours5"))).metrics

    prepared, tok, _, eval_collator = prepared_mlm(dict(job, output_dir=str(tmp_path / "unused")))

    def trainer_loss(batch: int) -> float:
        trainer = make_trainer(model, tmp_path / f"trainer_{batch}", {"validation": prepared.validation}, tok,
                               collator=eval_collator, per_device_eval_batch_size=batch,
                               remove_unused_columns=False)
        return trainer.evaluate()["eval_loss"]

    n = len(prepared.validation)
    assert rel(ours_other_batch["eval_loss"], ours) < 1e-6  # ours does not depend on the eval batch size
    assert rel(trainer_loss(n), ours) < 1e-6  # one batch holding the whole set: the same definition
    trainer_small = trainer_loss(2)
    print(f"eval_loss per token {ours:.4f}; Trainer with batches of 2: {trainer_small:.4f}")
    assert rel(trainer_small, ours) > 1e-2  # Trainer's per-batch averaging weights short lines up
