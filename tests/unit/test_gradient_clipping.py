"""`distributed.clip_gradients`: accelerate's clipping, bit for bit, without writing gradients that clipping
would multiply by 1 (host gradients only)."""

from __future__ import annotations

import pytest
import torch

from scaletune.distributed import clip_gradients


def model_with_gradients(scale: float) -> torch.nn.Module:
    """A small MLP whose gradient norm is `scale` times that of one backward pass."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    model(torch.randn(8, 16)).square().mean().backward()
    for p in model.parameters():
        p.grad.mul_(scale)
    return model


def norm_of(model) -> float:
    return float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))


def versions(model) -> list[int]:
    """Autograd's in-place write counters: an in-place multiplication of a gradient bumps its counter."""
    return [p.grad._version for p in model.parameters()]


@pytest.mark.parametrize("where", ["under", "at", "over", "off"])
def test_clipping_equals_accelerates_and_leaves_gradients_it_would_not_change_unwritten(accelerator, where):
    unit = norm_of(model_with_gradients(1.0))
    # "at": the norm equals the bound, where torch's coefficient max/(norm + 1e-6) is just below 1 and clips.
    scale, max_norm = {"under": (0.5, unit), "at": (1.0, unit), "over": (3.0, unit),
                       "off": (3.0, float("inf"))}[where]
    ours, reference = model_with_gradients(scale), model_with_gradients(scale)
    if where == "at":
        max_norm = norm_of(ours)
    before = versions(ours)
    got = clip_gradients(accelerator, ours.parameters(), max_norm)
    want = accelerator.clip_grad_norm_(reference.parameters(), max_norm)
    assert torch.equal(got, want)
    for p, q in zip(ours.parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad)
    written = [a != b for a, b in zip(before, versions(ours))]
    if where in ("under", "off"):
        assert not any(written), "a gradient was multiplied by 1"
    else:
        assert all(written)
        assert norm_of(ours) == pytest.approx(max_norm, rel=1e-5)


def test_an_unused_parameter_without_gradient_is_skipped_like_accelerate_skips_it(accelerator):
    ours, reference = model_with_gradients(3.0), model_with_gradients(3.0)
    ours[2].weight.grad = reference[2].weight.grad = None
    got = clip_gradients(accelerator, ours.parameters(), 0.1)
    want = accelerator.clip_grad_norm_(reference.parameters(), 0.1)
    assert torch.equal(got, want)
    assert ours[2].weight.grad is None
    for p, q in zip(ours.parameters(), reference.parameters()):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
