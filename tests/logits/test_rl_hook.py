"""klest.rl accepts logits: the exact full-vocabulary KL per position, as a penalty or a loss."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import klest.rl as rl  # noqa: E402


def _naive(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    return (la.exp() * (la - lb)).sum(-1)


def test_loss_penalty_and_per_token():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=g) < 0.7
    per = rl.full_kl_per_token(a, b, mask)
    want = torch.where(mask, _naive(a, b), torch.zeros(()))
    torch.testing.assert_close(per, want, rtol=0, atol=1e-10)
    pen = rl.full_kl_penalty(a, b, mask)
    assert not pen.requires_grad
    torch.testing.assert_close(pen, want.detach(), rtol=0, atol=1e-10)
    for mode in rl.AGGREGATIONS:
        loss = rl.full_kl_loss(a, b, mask, mode)
        (grad,) = torch.autograd.grad(loss, a)
        a2 = a.detach().clone().requires_grad_(True)
        ref = rl.aggregate(_naive(a2, b), mask, mode)
        (grad2,) = torch.autograd.grad(ref, a2)
        torch.testing.assert_close(loss, ref, rtol=0, atol=1e-10)
        torch.testing.assert_close(grad, grad2, rtol=0, atol=1e-10)
    fwd = rl.full_kl_per_token(a, b, direction="forward")
    torch.testing.assert_close(fwd, _naive(b, a), rtol=0, atol=1e-10)
