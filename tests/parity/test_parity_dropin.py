"""The Trainer drop-in (`run(args, model=..., train_dataset=..., compute_loss_func=...)`) against Trainer itself.

Same user-built objects on both sides: a model the user loaded, tokenized `datasets.Dataset`s, a
`TrainingArguments` object, `compute_loss_func(outputs, labels, num_items_in_batch)`. Without accumulation the
per-step losses equal Trainer's; with accumulation scaletune's equal its own single-big-batch run (§17).
"""

from __future__ import annotations

import pytest
import torch.nn.functional as F

from scaletune.train import run
from support.parity import rel, tokenized_classification, trainer_args

pytestmark = pytest.mark.slow  # every test here launches a training run or a process

JOB = dict(per_device_train_batch_size=8, num_train_epochs=2, seed=11, learning_rate=3e-3, logging_steps=1,
           eval_strategy="no", save_strategy="no", max_grad_norm=1.0)


def summed_cross_entropy(outputs, labels, num_items_in_batch):
    """Trainer's compute_loss_func contract: the summed loss divided by the items of the whole batch."""
    logits = outputs.logits
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), reduction="sum") / num_items_in_batch


def user_model(path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path)


def losses(history):
    return [h["loss"] for h in history if "loss" in h and "train_loss" not in h]


@pytest.fixture(scope="module")
def data(tiny_bert_no_dropout, sentiment_files):
    return tokenized_classification(tiny_bert_no_dropout, {"train": sentiment_files["train_file"]})


def test_user_objects_and_loss_match_trainer_per_step(tiny_bert_no_dropout, data, tmp_path):
    from transformers import DataCollatorWithPadding, Trainer

    ds, tok = data
    trainer = Trainer(model=user_model(tiny_bert_no_dropout), args=trainer_args(tmp_path / "trainer", **JOB),
                      train_dataset=ds["train"], data_collator=DataCollatorWithPadding(tok), processing_class=tok,
                      compute_loss_func=summed_cross_entropy)
    trainer.train()
    ours = run(trainer_args(tmp_path / "ours", **JOB), model=user_model(tiny_bert_no_dropout),
               processing_class=tok, train_dataset=ds["train"], data_collator=DataCollatorWithPadding(tok),
               compute_loss_func=summed_cross_entropy)
    a, b = losses(ours.log_history), losses(trainer.state.log_history)
    assert len(a) == len(b) == 24
    for step, (x, y) in enumerate(zip(a, b), start=1):
        assert rel(x, y) < 1e-5, (step, x, y)


def test_with_accumulation_the_update_is_one_big_batch(tiny_bert_no_dropout, data, tmp_path):
    from transformers import DataCollatorWithPadding

    ds, tok = data
    common = {**JOB, "per_device_train_batch_size": 16}
    big = run(trainer_args(tmp_path / "big", **common), model=user_model(tiny_bert_no_dropout),
              processing_class=tok, train_dataset=ds["train"], data_collator=DataCollatorWithPadding(tok),
              compute_loss_func=summed_cross_entropy)
    accumulated = run(trainer_args(tmp_path / "acc", **{**common, "per_device_train_batch_size": 4,
                                                          "gradient_accumulation_steps": 4}),
                      model=user_model(tiny_bert_no_dropout), processing_class=tok, train_dataset=ds["train"],
                      data_collator=DataCollatorWithPadding(tok), compute_loss_func=summed_cross_entropy)
    a, b = losses(accumulated.log_history), losses(big.log_history)
    assert len(a) == len(b) == 12
    for step, (x, y) in enumerate(zip(a, b), start=1):
        assert rel(x, y) < 1e-5, (step, x, y)


def test_unsupported_training_arguments_and_callbacks_fail_before_loading(tmp_path):
    from transformers import PrinterCallback, TrainingArguments

    from scaletune.errors import ConfigError

    with pytest.raises(ConfigError, match="neftune_noise_alpha=5.0") as err:
        run(TrainingArguments(output_dir=str(tmp_path / "x"), neftune_noise_alpha=5.0, torch_empty_cache_steps=2))
    assert "torch_empty_cache_steps=2" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="PrinterCallback is not supported"):
        run({"train_file": "unused.csv", "output_dir": str(tmp_path / "y")}, callbacks=[PrinterCallback()])
    assert not (tmp_path / "y").exists()  # nothing created: refused before any work


def test_a_user_model_with_data_files_is_tokenized_by_its_own_tokenizer(tiny_bert_no_dropout, sentiment_files,
                                                                         tmp_path):
    """run(model=...) without processing_class, over data files: the model's own tokenizer (the one it was
    loaded from) tokenizes them and is exported with it. A frozen model, or one without a known source, is
    refused in one line."""
    from scaletune.errors import ConfigError

    job = {**sentiment_files, "max_steps": 1, "do_predict": False, "disable_tqdm": True, "report_to": "none"}
    result = run({**job, "output_dir": str(tmp_path / "own")}, model=user_model(tiny_bert_no_dropout))
    assert result.global_step == 1 and "eval_accuracy" in result.metrics
    assert (tmp_path / "own" / "tokenizer.json").is_file()
    frozen = user_model(tiny_bert_no_dropout).requires_grad_(False)
    with pytest.raises(ConfigError, match="has no trainable parameters"):
        run({**job, "output_dir": str(tmp_path / "frozen")}, model=frozen)
    assert not (tmp_path / "frozen").exists()  # refused before any work
    anonymous = user_model(tiny_bert_no_dropout)
    anonymous.config._name_or_path = ""
    with pytest.raises(ConfigError, match="pass processing_class=<tokenizer> or set tokenizer_name"):
        run({**job, "output_dir": str(tmp_path / "anonymous")}, model=anonymous)
