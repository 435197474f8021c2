"""The model card states what the run started from and how it was set (issue #26, item 11), without a run."""

from __future__ import annotations

from scaletune.config import load_config
from scaletune.modelcard import hyperparameters, write_model_card


def card(tmp_path, model_name_or_path: str, name_or_path: str, **training) -> str:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = load_config({"train_file": "t.csv", "model_name_or_path": model_name_or_path,
                       "output_dir": str(tmp_path / "out"), **training})
    model = BertForSequenceClassification(BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=8))
    model.config._name_or_path = name_or_path  # what from_pretrained sets: the folder or Hub id it loaded
    return write_model_card(tmp_path, cfg, model, [], 1, None, None, "max_steps").read_text()


def test_the_card_links_only_a_hub_base_model_and_keeps_a_warmup_fraction(tmp_path):
    local = tmp_path / "my-bert"
    local.mkdir()
    text = card(tmp_path, str(local), str(local))
    assert "base_model" not in text and "huggingface.co/" not in text and "trained from scratch" not in text
    assert "fine-tuned version of my-bert (a local model)" in text
    from scaletune.assets import model_path

    text = card(tmp_path, "packaged:minilm", model_path("packaged:minilm"))
    assert "base_model" not in text and "huggingface.co/" not in text
    assert "fine-tuned version of packaged:minilm (a model packaged with scaletune)" in text
    text = card(tmp_path, "bert-base-uncased", "bert-base-uncased")
    assert "base_model: bert-base-uncased" in text and "(https://huggingface.co/bert-base-uncased)" in text

    fraction = hyperparameters(load_config({"train_file": "t.csv", "warmup_steps": 0.1}), 1)
    assert fraction["lr_scheduler_warmup_ratio"] == 0.1 and "lr_scheduler_warmup_steps" not in fraction
    steps = hyperparameters(load_config({"train_file": "t.csv", "warmup_steps": 5}), 1)
    assert steps["lr_scheduler_warmup_steps"] == 5 and "lr_scheduler_warmup_ratio" not in steps
