"""Gradient accumulation against `transformers.Trainer` (docs/migrating-from-trainer.md, "Gradient accumulation").

scaletune normalises the loss by the number of counted labels in the whole accumulation window (§17), so N
micro-batches of b train exactly like one batch of N*b -- which is what Trainer does *without* accumulation.
Both are checked in one go: scaletune with accumulation 4 x 2 equals Trainer with one batch of 8, for sequence
classification and for masked-LM with uneven masked-token counts per micro-batch.

Trainer 5.x with accumulation over-scales BERT's loss (transformers issue 47688): BERT's forward accepts
**kwargs, so Trainer believes the model normalises by `num_items_in_batch` and skips its own division by the
accumulation steps, but BERT's heads ignore it and return a per-micro-batch mean. The logged loss and the
grad norm before clipping are then N times too large (for token losses, a sum of per-micro-batch means). The
tests record that, so a fix on Trainer's side shows up here.

Dropout is off: with accumulation the dropout masks are drawn per micro-batch, so they cannot equal one
batch's masks on either side.
"""

from __future__ import annotations

import pytest

from scaletune.train import run
from support.parity import (make_trainer, max_abs_diff, prepared_mlm, rel, tokenized_classification,
                            uneven_lines, weights)
from support.tiny import make_tiny_bert

pytestmark = pytest.mark.slow  # every test here launches a training run or a process

N, B = 4, 2  # accumulation steps, micro-batch size: one update = 8 examples
STEPS = 3
COMMON = dict(max_steps=STEPS, logging_steps=1, learning_rate=1e-2, lr_scheduler_type="constant", seed=11,
              max_grad_norm=0.0, save_strategy="no")
# max_grad_norm=0: without clipping the weights show the raw updates (with it, the over-scaled Trainer run
# would hide most of its error behind the clip).


def train_logs(history):
    return [h for h in history if "loss" in h and "train_loss" not in h and "eval_loss" not in h]


