"""A local model folder holds what the run reads from it, checked in preflight (no torch): a config.json that
parses, weights, a tokenizer (issue 23, item 5). Without tokenizer files transformers 5 builds an empty
tokenizer from config.json and says nothing, so that case must be refused, not trained on."""

from __future__ import annotations

from pathlib import Path

import pytest

from scaletune.errors import ModelError
from scaletune.model_source import check_source


def folder(tmp_path: Path, **files: str) -> str:
    path = tmp_path / "model"
    path.mkdir()
    for name, text in files.items():
        (path / name.replace("__", ".")).write_text(text)
    return str(path)


WHOLE = {"config__json": '{"model_type": "bert"}', "model__safetensors": "w", "tokenizer__json": "{}"}


def check(path: str, key: str = "model_name_or_path") -> None:
    check_source(key, path, None, "main", wants_config=key != "tokenizer_name",
                 wants_weights=key == "model_name_or_path", wants_tokenizer=True)


@pytest.mark.parametrize("drop,expected", [("config__json", "without config.json"),
                                           ("model__safetensors", "holds config.json but no weights"),
                                           ("tokenizer__json", "holds no tokenizer")])
def test_a_folder_missing_a_part_is_refused_naming_it(tmp_path, drop, expected):
    with pytest.raises(ModelError, match=expected):
        check(folder(tmp_path, **{k: v for k, v in WHOLE.items() if k != drop}))


@pytest.mark.parametrize("config,expected", [('{"model_type": "bert",', "not valid JSON"),
                                             ('["bert"]', "holds a JSON list")])
def test_a_damaged_config_json_is_refused(tmp_path, config, expected):
    with pytest.raises(ModelError, match=expected):
        check(folder(tmp_path, **{**WHOLE, "config__json": config}))


@pytest.mark.parametrize("tokenizer_file", ["tokenizer_config.json", "vocab.txt", "spiece.model", "merges.txt"])
def test_any_tokenizer_file_and_sharded_weights_pass(tmp_path, tokenizer_file):
    path = folder(tmp_path, config__json="{}", **{"model-00001-of-00002__safetensors": "w",
                                                  "model__safetensors__index__json": "{}"})
    (Path(path) / tokenizer_file).write_text("x")
    check(path)


def test_a_tokenizer_name_folder_needs_only_the_tokenizer(tmp_path):
    check(folder(tmp_path, tokenizer_config__json="{}"), key="tokenizer_name")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="tokenizer_name=.* holds no tokenizer"):
        check(str(empty), key="tokenizer_name")


def test_a_damaged_weights_file_is_one_line_naming_the_reader(tiny_bert, tmp_path):
    """A weights file the folder check cannot judge without reading it: safetensors' own error kind (not an
    OSError or ValueError) becomes one ModelError line when the model loads."""
    import shutil

    from transformers import AutoModelForSequenceClassification

    from scaletune.model_source import load_exported

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_bert, damaged)
    (damaged / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match=r"Could not load the model from .* \(SafetensorError\): .*\n?") as e:
        load_exported(AutoModelForSequenceClassification, str(damaged))
    assert "\n" not in str(e.value)
