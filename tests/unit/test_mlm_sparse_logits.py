"""Masked-LM logits only where labels are: same loss, gradients and predictions as full logits; the exported
model is a plain `BertForMaskedLM`; the task modules import without torch (start-up checks stay fast)."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch

from scaletune.config import load_config
from scaletune.losses import CrossEntropy, SparseTokenCrossEntropy, labelled_first
from scaletune.tasks import get_task
from scaletune.tasks.mlm import LABEL_POSITIONS, ROWS_MULTIPLE, ContentSeededMLMCollator, label_positions
from support.mlm import line_examples, rotten_texts
from support.tiny import make_tiny_bert


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A task that built a tiny BERT (dropout off) with its sparse head, the config and tokenizer."""
    from transformers import AutoTokenizer

    path = make_tiny_bert(tmp_path_factory.mktemp("mlm") / "bert", mlm=True, dropout=0.0)
    cfg = load_config({"task": "mlm", "model_name_or_path": str(path), "train_file": "x.txt", "line_by_line": True})
    tokenizer = AutoTokenizer.from_pretrained(path)
    task = get_task("mlm")
    model = task.build_model(cfg, None, tokenizer)
    return task, model, cfg, tokenizer, path


def batch_of(built, n=12, training=True):
    task, _, cfg, tokenizer, _ = built
    return task.collator(tokenizer, cfg, training)(line_examples(tokenizer, rotten_texts(n)))


