"""The compiled float32 CPU pass of full_kl (klest.logits._fused, ``klest[fast]``) against the
naive formula in float64 on the same float32 inputs, and against the torch-op pass.

Both paths are run explicitly (``klest.options(fast=True/False)``): the compiled pass's values to
2e-6 relative + 1e-7 absolute (its sums are float64; the torch pass's float32 ops are held to
test_full.py's 1e-5 + 2e-5), gradients to 1e-5 of the row's largest entry (measured 2.6e-6:
float32 rounding of x/T − max at a logit of 60; the torch pass: 1e-4, measured 1.8e-5);
rows the kernel leaves to torch (−inf, NaN logits) keep the torch rules and errors."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

import klest  # noqa: E402
from klest.logits import _fused, full_kl  # noqa: E402

F64 = torch.float64


def naive(x: torch.Tensor, y: torch.Tensor, T: float) -> torch.Tensor:
    lx = torch.log_softmax(x.double() / T, -1)
    ly = torch.log_softmax(y.double() / T, -1)
    return (lx.exp() * (lx - ly)).sum(-1)


def grads(a, b, T, direction, mask=None):
    a = a.detach().requires_grad_()
    v = full_kl(a, b, temperature=T, direction=direction, mask=mask)
    w = torch.linspace(0.5, 1.5, v.numel()).reshape(v.shape)  # a non-uniform upstream gradient
    (v * w).sum().backward()
    return v.detach(), a.grad


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_fused_pass_matches_float64_and_the_torch_pass(direction, T, monkeypatch):
    calls = []
    real = _fused.kl_rows
    monkeypatch.setattr(_fused, "kl_rows", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(3)
    V = 5000  # more than two of the kernel's blocks, not a multiple of one
    a = torch.randn(4, 7, V, generator=g) * 3
    b = a + torch.randn(4, 7, V, generator=g)
    a[1, 2, 10] = 60.0  # one large logit: the row's mass on one token
    with klest.options(fast=True):
        v_fast, g_fast = grads(a, b, T, direction)
    assert calls, "the compiled pass was not used"
    with klest.options(fast=False):
        v_torch, g_torch = grads(a, b, T, direction)
    x, y = (a, b) if direction == "reverse" else (b, a)
    want = naive(x, y, T).float()
    torch.testing.assert_close(v_fast, want, rtol=2e-6, atol=1e-7)
    # the torch pass (float32 ops throughout) within test_full.py's float32 tolerance
    torch.testing.assert_close(v_torch, want, rtol=1e-5, atol=2e-5)
    ad = a.double().detach().requires_grad_()
    xd, yd = (ad, b.double()) if direction == "reverse" else (b.double(), ad)
    w = torch.linspace(0.5, 1.5, 28, dtype=F64).reshape(4, 7)
    (naive(xd, yd, T) * w).sum().backward()
    scale = ad.grad.abs().amax(-1, keepdim=True)
    assert ((g_fast.double() - ad.grad).abs() <= 1e-5 * scale).all()  # measured 2.6e-6
    assert ((g_torch.double() - ad.grad).abs() <= 1e-4 * scale).all()  # measured 1.8e-5


def test_fused_pass_leaves_non_finite_rows_to_torch():
    """A row with a −inf logit (the token masked in both) keeps the torch rules: the KL over the
    smaller vocabulary, a finite gradient, 0 at the masked entry; a NaN logit is refused; masked
    positions are skipped; views whose rows cannot be flattened into one take the torch pass."""
    g = torch.Generator().manual_seed(4)
    a = torch.randn(6, 3000, generator=g)
    b = torch.randn(6, 3000, generator=g)
    a[2, 5] = b[2, 5] = -math.inf
    with klest.options(fast=True):
        v, ga = grads(a, b, 1.0, "reverse")
    keep = torch.ones(3000, dtype=torch.bool)
    keep[5] = False
    want = naive(a, b, 1.0)
    want[2] = naive(a[2, keep], b[2, keep], 1.0)
    torch.testing.assert_close(v, want.float(), rtol=2e-6, atol=1e-7)
    assert torch.isfinite(ga).all() and ga[2, 5] == 0
    bad = a.clone()
    bad[4, 7] = math.nan
    with klest.options(fast=True), pytest.raises(klest.KlestError, match="NaN"):
        full_kl(bad, b)
    mask = torch.tensor([True, False, True, True, False, True])
    with klest.options(fast=True):
        vm = full_kl(bad.masked_fill(~mask[:, None], math.nan), b, mask=mask)
    assert vm[1] == 0 and vm[4] == 0
    torch.testing.assert_close(vm[mask], want.float()[mask], rtol=2e-6, atol=1e-7)
    big = torch.randn(3, 5, 700, generator=g)
    ref = torch.randn(3, 5, 700, generator=g)
    with klest.options(fast=True):
        got = full_kl(big[:, :-1], ref[:, :-1])  # three row views
    torch.testing.assert_close(
        got, naive(big[:, :-1], ref[:, :-1], 1.0).float(), rtol=2e-6, atol=1e-7
    )


@pytest.mark.parametrize("T", [1.0, 0.5])
def test_entries_masked_with_the_most_negative_float(T):
    """Review: logits masked with finfo(float32).min contribute exactly nothing (e^t is 0 below
    −87, not e^−87 times a huge t − u); at T < 1 the scaled logits overflow to −inf and the row
    goes to the torch ops. Values equal float64's, gradients at the masked entries are 0."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 4000, generator=g)
    b = torch.randn(3, 4000, generator=g)
    a[:, ::2] = torch.finfo(torch.float32).min
    la = torch.log_softmax(a.double() / T, -1)
    lb = torch.log_softmax(b.double() / T, -1)
    p = la.exp()
    want = torch.where(p > 0, p * (la - lb), torch.zeros_like(p)).sum(-1)
    for fast in (True, False):
        x = a.clone().requires_grad_()
        with klest.options(fast=fast):
            v = full_kl(x, b, temperature=T)
        v.sum().backward()
        torch.testing.assert_close(v.double(), want, rtol=2e-6, atol=1e-6)
        assert torch.isfinite(x.grad).all() and (x.grad[:, ::2] == 0).all()


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_one_large_logit_keeps_its_digits(direction):
    """Edge review: a row with one logit of 1e4 (the policy all but one-hot). The torch ops
    formed x − y, whose rounding at 1e4 (ulp 1e-3) cost 6e-4 of the KL; both passes now work
    with logits shifted by the row maxima. Values and gradients against float64."""
    g = torch.Generator().manual_seed(6)
    a = torch.zeros(3, 3000)
    a[:, 5] = 1e4
    b = torch.randn(3, 3000, generator=g)
    x, y = (a, b) if direction == "reverse" else (b, a)
    want = naive(x, y, 1.0)
    ad = a.double().requires_grad_()
    xd, yd = (ad, b.double()) if direction == "reverse" else (b.double(), ad)
    naive(xd, yd, 1.0).sum().backward()
    for fast in (True, False):
        for need_ref in (False, True):  # the second: backward recomputes from saved floats
            aa = a.clone().requires_grad_()
            bb = b.clone().requires_grad_(need_ref)
            with klest.options(fast=fast):
                v = full_kl(aa, bb, direction=direction)
            v.sum().backward()
            torch.testing.assert_close(v.double(), want, rtol=1e-5, atol=2e-5)
            torch.testing.assert_close(aa.grad.double(), ad.grad, rtol=0, atol=2e-5)
