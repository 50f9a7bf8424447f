"""Top-k KL (a lower bound, exact at k = V − 1) and the variants fused with the output layer.

References: the coarsened KL is written here from its definition on explicit (k + 1)-outcome
distributions; the fused variants are compared with the logits-input functions on
``hidden @ weight.T`` computed explicitly, and with naive log_softmax formulas (float64, 1e-10).
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from klest import KlestError  # noqa: E402
from klest.logits import (  # noqa: E402
    full_kl,
    full_kl_from_hidden,
    token_logprobs,
    token_logprobs_from_hidden,
    topk_kl,
)

F64 = torch.float64


def coarsened_kl(a: torch.Tensor, b: torch.Tensor, k: int, direction: str) -> torch.Tensor:
    """KL of π and π_ref coarsened to π_ref's top-k tokens + the rest, built explicitly."""
    P = torch.softmax(a, -1)
    Q = torch.softmax(b, -1)
    idx = Q.topk(k, -1).indices
    Pk, Qk = P.gather(-1, idx), Q.gather(-1, idx)
    Pc = torch.cat([Pk, (1 - Pk.sum(-1, keepdim=True)).clamp_min(0)], -1)
    Qc = torch.cat([Qk, (1 - Qk.sum(-1, keepdim=True)).clamp_min(0)], -1)
    if direction == "forward":
        Pc, Qc = Qc, Pc
    return torch.xlogy(Pc, Pc / Qc).sum(-1)


def rand(shape, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64) * scale


# ----------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_topk_is_the_coarsened_kl(direction, k):
    a, b = rand((3, 4, 12), 0), rand((3, 4, 12), 1)
    r, i = torch.log_softmax(b, -1).topk(k)
    got = topk_kl(a, r, i, direction=direction)
    torch.testing.assert_close(got, coarsened_kl(a, b, k, direction), rtol=0, atol=1e-10)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_topk_lower_bound_and_equality_at_v_minus_1(direction):
    V = 20
    a, b = rand((200, V), 2), rand((200, V), 3)  # 200 random pairs
    full = full_kl(a, b, direction=direction)
    lb = torch.log_softmax(b, -1)
    for k in (1, 5, 12):
        r, i = lb.topk(k)
        assert torch.all(topk_kl(a, r, i, direction=direction) <= full + 1e-12)
    r, i = lb.topk(V - 1)
    torch.testing.assert_close(topk_kl(a, r, i, direction=direction), full, rtol=0, atol=1e-10)
    # the bound is not an equality for small k (the test can fail)
    r, i = lb.topk(5)
    assert float((full - topk_kl(a, r, i, direction=direction)).mean()) > 1e-2


def test_topk_gradcheck_and_order_of_indices():
    a = rand((1, 3, 6), 4).requires_grad_(True)
    lb = torch.log_softmax(rand((1, 3, 6), 5), -1)
    r, i = lb.topk(3)
    r = r.clone().requires_grad_(True)
    for direction in ("reverse", "forward"):
        assert torch.autograd.gradcheck(
            lambda a, r: topk_kl(a, r, i, direction=direction, temperature=0.8, chunk_size=2),
            (a, r),
        )
    perm = torch.tensor([2, 0, 1])  # the order of the k entries does not matter
    torch.testing.assert_close(topk_kl(a, r, i), topk_kl(a, r[..., perm], i[..., perm]))