def assert_same_training(ours, trainer, ours_dir):
    a, b = train_logs(ours.log_history), train_logs(trainer.state.log_history)
    assert [h["step"] for h in a] == [h["step"] for h in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert rel(x["loss"], y["loss"]) < 1e-5, (x, y)
        assert rel(x["grad_norm"], y["grad_norm"]) < 1e-5, (x, y)
    # Padding differs (each micro-batch is padded to its own longest row), so matmul shapes and float
    # summation order differ: the weights agree to float32 noise, which Adam at lr 1e-2 amplifies to ~1e-5
    # where gradients are ~0. Trainer's accumulation error on masked-LM is ~5e-2 on the same scale.
    diff = max_abs_diff(weights(ours_dir), {k: v.detach() for k, v in trainer.model.state_dict().items()})
    print(f"scaletune {N}x{B} vs Trainer 1x{N * B}: max weight difference {diff:.2e}")
    assert diff < 1e-4


def assert_trainer_overscales(overscaled, reference, low: float, high: float):
    """Step 1 starts from the same weights on both runs, so its loss and grad norm compare directly."""
    a, b = train_logs(overscaled.state.log_history)[0], train_logs(reference.state.log_history)[0]
    assert low <= a["loss"] / b["loss"] <= high, (a, b)
    assert low <= a["grad_norm"] / b["grad_norm"] <= high, (a, b)


# --------------------------------------------------------------------------- sequence classification


@pytest.fixture(scope="module")
def classification(tiny_bert_no_dropout, sentiment_files, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity_accumulation_cls")
    files = {"train": sentiment_files["train_file"]}
    data, tok = tokenized_classification(tiny_bert_no_dropout, files)

    # validation_split_percentage=0: no rows carved out, both sides train on all 96.
    ours = run(dict(model_name_or_path=tiny_bert_no_dropout, train_file=files["train"], do_eval=False,
                    do_predict=False, validation_split_percentage=0, report_to="none", disable_tqdm=True,
                    output_dir=str(tmp / "ours_4x2"), per_device_train_batch_size=B, gradient_accumulation_steps=N,
                    **COMMON))
    trainer_1x8 = make_trainer(tiny_bert_no_dropout, tmp / "trainer_1x8", data, tok,
                               per_device_train_batch_size=N * B, **COMMON)
    trainer_1x8.train()
    trainer_4x2 = make_trainer(tiny_bert_no_dropout, tmp / "trainer_4x2", data, tok,
                               per_device_train_batch_size=B, gradient_accumulation_steps=N, **COMMON)
    trainer_4x2.train()
    return ours, trainer_1x8, trainer_4x2, tmp


def test_classification_accumulation_equals_trainer_without_accumulation(classification):
    ours, trainer_1x8, _, tmp = classification
    assert_same_training(ours, trainer_1x8, tmp / "ours_4x2")


def test_trainer_overscales_bert_classification_loss_under_accumulation(classification):
    """Known difference (issue 47688): exactly N x for classification, where every micro-batch counts B."""
    _, trainer_1x8, trainer_4x2, _ = classification
    assert_trainer_overscales(trainer_4x2, trainer_1x8, N * (1 - 1e-5), N * (1 + 1e-5))


# --------------------------------------------------------------------------- masked-LM, uneven token counts


@pytest.fixture(scope="module")
def masked_lm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity_accumulation_mlm")
    model = str(make_tiny_bert(tmp / "tiny_mlm", mlm=True, dropout=0.0))
    (tmp / "train.txt").write_text("\n".join(uneven_lines()) + "\n")
    job = dict(task="mlm", model_name_or_path=model, train_file=str(tmp / "train.txt"), line_by_line=True,
               max_seq_length=64, validation_split_percentage=0, do_eval=False, do_predict=False,
               report_to="none", disable_tqdm=True, **COMMON)

    ours = run(dict(job, output_dir=str(tmp / "ours_4x2"), per_device_train_batch_size=B,
                    gradient_accumulation_steps=N))

    # The Trainer side gets scaletune's tokenized lines and masking collator (masks are a function of each
    # example's tokens and the seed, not of its batch), so both sides see exactly the same masked tokens.
    prepared, tok, collator, _ = prepared_mlm(dict(job, output_dir=str(tmp / "unused")))
    counts = masked_counts(prepared.train, collator)
    trainers = {}
    for name, batch, accumulation in (("trainer_1x8", N * B, 1), ("trainer_4x2", B, N)):
        trainers[name] = make_trainer(model, tmp / name, {"train": prepared.train}, tok, collator=collator,
                                      per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                                      remove_unused_columns=False, **COMMON)
        trainers[name].train()
    return ours, trainers["trainer_1x8"], trainers["trainer_4x2"], tmp, counts


def masked_counts(dataset, collator) -> list[int]:
    return [int((collator([dataset[i]])["labels"] != -100).sum()) for i in range(len(dataset))]


def test_masked_lm_accumulation_equals_trainer_without_accumulation(masked_lm):
    ours, trainer_1x8, _, tmp, counts = masked_lm
    # Not vacuous: the long lines carry many times the masked tokens of the short ones.
    assert max(counts) >= 4 * sorted(counts)[len(counts) // 2], counts
    assert_same_training(ours, trainer_1x8, tmp / "ours_4x2")


def test_trainer_overscales_bert_masked_lm_loss_under_accumulation(masked_lm):
    """Known difference (issue 47688) for token losses: Trainer's loss is the sum of the N micro-batch means
    -- about N x too large -- and its gradient weights each micro-batch equally instead of each token, so
    the update itself differs from one batch of N*B (Adam's scale invariance hides the N x, not that)."""
    ours, trainer_1x8, trainer_4x2, tmp, _ = masked_lm
    assert_trainer_overscales(trainer_4x2, trainer_1x8, N / 2, N * 2)
    reference = {k: v.detach() for k, v in trainer_1x8.model.state_dict().items()}
    ours_error = max_abs_diff(weights(tmp / "ours_4x2"), reference)
    trainer_error = max_abs_diff({k: v.detach() for k, v in trainer_4x2.model.state_dict().items()}, reference)
    print(f"weights vs one batch of {N * B}: scaletune {ours_error:.2e}, Trainer {trainer_error:.2e}")
    assert trainer_error > 100 * max(ours_error, 1e-7)
