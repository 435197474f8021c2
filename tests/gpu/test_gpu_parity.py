"""fp16 on CUDA against transformers.Trainer (issue 21, item 7): the grad scaler's overflow skips, the learning
rates and the per-step losses. On CPU there is no fp16 autocast, so tests/parity cannot check this.

Both sides start the scaler at 2^24 (torch's GradScaler is what accelerate builds for both): the first updates
overflow in fp16 and are skipped, the scale halves until it fits, and training goes on -- the same steps must
be skipped on both sides, with the schedule held at the skipped steps."""

from __future__ import annotations

import math

import pytest

from scaletune.train import run
from support.parity import rel, tokenized_classification

JOB = dict(per_device_train_batch_size=8, max_steps=24, seed=7, learning_rate=3e-3, warmup_steps=4,
           max_grad_norm=1.0, lr_scheduler_type="linear", logging_steps=1, eval_strategy="no", save_strategy="no",
           fp16=True)


@pytest.fixture
def scaler_starts_high(monkeypatch):
    import torch

    init = torch.amp.GradScaler.__init__

    def high(self, *args, **kwargs):
        kwargs["init_scale"] = 2.0**24
        init(self, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "__init__", high)


def steps(history) -> dict[int, dict]:
    return {h["step"]: h for h in history if "loss" in h and "eval_loss" not in h and "train_loss" not in h}


def test_fp16_overflow_skips_and_losses_match_trainer(scaler_starts_high, tiny_bert, sentiment_files, tmp_path):
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    ours = steps(run(dict(model_name_or_path=tiny_bert, train_file=sentiment_files["train_file"],
                          output_dir=str(tmp_path / "scaletune"), do_eval=False, do_predict=False,
                          report_to="none", disable_tqdm=True, **JOB)).log_history)
    data, tok = tokenized_classification(tiny_bert, {"train": sentiment_files["train_file"]})
    # Hub kernels off, as a Trainer user on an offline GPU machine must (tests/e2e/test_model_sources.py).
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, use_kernels=False)
    trainer = Trainer(model=model,
                      args=TrainingArguments(output_dir=str(tmp_path / "trainer"), report_to="none",
                                             disable_tqdm=True, **JOB),
                      train_dataset=data["train"], data_collator=DataCollatorWithPadding(tok))
    trainer.train()
    theirs = steps(trainer.state.log_history)

    assert sorted(ours) == sorted(theirs) == list(range(1, 25))
    skipped = [s for s in ours if not math.isfinite(ours[s]["grad_norm"])]
    assert skipped == [s for s in theirs if not math.isfinite(theirs[s]["grad_norm"])]
    assert 0 < len(skipped) < 24, "the scale of 2^24 should overflow the first updates, and then fit"
    for s in ours:
        assert rel(ours[s]["learning_rate"], theirs[s]["learning_rate"]) < 1e-6 or \
            ours[s]["learning_rate"] == theirs[s]["learning_rate"], (s, ours[s], theirs[s])
        assert rel(ours[s]["loss"], theirs[s]["loss"]) < 1e-3, (s, ours[s]["loss"], theirs[s]["loss"])
