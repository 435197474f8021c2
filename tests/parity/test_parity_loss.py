"""Loss-curve parity with `transformers.Trainer` (docs/migrating-from-trainer.md, "What is the same").

One job, both sides, in one test: the same tiny BERT folder (fixed init, dropout on), the same CSV files, the
same seed, one process, fp32, no accumulation. Trainer's defaults are kept wherever the user would keep them
(its seeded sampler, `adamw_torch_fused`, linear schedule), so this checks that scaletune reproduces what a
Trainer user gets: data order, dropout stream, parameter groups without weight decay on biases and
LayerNorm, warmup + linear decay, gradient clipping, and the logged loss / learning rate / grad norm.
"""

from __future__ import annotations


import pytest

from scaletune.train import run
from support.parity import make_trainer, max_abs_diff, rel, tokenized_classification, weights

pytestmark = pytest.mark.slow  # every test here launches a training run or a process

# 96 rows / batch 8 = 12 updates per epoch; 5 epochs = 60 steps, four epoch boundaries.
JOB = dict(per_device_train_batch_size=8, per_device_eval_batch_size=16, num_train_epochs=5, seed=7,
           learning_rate=3e-3, weight_decay=0.1, warmup_steps=6, max_grad_norm=0.5, lr_scheduler_type="linear",
           logging_steps=1, eval_strategy="steps", eval_steps=25, save_strategy="no")
MAX_GRAD_NORM = JOB["max_grad_norm"]

# In practice both sides are bit-identical (scaletune uses Trainer's default fused AdamW and draws the
# DataLoader seeds from the same global RNG stream). The tolerances are the contract: loss, learning
# rate and grad norm within 1e-5 relative; weights within 1e-6 absolute after 60 steps.
REL_TOL = 1e-5
WEIGHT_TOL = 1e-6


@pytest.fixture(scope="module")
def both_sides(tiny_bert, sentiment_files, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity_loss")
    ours = run(dict(model_name_or_path=tiny_bert, train_file=sentiment_files["train_file"],
                    validation_file=sentiment_files["validation_file"], output_dir=str(tmp / "scaletune"),
                    do_eval=False, do_predict=False, report_to="none", disable_tqdm=True, **JOB))

    data, tok = tokenized_classification(tiny_bert, {"train": sentiment_files["train_file"],
                                                     "validation": sentiment_files["validation_file"]})
    trainer = make_trainer(tiny_bert, tmp / "trainer", data, tok, **JOB)
    trainer.train()
    return ours, trainer, tmp


def train_logs(history):
    return [h for h in history if "loss" in h and "eval_loss" not in h and "train_loss" not in h]


def test_per_step_loss_learning_rate_and_grad_norm_match_trainer(both_sides):
    ours, trainer, _ = both_sides
    a, b = train_logs(ours.log_history), train_logs(trainer.state.log_history)
    assert [h["step"] for h in a] == [h["step"] for h in b] == list(range(1, 61))
    for x, y in zip(a, b):
        step = x["step"]
        assert x["epoch"] == pytest.approx(y["epoch"], abs=1e-9), step
        assert rel(x["learning_rate"], y["learning_rate"]) < REL_TOL or x["learning_rate"] == y["learning_rate"], step
        assert rel(x["loss"], y["loss"]) < REL_TOL, (step, x["loss"], y["loss"])
        assert rel(x["grad_norm"], y["grad_norm"]) < REL_TOL, (step, x["grad_norm"], y["grad_norm"])


def test_the_job_exercises_what_it_claims_to(both_sides):
    """Guards against a vacuous comparison: the curve moves, warmup and decay happen, clipping is active on
    some steps and not on others, and an epoch boundary is crossed several times."""
    ours, _, _ = both_sides
    logs = train_logs(ours.log_history)
    lrs = [h["learning_rate"] for h in logs]
    # Step n is taken with the rate before the scheduler's n-th step: 0 at step 1, the peak at step 7.
    assert lrs[0] == 0 < lrs[5] < lrs[6] == pytest.approx(JOB["learning_rate"]) and lrs[-1] < lrs[30] < lrs[6]
    norms = [h["grad_norm"] for h in logs]
    assert any(n > MAX_GRAD_NORM for n in norms) and any(n < MAX_GRAD_NORM for n in norms)
    first, last = [h["loss"] for h in logs[:12]], [h["loss"] for h in logs[-12:]]
    assert sum(last) / 12 < sum(first) / 12 - 0.05
    assert logs[-1]["epoch"] == pytest.approx(5.0)


def test_evaluations_during_training_match_trainer(both_sides):
    """Evaluation in the middle of training neither perturbs the dropout stream differently nor reports a
    different loss: steps 25, 50 and the final step 60 (off the interval) on both sides."""
    ours, trainer, _ = both_sides
    a = [h for h in ours.log_history if "eval_loss" in h]
    b = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in a] == [h["step"] for h in b] == [25, 50, 60]
    for x, y in zip(a, b):
        assert rel(x["eval_loss"], y["eval_loss"]) < REL_TOL


def test_final_weights_match_trainer(both_sides, tiny_bert):
    ours, trainer, _ = both_sides
    final = weights(ours.output_dir)
    theirs = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    assert max_abs_diff(final, theirs) < WEIGHT_TOL
    # Training moved every kind of parameter far beyond the tolerance, so a different parameter grouping
    # (weight decay on LayerNorm or biases: lr * wd * |w| ~ 3e-4 per step) could not hide below it.
    start = weights(tiny_bert)
    for name in ("bert.embeddings.LayerNorm.weight", "bert.encoder.layer.0.attention.self.query.bias",
                 "classifier.weight"):
        assert (final[name] - start[name]).abs().max().item() > 1000 * WEIGHT_TOL, name
