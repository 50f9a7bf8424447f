"""klest.logits against naive full-materialisation formulas in float64.

References are written here from the definitions (log_softmax of whole rows, elementwise sums),
independently of the streaming code. Tolerances: float64 1e-10 (values) / gradcheck defaults;
float32 and bfloat16 inputs are computed in float32, so their values are compared with the float64
result *on the same (rounded) inputs* to 2e-5 absolute + 1e-5 relative (a few float32 ulps of the
row sums, which are O(log V)); bf16 gradients are returned in bf16 (relative rounding 2^-8).
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from klest import KlestError  # noqa: E402
from klest.logits import full_jsd, full_kl, full_tv, token_logprobs  # noqa: E402

F64 = torch.float64
INF = math.inf


def naive_kl(a: torch.Tensor, b: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """KL(softmax(a/T) ‖ softmax(b/T)), materialised."""
    la = torch.log_softmax(a / T, -1)
    lb = torch.log_softmax(b / T, -1)
    return (la.exp() * (la - lb)).sum(-1)


def naive_jsd(a: torch.Tensor, b: torch.Tensor, beta: float) -> torch.Tensor:
    Q = torch.softmax(a, -1)
    P = torch.softmax(b, -1)
    M = beta * P + (1 - beta) * Q

    def kl(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return torch.xlogy(A, A / B).sum(-1)

    return (beta * kl(P, M) + (1 - beta) * kl(Q, M)) / (beta * (1 - beta))


def pair(shape=(3, 4, 9), seed=0, scale=2.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(shape, generator=g, dtype=F64) * scale).to(dtype)
    b = (torch.randn(shape, generator=g, dtype=F64) * scale).to(dtype)
    return a, b


# ----------------------------------------------------------------------------- values, float64


@pytest.mark.parametrize("T", [1.0, 0.6])
def test_kl_both_directions(T):
    a, b = pair()
    torch.testing.assert_close(full_kl(a, b, temperature=T), naive_kl(a, b, T), rtol=0, atol=1e-10)
    torch.testing.assert_close(
        full_kl(a, b, direction="forward", temperature=T), naive_kl(b, a, T), rtol=0, atol=1e-10
    )


def test_kl_large_logits_do_not_cancel():
    a, b = pair(scale=1.0)
    a, b = a + 300.0, b - 200.0  # a constant shift per row changes nothing
    torch.testing.assert_close(full_kl(a, b), naive_kl(a - 300, b + 200), rtol=0, atol=1e-10)


def test_kl_directions_differ():
    a, b = pair()
    assert (full_kl(a, b) - full_kl(a, b, direction="forward")).abs().max() > 1e-2


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.75])
def test_jsd_and_tv(beta):
    a, b = pair()
    torch.testing.assert_close(full_jsd(a, b, beta), naive_jsd(a, b, beta), rtol=0, atol=1e-10)
    tv = 0.5 * (torch.softmax(a, -1) - torch.softmax(b, -1)).abs().sum(-1)
    torch.testing.assert_close(full_tv(a, b), tv, rtol=0, atol=1e-12)


def test_jsd_half_is_four_js():
    a, b = pair()
    P, Q = torch.softmax(b, -1), torch.softmax(a, -1)
    M = (P + Q) / 2
    js = 0.5 * (P * (P / M).log()).sum(-1) + 0.5 * (Q * (Q / M).log()).sum(-1)
    torch.testing.assert_close(full_jsd(a, b, 0.5), 4 * js, rtol=0, atol=1e-10)


def test_jsd_endpoints_are_the_two_kls():
    a, b = pair()
    fwd, rev = naive_kl(b, a), naive_kl(a, b)
    torch.testing.assert_close(full_jsd(a, b, 0.0), fwd, rtol=0, atol=1e-10)
    torch.testing.assert_close(full_jsd(a, b, 1.0), rev, rtol=0, atol=1e-10)
    # continuity: D_β − D_0 = O(β): the gap shrinks linearly (÷100 for β ÷100), both ends
    for beta, end in ((lambda e: e, fwd), (lambda e: 1 - e, rev)):
        gap6 = (full_jsd(a, b, beta(1e-6)) - end).abs()
        gap8 = (full_jsd(a, b, beta(1e-8)) - end).abs()
        assert torch.all(gap8 <= gap6 / 50 + 1e-13) and float(gap8.max()) < 1e-5
    # and the unnormalised form (TRL's) would go to 0, which this is not
    assert float(full_jsd(a, b, 1e-6).min()) > 0.1


def test_token_logprobs_and_entropy():
    a, _ = pair()
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, a.shape[-1], a.shape[:-1], generator=g)
    la = torch.log_softmax(a / 0.7, -1)
    lp, H = token_logprobs(a, t, 0.7, return_entropy=True)
    torch.testing.assert_close(lp, la.gather(-1, t[..., None])[..., 0], rtol=0, atol=1e-12)
    torch.testing.assert_close(H, -(la.exp() * la).sum(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(token_logprobs(a, t.to(torch.int32), 0.7), lp, rtol=0, atol=0)


def test_non_contiguous_input_is_not_copied_and_correct():
    a, b = pair((2, 6, 9))
    a_, b_ = a[:, :-1], b[:, 1:]  # the usual shifted slices of [B, T, V]
    assert not a_.is_contiguous()
    torch.testing.assert_close(full_kl(a_, b_), naive_kl(a_, b_), rtol=0, atol=1e-10)
    # a vocabulary axis that is not contiguous (a permuted tensor) and empty inputs also work
    x = torch.randn(9, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    xp = x.permute(1, 2, 0)
    y = torch.randn(3, 4, 9, dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(full_jsd(xp, y, 0.3), naive_jsd(xp, y, 0.3), rtol=0, atol=1e-10)
    assert full_kl(torch.zeros(0, 5), torch.zeros(0, 5)).shape == (0,)


# ----------------------------------------------------------------------------- gradients


def _req(*xs):
    return tuple(x.clone().requires_grad_(True) for x in xs)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_gradcheck_kl(direction):
    a, b = _req(*pair((2, 2, 4)))
    assert torch.autograd.gradcheck(
        lambda a, b: full_kl(a, b, direction=direction, temperature=0.8, chunk_size=2), (a, b)
    )
    # the policy alone (the reference fixed), as in RL
    assert torch.autograd.gradcheck(
        lambda a: full_kl(a, b.detach(), direction=direction, chunk_size=4), (a,)
    )


@pytest.mark.parametrize("beta", [0.2, 0.5, 0.9])
def test_gradcheck_jsd(beta):
    a, b = _req(*pair((2, 2, 4)))
    assert torch.autograd.gradcheck(
        lambda a, b: full_jsd(a, b, beta, temperature=1.5, chunk_size=2), (a, b)
    )


def test_gradcheck_tv():
    a, b = _req(*pair((2, 2, 4)))
    assert torch.autograd.gradcheck(lambda a, b: full_tv(a, b, chunk_size=3), (a, b))


def test_gradcheck_token_logprobs():
    (a,) = _req(pair((2, 3, 4))[0])
    t = torch.tensor([[0, 3, 2], [1, 1, 3]])
    assert torch.autograd.gradcheck(
        lambda a: token_logprobs(a, t, 1.3, return_entropy=True, chunk_size=2), (a,)
    )
    assert torch.autograd.gradcheck(lambda a: token_logprobs(a, t, chunk_size=4), (a,))
    # entropy alone (log-prob unused) also gets its gradient
    assert torch.autograd.gradcheck(lambda a: token_logprobs(a, t, return_entropy=True)[1], (a,))


def test_gradients_match_autograd_of_naive():
    a, b = _req(*pair((3, 4, 11), seed=5))
    w = torch.randn(3, 4, dtype=F64)
    (full_kl(a, b) * w).sum().backward()
    a2, b2 = _req(a.detach(), b.detach())
    (naive_kl(a2, b2) * w).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.grad, b2.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 2, 5])
@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_policy_alone_gradient_written_in_forward(chunk, direction):
    """Only the policy requires grad (the RL case): forward writes ∂KL/∂logits and backward scales
    it. Weighted upstream, temperature, masked positions and vocabulary, against autograd of the
    naive formula; a second backward through the same graph (retain_graph) gives the same."""
    a, b = pair((3, 4, 11), seed=7)
    keep = torch.ones(11, dtype=torch.bool)
    keep[[2, 9]] = False
    a_m, b_m = a.masked_fill(~keep, -INF), b.masked_fill(~keep, -INF)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 2] = mask[2, 0] = False
    w = torch.randn(3, 4, dtype=F64)
    (x,) = _req(a_m)
    v = full_kl(x, b_m, mask, direction, temperature=0.7, chunk_size=chunk)
    (v * w).sum().backward(retain_graph=True)
    (x2,) = _req(_drop(a, keep))
    pq = (x2, _drop(b, keep)) if direction == "reverse" else (_drop(b, keep), x2)
    want = naive_kl(*pq, 0.7) * mask
    torch.testing.assert_close(v, want.detach(), rtol=0, atol=1e-10)
    (want * w).sum().backward()
    torch.testing.assert_close(x.grad[..., keep], x2.grad, rtol=0, atol=1e-12)
    assert torch.all(x.grad[..., ~keep] == 0) and torch.all(x.grad[~mask] == 0)
    first = x.grad.clone()
    x.grad = None
    (v * w).sum().backward()
    assert torch.equal(x.grad, first)  # bit for bit (gradcheck demands reentrancy)
    with torch.no_grad():
        again = full_kl(x, b_m, mask, direction, temperature=0.7)
    torch.testing.assert_close(again, v.detach(), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- dtypes, chunks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_against_float64(dtype):
    a, b = pair((4, 3, 1000), seed=2, dtype=dtype)
    a64, b64 = a.to(F64), b.to(F64)  # the same rounded inputs
    t = torch.randint(0, 1000, (4, 3), generator=torch.Generator().manual_seed(1))
    cases = [
        (full_kl(a, b), naive_kl(a64, b64)),
        (full_kl(a, b, direction="forward"), naive_kl(b64, a64)),
        (full_jsd(a, b, 0.3), naive_jsd(a64, b64, 0.3)),
        (token_logprobs(a, t), torch.log_softmax(a64, -1).gather(-1, t[..., None])[..., 0]),
    ]
    for got, want in cases:
        assert got.dtype == torch.float32  # computed and returned in float32
        torch.testing.assert_close(got.to(F64), want, rtol=1e-5, atol=2e-5)
    # gradients come back in the input's dtype
    a_ = a.clone().requires_grad_(True)
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    (full_kl(a_, b).to(F64) * w).sum().backward()
    a64r = a64.clone().requires_grad_(True)
    (naive_kl(a64r, b64) * w).sum().backward()
    assert a_.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2.0**-8
    torch.testing.assert_close(
        a_.grad.to(F64), a64r.grad, rtol=tol, atol=tol * float(a64r.grad.abs().max())
    )


def test_chunk_size_invariance():
    a, b = pair((5, 7, 33), seed=9)
    t = torch.randint(0, 33, (5, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.rand(5, 7, generator=torch.Generator().manual_seed(1)) < 0.6
    for f in (
        lambda a, cs: full_kl(a, b, mask, chunk_size=cs),
        lambda a, cs: full_jsd(a, b, 0.4, mask, chunk_size=cs),
        lambda a, cs: full_tv(a, b, mask, chunk_size=cs),
        lambda a, cs: token_logprobs(a, t, mask=mask, chunk_size=cs, return_entropy=True)[1],
    ):
        outs = []
        for cs in (1, 2, 5, 1000, None):
            x = a.clone().requires_grad_(True)
            v = f(x, cs)
            v.sum().backward()
            outs.append((v.detach(), x.grad))
        for v, gr in outs[1:]:
            torch.testing.assert_close(v, outs[0][0], rtol=0, atol=1e-14)
            torch.testing.assert_close(gr, outs[0][1], rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------- masks


def test_position_mask_skips_garbage_and_matches_subset():
    a, b = pair((3, 5, 7))
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    a = a.clone()
    a[~mask] = math.nan  # padding may hold anything: it is never read
    a_ = a.clone().requires_grad_(True)
    v = full_kl(a_, b, mask)
    assert torch.all(v[~mask] == 0)
    torch.testing.assert_close(v[mask], naive_kl(a[mask], b[mask]), rtol=0, atol=1e-10)
    v.sum().backward()
    assert torch.all(a_.grad[~mask] == 0) and torch.isfinite(a_.grad).all()


def test_aggregation_is_klest_rl_aggregate():
    import klest.rl as rl

    a, b = pair((3, 5, 7))
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(2)) < 0.7
    per = naive_kl(a, b)
    for mode in rl.AGGREGATIONS:
        got = full_kl(a, b, mask, aggregation=mode)
        want = rl.aggregate(per, mask, mode)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def _drop(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return x[..., keep]


def test_vocab_masked_in_both_is_the_smaller_vocabulary():
    a, b = pair((2, 3, 8))
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    a_m = a.masked_fill(~keep, -INF).requires_grad_(True)
    b_m = b.masked_fill(~keep, -INF).requires_grad_(True)
    t = torch.tensor([[0, 2, 3], [5, 6, 7]])
    for got, want in (
        (full_kl(a_m, b_m), naive_kl(_drop(a, keep), _drop(b, keep))),
        (full_kl(a_m, b_m, direction="forward"), naive_kl(_drop(b, keep), _drop(a, keep))),
        (full_jsd(a_m, b_m, 0.3), naive_jsd(_drop(a, keep), _drop(b, keep), 0.3)),
        (full_jsd(a_m, b_m, 0.7), naive_jsd(_drop(a, keep), _drop(b, keep), 0.7)),
        (
            full_tv(a_m, b_m),
            0.5 * (_drop(a, keep).softmax(-1) - _drop(b, keep).softmax(-1)).abs().sum(-1),
        ),
        (
            token_logprobs(a_m, t, return_entropy=True)[1],
            -(lambda la: (la.exp() * la).sum(-1))(torch.log_softmax(_drop(a, keep), -1)),
        ),
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        a_m.grad = b_m.grad = None
        got.sum().backward()
        for gr in (a_m.grad, b_m.grad):
            if gr is not None:
                assert torch.isfinite(gr).all()
                assert torch.all(gr[..., ~keep] == 0)


def test_reference_masks_a_token_the_policy_can_emit():
    a, b = pair((2, 3, 6))
    b_m = b.clone()
    b_m[0, 1, 2] = -INF  # only the reference masks token 2 at one position
    a_ = a.clone().requires_grad_(True)
    rev = full_kl(a_, b_m)
    assert rev[0, 1] == INF
    others = torch.ones(2, 3, dtype=torch.bool)
    others[0, 1] = False
    torch.testing.assert_close(rev[others], naive_kl(a, b_m)[others], rtol=0, atol=1e-10)
    # the gradient is finite wherever the value is; the +inf position has none (NaN) ...
    rev.sum().backward()
    assert torch.isfinite(a_.grad[others]).all() and torch.isnan(a_.grad[0, 1]).all()
    # ... unless it is masked out (upstream gradient 0)
    a_.grad = None
    full_kl(a_, b_m, others, aggregation="token-mean").backward()
    assert torch.isfinite(a_.grad).all() and torch.all(a_.grad[0, 1] == 0)
    # the forward KL(π_ref‖π) is finite: π_ref gives that token 0
    a2 = a.clone().requires_grad_(True)
    fwd = full_kl(a2, b_m, direction="forward")
    keep = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool)
    lr = torch.log_softmax(b_m[0, 1, keep], -1)
    want = (lr.exp() * (lr - torch.log_softmax(a[0, 1], -1)[keep])).sum()
    torch.testing.assert_close(fwd[0, 1], want, rtol=0, atol=1e-10)
    fwd.sum().backward()
    assert torch.isfinite(a2.grad).all()
    # JSD and TV stay finite with finite gradients
    for f in (lambda x: full_jsd(x, b_m, 0.4), lambda x: full_tv(x, b_m)):
        a3 = a.clone().requires_grad_(True)
        v = f(a3)
        assert torch.isfinite(v).all()
        v.sum().backward()
        assert torch.isfinite(a3.grad).all()


def test_token_at_minus_inf_logit():
    a = torch.tensor([[0.0, -INF, 1.0]], dtype=F64, requires_grad=True)
    lp = token_logprobs(a, torch.tensor([1]))
    assert lp[0] == -INF
    lp.sum().backward()
    p = torch.softmax(a.detach(), -1)
    torch.testing.assert_close(a.grad, torch.tensor([[0.0, 1.0, 0.0]], dtype=F64) - p)


# ----------------------------------------------------------------------------- bad input


def test_bad_input():
    a, b = pair((2, 3, 5))
    t = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(KlestError, match="vocabulary size"):
        full_kl(a, b[..., :4])
    with pytest.raises(KlestError, match="shape"):
        full_kl(a, b[:1])
    with pytest.raises(KlestError, match="temperature"):
        full_kl(a, b, temperature=0.0)
    with pytest.raises(KlestError, match="temperature"):
        token_logprobs(a, t, -1.0)
    with pytest.raises(KlestError, match="direction"):
        full_kl(a, b, direction="backward")  # type: ignore[arg-type]
    with pytest.raises(KlestError, match="beta"):
        full_jsd(a, b, 1.5)
    # not a number: a KlestError naming the argument, not float()'s TypeError/ValueError
    for bad_t in ("abc", [1.0], True):
        with pytest.raises(KlestError, match="temperature"):
            full_kl(a, b, temperature=bad_t)  # type: ignore[arg-type]
    for bad_b in ("abc", None, True):
        with pytest.raises(KlestError, match="beta"):
            full_jsd(a, b, bad_b)  # type: ignore[arg-type]
    with pytest.raises(KlestError, match="integer"):
        token_logprobs(a, t.double())
    with pytest.raises(KlestError, match=r"\[0, 5\)"):
        token_logprobs(a, t + 5)
    with pytest.raises(KlestError, match=r"\[0, 5\)"):
        token_logprobs(a, t - 1)
    # padding ids are fine where the mask is False
    m = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    token_logprobs(a, torch.where(m, t, -100), mask=m)
    bad = a.clone()
    bad[1, 2, 3] = math.nan
    for f in (
        lambda: full_kl(bad, b),
        lambda: full_kl(b, bad),
        lambda: full_jsd(bad, b),
        lambda: full_tv(b, bad),
        lambda: token_logprobs(bad, t),
    ):
        with pytest.raises(KlestError, match="NaN"):
            f()
    bad[1, 2, 3] = INF
    with pytest.raises(KlestError, match=r"\+inf"):
        full_kl(bad, b)
    with pytest.raises(KlestError, match=r"\+inf"):
        full_tv(bad, b)
    dead = a.clone()
    dead[0, 0] = -INF
    with pytest.raises(KlestError, match="-inf everywhere"):
        full_kl(dead, b)
    with pytest.raises(KlestError, match="-inf everywhere"):
        token_logprobs(dead, t)
    with pytest.raises(KlestError, match="mask"):
        full_kl(a, b, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(KlestError, match="floating"):
        full_kl(a.long(), b)


@pytest.mark.parametrize("beta", [0.3, 0.7])
@pytest.mark.parametrize("side", ["policy", "reference"])
def test_jsd_when_one_side_alone_masks_a_token(beta, side):
    """0 < β < 1: M > 0 wherever either side has mass, so D_β is finite with finite gradients
    when only one side masks a token (the limits log(M/P) = log β, log(M/Q) = log(1 − β)).
    Truth: the naive formula (values) and its autograd with the masked logit at −60 instead of
    −inf (gradients; the two differ by O(e^−60))."""
    a, b = pair((2, 3, 6))
    x = a if side == "policy" else b
    x_inf, x_60 = x.clone(), x.clone()
    x_inf[0, 1, 2] = x_inf[1, 2, 0] = -INF
    x_60[0, 1, 2] = x_60[1, 2, 0] = -60.0
    if side == "policy":
        args_inf, args_60 = (x_inf, b), (x_60, b)
    else:
        args_inf, args_60 = (a, x_inf), (a, x_60)
    got_in = [t.clone().requires_grad_(True) for t in args_inf]
    want_in = [t.clone().requires_grad_(True) for t in args_60]
    got = full_jsd(got_in[0], got_in[1], beta)
    torch.testing.assert_close(got, naive_jsd(*args_inf, beta), rtol=0, atol=1e-10)
    want = naive_jsd(want_in[0], want_in[1], beta)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    got.sum().backward()
    want.sum().backward()
    for g_, w_ in zip(got_in, want_in, strict=True):
        assert g_.grad is not None and w_.grad is not None
        torch.testing.assert_close(g_.grad, w_.grad, rtol=0, atol=1e-10)