def test_topk_rest_mass_is_exact_and_edge_cases():
    # The policy's rest mass R is summed over the rest, not computed as 1 − Σ_K π, which in
    # float32 would give 0 or 1.2e-7 here (R ≈ 1e-9) and a forward KL of +inf or 0.009.
    a = torch.tensor([[0.0, 0.0, -20.0]])
    r = torch.log(torch.tensor([[0.5, 0.499]]))  # reference rest ≈ 1e-3
    i = torch.tensor([[0, 1]])
    R = math.exp(-20.0) / (2 + math.exp(-20.0))
    pk = (1 - R) / 2
    q0, q1 = (math.exp(float(v)) for v in r[0])  # the float32 inputs, exactly
    q_rest = 1 - q0 - q1
    want = q0 * math.log(q0 / pk) + q1 * math.log(q1 / pk) + q_rest * math.log(q_rest / R)
    got = topk_kl(a, r, i, direction="forward")[0]
    assert abs(float(got) - want) < 1e-5 * want
    # reference top-k summing to 1 while the policy has mass elsewhere: R_ref = 0 is not told
    # apart from rounding, so the least probable listed token is merged with the rest (a
    # coarser partition: a finite lower bound): outcomes {0}, {1} ∪ rest
    a64 = a.double()
    r_all = torch.log(torch.tensor([[0.5, 0.5]], dtype=F64))
    lp = torch.log_softmax(a64[0], -1)
    p0, p_rest = float(lp[0].exp()), float(lp[1:].exp().sum())
    want = p0 * math.log(p0 / 0.5) + p_rest * math.log(p_rest / 0.5)
    assert abs(float(topk_kl(a64, r_all, i)[0]) - want) < 1e-12
    want_f = 0.5 * math.log(0.5 / p0) + 0.5 * math.log(0.5 / p_rest)
    assert abs(float(topk_kl(a64, r_all, i, direction="forward")[0]) - want_f) < 1e-12


def test_topk_masked_positions_and_bad_input():
    a = rand((2, 3, 6), 6)
    r, i = torch.log_softmax(rand((2, 3, 6), 7), -1).topk(2)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    i_pad = torch.where(mask[..., None], i, torch.full_like(i, -1))
    r_pad = torch.where(mask[..., None], r, torch.full_like(r, math.nan))
    got = topk_kl(a, r_pad, i_pad, mask)
    assert torch.all(got[~mask] == 0)
    torch.testing.assert_close(got[mask], topk_kl(a, r, i)[mask], rtol=0, atol=1e-12)
    with pytest.raises(KlestError, match="twice"):
        topk_kl(a, r, torch.zeros_like(i))
    with pytest.raises(KlestError, match=r"\[0, 6\)"):
        topk_kl(a, r, i + 6)
    with pytest.raises(KlestError, match="integer"):
        topk_kl(a, r, i.double())
    with pytest.raises(KlestError, match="sum to"):
        topk_kl(a, r + 1.0, i)
    with pytest.raises(KlestError, match="NaN"):
        topk_kl(a, r_pad, i)
    with pytest.raises(KlestError, match="shape"):
        topk_kl(a, r[..., :1], i)


# ----------------------------------------------------------------------------- fused hidden


def layer(seed, B=2, T=5, H=4, V=13):
    return rand((B, T, H), seed, 1.0), rand((V, H), seed + 1, 1.0)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_fused_kl_equals_explicit_logits(direction):
    (h, W), (hr, Wr) = layer(0), layer(2, H=6)
    mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(0)) < 0.7
    args = [t.clone().requires_grad_(True) for t in (h, W, hr, Wr)]
    fused = full_kl_from_hidden(*args, mask, direction, 0.9, chunk_size=3, vocab_chunk_size=4)
    explicit_in = [t.clone().requires_grad_(True) for t in (h, W, hr, Wr)]
    hx, Wx, hrx, Wrx = explicit_in
    explicit = full_kl(hx @ Wx.T, hrx @ Wrx.T, mask, direction, 0.9)
    torch.testing.assert_close(fused, explicit, rtol=0, atol=1e-10)
    w = rand((2, 5), 9)
    (fused * w).sum().backward()
    (explicit * w).sum().backward()
    for x, y in zip(args, explicit_in, strict=True):
        torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=1e-10)


