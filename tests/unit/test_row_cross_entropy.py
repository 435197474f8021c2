"""`losses.row_cross_entropy`: the fp32 cross-entropy of every row without an fp32 copy of all the logits, and
the causal-LM loss that shifts its labels instead of copying its logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scaletune import losses
from scaletune.losses import IGNORE_INDEX, row_cross_entropy
from scaletune.tasks.clm import ShiftedCrossEntropy


def bf16_scores(rows: int = 24, vocab: int = 1000, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    scores = (3 * torch.randn(rows, vocab, generator=generator)).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[::5] = IGNORE_INDEX
    return scores, targets


def saved_bytes(fn) -> tuple[torch.Tensor, int]:
    """fn()'s result and the bytes of every tensor autograd saved for its backward."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_half_precision_rows_equal_the_plain_fp32_loss_and_gradient_in_chunks(monkeypatch, smoothing):
    monkeypatch.setattr(losses, "UPCAST_CHUNK_ELEMENTS", 7 * 1000)  # 7 rows a chunk: 4 chunks, the last short
    ours_in, targets = bf16_scores()
    plain_in, _ = bf16_scores()
    ours = row_cross_entropy(ours_in, targets, label_smoothing=smoothing)
    plain = F.cross_entropy(plain_in.float(), targets, ignore_index=IGNORE_INDEX, reduction="none",
                            label_smoothing=smoothing)
    assert ours.dtype == torch.float32 and torch.equal(ours, plain)
    ours.sum().backward()
    plain.sum().backward()
    assert torch.equal(ours_in.grad, plain_in.grad)


def test_no_fp32_copy_of_the_logits_is_kept_for_the_backward(monkeypatch):
    monkeypatch.setattr(losses, "UPCAST_CHUNK_ELEMENTS", 7 * 1000)
    scores, targets = bf16_scores()
    logits_bytes = scores.numel() * scores.element_size()
    _, ours = saved_bytes(lambda: row_cross_entropy(scores, targets))
    _, plain = saved_bytes(lambda: F.cross_entropy(scores.float(), targets, ignore_index=IGNORE_INDEX,
                                                   reduction="none"))
    assert plain >= 2 * logits_bytes  # the fp32 log-softmax the plain path keeps: what the chunks avoid
    assert ours <= logits_bytes * 1.05  # the half-precision chunks (and the targets), nothing in fp32


def test_fp32_rows_are_the_plain_loss():
    scores, targets = bf16_scores()
    scores = scores.detach().float()
    assert torch.equal(row_cross_entropy(scores, targets),
                       F.cross_entropy(scores, targets, ignore_index=IGNORE_INDEX, reduction="none"))


def test_causal_lm_loss_shifts_labels_and_equals_the_shifted_logits_formula():
    """Position t scores label t+1 (the row's last position scores nothing): the same per-row sums and counts as
    cross-entropy over logits[:, :-1] against labels[:, 1:] (the same row losses; a sum of one more zero may round
differently), without flattening a copy of them."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 9, 50, generator=generator)
    labels = torch.randint(0, 50, (3, 9), generator=generator)
    labels[0, 6:] = IGNORE_INDEX  # a padded row
    labels[2, 0] = IGNORE_INDEX
    sums, counts = ShiftedCrossEntropy().per_sample(logits, labels)
    flat = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="none")
    assert sums.tolist() == pytest.approx(flat.view(3, 8).sum(dim=1).tolist(), rel=1e-6)
    assert counts.tolist() == [5.0, 8.0, 8.0]