def split(batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return inputs, {k: v for k, v in inputs.items() if k != LABEL_POSITIONS}


def test_loss_and_gradients_equal_the_full_logits_path(built):
    task, model, cfg, *_ = built
    batch = batch_of(built)
    sparse_inputs, full_inputs = split(batch)
    model.train()
    results = []
    for inputs, loss in ((full_inputs, CrossEntropy()), (sparse_inputs, task.loss(cfg))):
        model.zero_grad(set_to_none=True)
        logits = model(**inputs).logits
        losses, items = loss.per_sample(logits, batch["labels"])
        losses.sum().backward()
        results.append((logits.shape, losses.detach(), items,
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full_shape, full_losses, full_items, full_grads), (sparse_shape, sparse_losses, sparse_items, sparse_grads) = results
    rows, width = batch["labels"].shape
    most = int((batch["labels"] != -100).sum(dim=1).max())
    assert full_shape == (rows, width, model.config.vocab_size)
    # Only (about) the labelled positions were projected: the most any row has, rounded up.
    assert sparse_shape[0] == rows and most <= sparse_shape[1] < most + ROWS_MULTIPLE and sparse_shape[1] < width
    assert sparse_shape[2] == model.config.vocab_size
    assert torch.equal(sparse_items, full_items)
    torch.testing.assert_close(sparse_losses, full_losses, rtol=1e-5, atol=1e-6)
    assert sparse_grads.keys() == full_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(sparse_grads[name], full_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_label_smoothing_matches_too():
    torch.manual_seed(0)
    labels = torch.full((3, 7), -100)
    labels[0, 1], labels[0, 5], labels[2, 0] = 4, 9, 2
    full = torch.randn(3, 7, 11)
    compact = full.gather(1, labelled_first(labels, 2).unsqueeze(-1).expand(-1, -1, 11))  # B x K x V, K = 2
    for smoothing in (0.0, 0.1):
        want = CrossEntropy(label_smoothing=smoothing).per_sample(full, labels)
        got = SparseTokenCrossEntropy(label_smoothing=smoothing).per_sample(compact, labels)
        torch.testing.assert_close(got, want)
        # Full logits go through the same loss unchanged (a model without a sparse head).
        torch.testing.assert_close(SparseTokenCrossEntropy(label_smoothing=smoothing).per_sample(full, labels), want)


def test_evaluation_predictions_equal_at_labelled_positions(built):
    task, model, *_ = built
    batch = batch_of(built, training=False)
    sparse_inputs, full_inputs = split(batch)
    model.eval()
    with torch.no_grad():
        sparse = task.preprocess_logits(model(**sparse_inputs).logits, batch["labels"])
        full = task.preprocess_logits(model(**full_inputs).logits, batch["labels"])
    labelled = batch["labels"] != -100
    assert sparse.shape == batch["labels"].shape  # batch x length: evaluation pads and gathers it per sample
    assert torch.equal(sparse[labelled], full[labelled])
    assert (sparse[~labelled] == -100).all()


def test_a_batch_without_labelled_positions(built):
    task, model, cfg, *_ = built
    batch = batch_of(built, n=2)
    batch["labels"].fill_(-100)
    batch[LABEL_POSITIONS] = label_positions(batch["labels"])
    logits = model(**split(batch)[0]).logits
    losses, items = task.loss(cfg).per_sample(logits, batch["labels"])
    assert logits.shape[1] == 4  # 2 rows x 4 = a multiple of 8 rows, all padding
    assert losses.tolist() == [0.0, 0.0] and items.tolist() == [0.0, 0.0]


def test_label_positions_order_and_size():
    labels = torch.full((3, 10), -100)
    labels[0, [2, 7]] = 5
    labels[1, [0, 1, 4, 9]] = 6
    positions = label_positions(labels)
    assert positions.shape == (3, 8)  # the most per row (4), raised until 3 x K is a multiple of 8
    assert positions[0, :2].tolist() == [2, 7] and positions[1, :4].tolist() == [0, 1, 4, 9]
    for row in range(3):  # padding slots point at unlabelled columns, each column once
        assert len(set(positions[row].tolist())) == 8
        assert (labels[row, positions[row, (labels[row] != -100).sum():]] == -100).all()
    labels[2, :] = 1  # a full row: K would be the row length, so no positions (full logits, same cost)
    assert label_positions(labels) is None


def test_collators_emit_positions_only_for_a_model_that_reads_them(built):
    task, _, cfg, tokenizer, _ = built
    batch = batch_of(built)
    assert torch.equal(batch[LABEL_POSITIONS], label_positions(batch["labels"]))
    assert batch[LABEL_POSITIONS].shape[0] == batch["labels"].shape[0]  # batch-major: accelerate may slice it
    # A task that built no model (its collator handed to transformers.Trainer, say) gives the plain batch.
    plain = get_task("mlm").collator(tokenizer, cfg, True)(line_examples(tokenizer, rotten_texts(4)))
    assert set(plain) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    col = task.collator(tokenizer, cfg, True)
    assert isinstance(col, ContentSeededMLMCollator)
    assert pickle.loads(pickle.dumps(col)).label_positions  # dataloader workers get the same collator


def test_the_exported_model_is_a_plain_masked_lm(built, tmp_path):
    from transformers import AutoModelForMaskedLM, pipeline

    task, model, cfg, tokenizer, path = built
    assert model.state_dict().keys() == AutoModelForMaskedLM.from_pretrained(path).state_dict().keys()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == "BertForMaskedLM"
    assert not reloaded._forward_pre_hooks and not reloaded.cls.predictions._forward_pre_hooks
    fill = pipeline("fill-mask", model=str(tmp_path), device="cpu")
    assert len(fill(f"a {tokenizer.mask_token} movie")) == 5
    # The in-memory model also gives full logits when no positions come with the inputs.
    inputs = tokenizer(["a good movie"], return_tensors="pt")
    assert model(**inputs).logits.shape == (1, inputs["input_ids"].shape[1], model.config.vocab_size)


@pytest.mark.slow  # launches a process or a run (tests/conftest.py)
def test_task_modules_import_without_torch():
    """train.preflight reads task.metric_names for every task before torch is imported: a bad config must
    fail in well under a second."""
    code = ("import sys; from scaletune.tasks import TASKS, get_task; [get_task(t).metric_names for t in TASKS]; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
