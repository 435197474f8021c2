"""`padding_free` for the encoder tasks end to end: a tiny BERT (no dropout, whose draws would follow the batch's
shape) trained in fp32 on real data -- masked LM on Rotten Tomatoes review lines, token classification on the
packaged tweets (packaged:tweet_ner) -- with each training batch flattened into one row trains exactly like the
padded batches: the same per-step loss and gradient norm, the same evaluation, the same counts of examples and
real tokens. The flattening and the checks by hand are in tests/unit/test_padding_free_flattening.py."""

from __future__ import annotations

import json

import pytest

from scaletune.train import run
from support.ner_clm import make_tiny_token_bert, rotten_lines
from support.tiny import make_tiny_bert

pytestmark = pytest.mark.slow  # every test here launches a training run

TOLERANCE = 1e-5
"""Relative, per step: the flattened row sums the same tokens' losses in another order and the sparse MLM head
projects another number of rows (measured: at most ~1e-7 in fp32)."""


def tweet_files(folder) -> tuple[dict, list[str]]:
    """The first packaged tweets, validation cut to the tags the training tweets have; and the tag list."""
    from scaletune import assets

    rows = {split: [json.loads(line) for line in open(path)]
            for split, path in assets.dataset_files("packaged:tweet_ner").items()}
    train = rows["train"][:48]
    tags = sorted({t for r in train for t in r["ner_tags"]})
    validation = [r for r in rows["validation"] if set(r["ner_tags"]) <= set(tags)][:24]
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, chosen in (("train", train), ("validation", validation)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen))
        files[f"{split}_file"] = str(folder / f"{split}.jsonl")
    return files, tags


def setup(task: str, root) -> dict:
    if task == "mlm":
        files = rotten_lines(root / "text", n_train=48, n_validation=16, n_test=1)
        files.pop("test_file")
        model = make_tiny_bert(root / "bert_mlm", mlm=True, dropout=0.0)
        return {"task": "mlm", "model_name_or_path": str(model), **files, "line_by_line": True,
                "max_seq_length": 64}
    files, tags = tweet_files(root / "tweets")
    model = make_tiny_token_bert(root / "bert_ner", labels=tuple(tags), dropout=0.0)
    return {"task": "token_classification", "model_name_or_path": model, **files, "max_seq_length": 48}


def step_values(history: list, key: str) -> dict:
    return {e["step"]: e[key] for e in history if key in e and "eval_loss" not in e and "train_loss" not in e}


def tokens_per_example(log: list) -> list:
    return [e["tokens_per_second"] / e["samples_per_second"] for e in log if "samples_per_second" in e]


@pytest.mark.parametrize("task", ["mlm", "token_classification"])
def test_padding_free_encoder_trains_exactly_like_padded_batches(task, tmp_path):
    base = {**setup(task, tmp_path), "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8,
            "learning_rate": 1e-3, "max_steps": 6, "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no",
            "do_predict": False, "disable_tqdm": True, "report_to": "none"}
    padded = run({**base, "output_dir": str(tmp_path / "padded")})
    flat = run({**base, "padding_free": True, "output_dir": str(tmp_path / "flat")})
    worst = 0.0
    for key in ("loss", "grad_norm"):
        want, got = step_values(padded.log_history, key), step_values(flat.log_history, key)
        assert sorted(want) == sorted(got) == list(range(1, 7)), key
        worst = max(worst, *(abs(got[s] - want[s]) / abs(want[s]) for s in want))
    print(f"{task}: largest relative per-step difference padding_free vs padded (loss, grad_norm): {worst:.2e}")
    assert worst <= TOLERANCE
    eval_keys = sorted(k for k in padded.metrics if k.startswith("eval_") and "per_second" not in k
                       and "runtime" not in k)
    assert "eval_loss" in eval_keys and sorted(k for k in flat.metrics if k in eval_keys) == eval_keys
    for key in eval_keys:
        assert flat.metrics[key] == pytest.approx(padded.metrics[key], rel=TOLERANCE, abs=1e-9), key
    # The same examples and real tokens are counted (a flattened row is 8 examples, not 1).
    want = tokens_per_example(padded.log_history)
    assert len(want) == 6 and tokens_per_example(flat.log_history) == pytest.approx(want, rel=1e-9)