def test_fused_tokens_equal_explicit_logits():
    h, W = layer(4)
    t = torch.randint(0, 13, (2, 5), generator=torch.Generator().manual_seed(1))
    hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    lp, H = token_logprobs_from_hidden(hh, WW, t, 1.1, return_entropy=True, vocab_chunk_size=5)
    h2, W2 = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    lp2, H2 = token_logprobs(h2 @ W2.T, t, 1.1, return_entropy=True)
    torch.testing.assert_close(lp, lp2, rtol=0, atol=1e-10)
    torch.testing.assert_close(H, H2, rtol=0, atol=1e-10)
    (lp.sum() + 0.3 * H.sum()).backward()
    (lp2.sum() + 0.3 * H2.sum()).backward()
    torch.testing.assert_close(hh.grad, h2.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(WW.grad, W2.grad, rtol=0, atol=1e-10)


def test_fused_gradcheck():
    (h, W), (hr, Wr) = layer(5, B=1, T=3, H=2, V=5), layer(7, B=1, T=3, H=3, V=5)
    xs = tuple(t.clone().requires_grad_(True) for t in (h, W, hr, Wr))
    assert torch.autograd.gradcheck(
        lambda *x: full_kl_from_hidden(*x, chunk_size=2, vocab_chunk_size=2), xs
    )
    t = torch.tensor([[0, 4, 2]])
    assert torch.autograd.gradcheck(
        lambda h, W: token_logprobs_from_hidden(h, W, t, return_entropy=True, vocab_chunk_size=2),
        xs[:2],
    )


def test_fused_float32_and_bf16():
    (h, W), (hr, Wr) = layer(8, V=300), layer(9, V=300)
    want = full_kl(h @ W.T, hr @ Wr.T)
    got = full_kl_from_hidden(h.float(), W.float(), hr.float(), Wr.float(), vocab_chunk_size=64)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5)
    # bf16 parameters: the float64 reference on the same rounded parameters
    hb, Wb, hrb, Wrb = (t.bfloat16() for t in (h, W, hr, Wr))
    want_b = full_kl(hb.double() @ Wb.double().T, hrb.double() @ Wrb.double().T)
    Wb.requires_grad_(True)
    got_b = full_kl_from_hidden(hb, Wb, hrb, Wrb, vocab_chunk_size=64)
    torch.testing.assert_close(got_b.double(), want_b, rtol=1e-5, atol=2e-5)
    got_b.sum().backward()
    assert Wb.grad.dtype == torch.bfloat16 and torch.isfinite(Wb.grad.float()).all()


def test_fused_bad_input():
    (h, W), (hr, Wr) = layer(0), layer(2)
    with pytest.raises(KlestError, match="vocabulary size"):
        full_kl_from_hidden(h, W, hr, Wr[:-1])
    with pytest.raises(KlestError, match="weight"):
        full_kl_from_hidden(h, W[:, :-1], hr, Wr)
    with pytest.raises(KlestError, match="leading shape"):
        full_kl_from_hidden(h, W, hr[:1], Wr)
    with pytest.raises(KlestError, match=r"\[0, 13\)"):
        token_logprobs_from_hidden(h, W, torch.full((2, 5), 13))
    bad = h.clone()
    bad[0, 0, 0] = math.nan
    with pytest.raises(KlestError, match="NaN"):
        full_kl_from_hidden(bad, W, hr, Wr)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_topk_kl_k0_is_zero_with_zero_gradients(direction: str) -> None:
    """k = 0: π and π_ref each coarsen to the single outcome "everything" with mass 1, so the
    coarsened KL is 1·log(1/1) = 0 exactly, and does not move with the logits (gradient 0),
    also with a -inf logit (no 0·inf)."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 3, 7, generator=g, dtype=F64)
    a[0, 1, 4] = -math.inf
    a.requires_grad_(True)
    r = torch.zeros(2, 3, 0, dtype=F64, requires_grad=True)
    i = torch.zeros(2, 3, 0, dtype=torch.int64)
    v = topk_kl(a, r, i, direction=direction)
    assert v.shape == (2, 3)
    assert bool((v == 0).all())
    (v * torch.arange(1.0, 7.0, dtype=F64).reshape(2, 3)).sum().backward()
    assert a.grad is not None and bool((a.grad == 0).all())
    mask = torch.tensor([[True, False, True], [True, True, False]])
    assert float(topk_kl(a, r, i, mask=mask, aggregation="token-mean").detach()) == 0.0
    # the explicit coarsening agrees: k = 0 leaves one bucket holding all the mass
    b = torch.randn(2, 3, 7, generator=g, dtype=F64)
    assert bool((coarsened_kl(a.detach(), b, 0, direction).abs() < 1e-15).all())


def test_topk_kl_k0_shape_mismatch_is_refused() -> None:
    a = torch.randn(2, 5)
    with pytest.raises(KlestError, match="shape"):
        topk_kl(a, torch.zeros(2, 0), torch.zeros(3, 0, dtype=torch.int64))
