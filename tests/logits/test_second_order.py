"""Second derivatives through klest.logits: Hessian-vector products against autograd of the
naive float64 formulas (whole rows materialised, written here from the definitions), and the
huge-magnitude rows whose normaliser used to round away (mpmath / closed forms)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import klest.logits as kl  # noqa: E402
from klest.rl import kl_loss  # noqa: E402

F64 = torch.float64
INF = math.inf


def data(shape=(2, 3, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=F64) * 1.5
    b = torch.randn(shape, generator=g, dtype=F64) * 1.5
    w = torch.randn(shape[:-1], generator=g, dtype=F64)
    v = torch.randn(shape, generator=g, dtype=F64)
    return a, b, w, v


def hvp(f, x, v):
    """(∇ f, H v) at x by double backward."""
    x = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(f(x), x, create_graph=True)
    (hv,) = torch.autograd.grad((gx * v).sum(), x)
    return gx.detach(), hv


def naive_kl(a, b, T=1.0):
    la, lb = torch.log_softmax(a / T, -1), torch.log_softmax(b / T, -1)
    return (la.exp() * (la - lb)).sum(-1)


def naive_jsd(a, b, beta):
    lq, lp = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    lm = torch.logaddexp(math.log(beta) + lp, math.log1p(-beta) + lq)
    return (beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - beta) * (lq.exp() * (lq - lm)).sum(-1)) / (
        beta * (1 - beta)
    )


def close(x, y, tol=1e-10):
    torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("side", ["logits", "ref"])
def test_full_kl_hvp(direction, side):
    a, b, w, v = data()
    mask = torch.ones(a.shape[:-1], dtype=torch.bool)
    mask[1, 2] = False
    a[1, 2] = math.nan  # a masked position is never read
    T = 0.8

    def ours(x):
        args = (x, b) if side == "logits" else (a, x)
        return (kl.full_kl(*args, mask, direction, T) * w).sum()

    a0 = torch.where(mask[..., None], a, 0.0)

    def ref(x):
        p, q = (x, b) if side == "logits" else (a0, x)
        if direction == "forward":
            p, q = q, p
        val = naive_kl(p, q, T)
        return (torch.where(mask, val, torch.zeros_like(val)) * w).sum()

    x0 = a if side == "logits" else b
    g1, h1 = hvp(ours, x0, v)
    g2, h2 = hvp(ref, torch.where(mask[..., None], x0, 0.0), v)
    close(torch.where(mask[..., None], g1, 0.0), g2)
    close(torch.where(mask[..., None], h1, 0.0), h2)
    assert bool((h1[1, 2] == 0).all()) and bool((g1[1, 2] == 0).all())


def test_full_kl_hvp_both_inputs_and_cross_term():
    """∂²KL/∂a∂b: the gradient w.r.t. a differentiated w.r.t. b."""
    a, b, w, v = data(seed=1)
    a1, b1 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad((kl.full_kl(a1, b1) * w).sum(), a1, create_graph=True)
    (cross,) = torch.autograd.grad((ga * v).sum(), b1)
    a2, b2 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    (ga2,) = torch.autograd.grad((naive_kl(a2, b2) * w).sum(), a2, create_graph=True)
    (cross2,) = torch.autograd.grad((ga2 * v).sum(), b2)
    close(cross, cross2)


def test_token_logprobs_and_entropy_hvp():
    a, _, w, v = data(seed=2)
    g = torch.Generator().manual_seed(3)
    tok = torch.randint(0, a.shape[-1], a.shape[:-1], generator=g)
    w2 = torch.randn(a.shape[:-1], generator=g, dtype=F64)

    def ours(x):
        lp, H = kl.token_logprobs(x, tok, 1.3, return_entropy=True)
        return (lp * w).sum() + (H * w2).sum()

    def ref(x):
        ls = torch.log_softmax(x / 1.3, -1)
        lp = ls.gather(-1, tok[..., None])[..., 0]
        H = -(ls.exp() * ls).sum(-1)
        return (lp * w).sum() + (H * w2).sum()

    g1, h1 = hvp(ours, a, v)
    g2, h2 = hvp(ref, a, v)
    close(g1, g2)
    close(h1, h2)


def test_token_logprobs_into_kl_loss_hvp():
    """token_logprobs → klest.rl.kl_loss (twice differentiable itself): the composition's HVP
    equals the one through the naive log-softmax."""
    a, b, _, v = data(seed=4)
    g = torch.Generator().manual_seed(5)
    tok = torch.randint(0, a.shape[-1], a.shape[:-1], generator=g)
    ref_lp = torch.log_softmax(b, -1).gather(-1, tok[..., None])[..., 0]
    for gradient in ("reverse_kl", "as_written"):

        def ours(x, gradient=gradient):
            lp = kl.token_logprobs(x, tok)
            return kl_loss(lp, ref_lp, gradient=gradient, diagnostics=False).loss

        def ref(x, gradient=gradient):
            lp = torch.log_softmax(x, -1).gather(-1, tok[..., None])[..., 0]
            return kl_loss(lp, ref_lp, gradient=gradient, diagnostics=False).loss

        g1, h1 = hvp(ours, a, v)
        g2, h2 = hvp(ref, a, v)
        close(g1, g2)
        close(h1, h2)
        assert float(h1.abs().max()) > 1e-3  # the curvature is there


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_topk_kl_hvp(direction):
    a, b, w, v = data(seed=6)
    r, i = torch.log_softmax(b, -1).topk(3)

    def ours(x):
        return (kl.topk_kl(x, r, i, direction=direction) * w).sum()

    def ref(x):
        lp = torch.log_softmax(x, -1)
        lpk = lp.gather(-1, i)
        inK = torch.zeros_like(lp, dtype=torch.bool).scatter_(-1, i, True)
        lrest = torch.logsumexp(torch.where(inK, -INF, lp), -1)
        lrest_ref = torch.log1p(-r.exp().sum(-1))
        if direction == "reverse":
            val = (lpk.exp() * (lpk - r)).sum(-1) + lrest.exp() * (lrest - lrest_ref)
        else:
            val = (r.exp() * (r - lpk)).sum(-1) + lrest_ref.exp() * (lrest_ref - lrest)
        return (val * w).sum()

    g1, h1 = hvp(ours, a, v)
    g2, h2 = hvp(ref, a, v)
    close(g1, g2)
    close(h1, h2)


@pytest.mark.parametrize("beta", [0.3, 0.5, 0.8])
def test_jsd_and_tv_hvp(beta):
    a, b, w, v = data(seed=7)
    g1, h1 = hvp(lambda x: (kl.full_jsd(x, b, beta) * w).sum(), a, v)
    g2, h2 = hvp(lambda x: (naive_jsd(x, b, beta) * w).sum(), a, v)
    close(g1, g2)
    close(h1, h2)
    g1, h1 = hvp(lambda x: (kl.full_jsd(a, x, beta) * w).sum(), b, v)
    g2, h2 = hvp(lambda x: (naive_jsd(a, x, beta) * w).sum(), b, v)
    close(g1, g2)
    close(h1, h2)

    def naive_tv(x):
        return 0.5 * (torch.softmax(x, -1) - torch.softmax(b, -1)).abs().sum(-1)

    g1, h1 = hvp(lambda x: (kl.full_tv(x, b) * w).sum(), a, v)
    g2, h2 = hvp(lambda x: (naive_tv(x) * w).sum(), a, v)
    close(g1, g2)
    close(h1, h2)


def test_from_hidden_hvp():
    g = torch.Generator().manual_seed(8)
    N, H, V = 5, 3, 11
    h = torch.randn(N, H, generator=g, dtype=F64)
    W = torch.randn(V, H, generator=g, dtype=F64)
    hr = torch.randn(N, 4, generator=g, dtype=F64)
    Wr = torch.randn(V, 4, generator=g, dtype=F64)
    tok = torch.randint(0, V, (N,), generator=g)
    w = torch.randn(N, generator=g, dtype=F64)
    vW = torch.randn(V, H, generator=g, dtype=F64)

    def ours_kl(Wx):
        return (kl.full_kl_from_hidden(h, Wx, hr, Wr, vocab_chunk_size=4) * w).sum()

    def ref_kl(Wx):
        return (naive_kl(h @ Wx.T, hr @ Wr.T) * w).sum()

    g1, h1 = hvp(ours_kl, W, vW)
    g2, h2 = hvp(ref_kl, W, vW)
    close(g1, g2)
    close(h1, h2)

    def ours_tok(Wx):
        lp, Hn = kl.token_logprobs_from_hidden(h, Wx, tok, 0.7, return_entropy=True)
        return (lp * w).sum() + Hn.sum()

    def ref_tok(Wx):
        ls = torch.log_softmax(h @ Wx.T / 0.7, -1)
        return (ls.gather(-1, tok[:, None])[:, 0] * w).sum() - (ls.exp() * ls).sum()

    g1, h1 = hvp(ours_tok, W, vW)
    g2, h2 = hvp(ref_tok, W, vW)
    close(g1, g2)
    close(h1, h2)


def test_second_derivative_of_infinite_kl_is_not_a_number():
    """A position whose KL is +inf has no gradient (NaN where weighted), also with create_graph."""
    a = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]], dtype=F64, requires_grad=True)
    b = torch.tensor([[0.0, 1.0, -INF], [1.0, 0.0, 2.0]], dtype=F64)
    (g,) = torch.autograd.grad(kl.full_kl(a, b).sum(), a, create_graph=True)
    assert bool(torch.isnan(g[0]).all())
    assert bool(torch.isfinite(g[1]).all())


# ------------------------------------------------------------------ huge-magnitude rows


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("fill", ["min", "huge"])
def test_rows_of_huge_magnitude(dtype, fill):
    """A row whose logits are all equal and huge is uniform: log p = −log V, H = log V, and
    KL against any row is the same as against a row of zeros (every path: fast on and off)."""
    V = 10
    val = torch.finfo(dtype).min if fill == "min" else (-1e17 if dtype == F64 else -1e9)
    a = torch.full((2, V), val, dtype=dtype)
    a[1, 3] = a[1, 3] + abs(val) * 2**-20  # a second row: one entry above the rest
    g = torch.Generator().manual_seed(0)
    b = torch.randn(2, V, generator=g, dtype=F64).to(dtype)
    ref_a = (a.to(F64) - a.to(F64).amax(-1, keepdim=True)).to(F64)  # shifted: exact in float64
    tok = torch.tensor([3, 3])
    lp, H = kl.token_logprobs(a, tok, return_entropy=True)
    ls = torch.log_softmax(ref_a, -1)
    tol = 1e-12 if dtype == F64 else 2e-6
    torch.testing.assert_close(lp.to(F64), ls[:, 3], rtol=tol, atol=tol)
    torch.testing.assert_close(H.to(F64), -(ls.exp() * ls).sum(-1), rtol=tol, atol=tol)
    assert abs(float(lp[0]) + math.log(V)) < tol * 10
    for fast in (False, True):
        import klest

        with klest.options(fast=fast):
            for x, y, rx, ry in ((a, b, ref_a, b.to(F64)), (b, a, b.to(F64), ref_a)):
                got = kl.full_kl(x, y)
                torch.testing.assert_close(got.to(F64), naive_kl(rx, ry), rtol=tol, atol=tol)
                got = kl.full_jsd(x, y, 0.3)
                torch.testing.assert_close(got.to(F64), naive_jsd(rx, ry, 0.3), rtol=tol, atol=tol)
                got = kl.full_tv(x, y)
                want = 0.5 * (torch.softmax(rx, -1) - torch.softmax(ry, -1)).abs().sum(-1)
                torch.testing.assert_close(got.to(F64), want, rtol=tol, atol=tol)


def test_huge_rows_through_the_output_layer():
    """Logits all −1e17 from hidden @ weightᵀ (uniform rows): the fused blocks merge without
    losing log V (a row's log-probs are −log V, its KL the one from a row of zeros)."""
    N, H, V = 3, 2, 12
    g = torch.Generator().manual_seed(1)
    h = torch.cat([torch.ones(N, 1, dtype=F64), torch.randn(N, H - 1, generator=g, dtype=F64)], 1)
    W = torch.zeros(V, H, dtype=F64)
    W[:, 0] = -1e17
    hr = torch.randn(N, H, generator=g, dtype=F64)
    Wr = torch.randn(V, H, generator=g, dtype=F64)
    tok = torch.tensor([0, 5, 11])
    for fn in (kl.token_logprobs_from_hidden,):
        lp = fn(h, W, tok, vocab_chunk_size=5)
        torch.testing.assert_close(lp, torch.full((N,), -math.log(V), dtype=F64))
    zeros = torch.zeros(N, V, dtype=F64)
    y = hr @ Wr.T
    for direction, want in (("reverse", naive_kl(zeros, y)), ("forward", naive_kl(y, zeros))):
        got = kl.full_kl_from_hidden(h, W, hr, Wr, direction=direction, vocab_chunk_size=5)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_entropy_and_jsd_float32_common_offset():
    """A common offset of 1e4 changes no probability: float32 values on the offset logits
    match float64 on the same (rounded) logits to float32 accuracy."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 1000, generator=g) * 2 + 1e4
    y = torch.randn(4, 1000, generator=g) * 2 + 1e4
    xd, yd = x.to(F64), y.to(F64)
    _, H = kl.token_logprobs(x, torch.zeros(4, dtype=torch.long), return_entropy=True)
    ls = torch.log_softmax(xd, -1)
    torch.testing.assert_close(H.to(F64), -(ls.exp() * ls).sum(-1), rtol=1e-5, atol=0)
    torch.testing.assert_close(kl.full_jsd(x, y).to(F64), naive_jsd(xd, yd, 0.5), rtol=2e-5, atol=0)
    torch.testing.assert_close(kl.full_kl(x, y).to(F64), naive_kl(xd, yd), rtol=2e-5, atol=0)


@pytest.mark.parametrize("beta", [1e-40, 1e-320, 1 - 1e-16])
def test_jsd_beta_below_float_range(beta, monkeypatch):
    """β below float32's (and float64's normal) range: finite, and against mpmath."""
    mp = pytest.importorskip("mpmath")
    monkeypatch.setattr(mp.mp, "dps", 60)  # restored afterwards: other tests rely on theirs
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 8, generator=g, dtype=F64) * 3
    b = torch.randn(2, 8, generator=g, dtype=F64) * 3
    a[1, 2] = -60.0  # Q ≪ β P somewhere when β is not tiny enough

    def exact(r):
        x = [mp.mpf(float(t)) for t in a[r]]
        y = [mp.mpf(float(t)) for t in b[r]]
        zx, zy = mp.fsum(mp.e**t for t in x), mp.fsum(mp.e**t for t in y)
        Q = [mp.e**t / zx for t in x]
        P = [mp.e**t / zy for t in y]
        B = mp.mpf(beta)
        M = [B * p + (1 - B) * q for p, q in zip(P, Q, strict=True)]

        def k(U, W):
            return mp.fsum(u * mp.log(u / w) for u, w in zip(U, W, strict=True))

        return float((B * k(P, M) + (1 - B) * k(Q, M)) / (B * (1 - B)))

    want = torch.tensor([exact(0), exact(1)], dtype=F64)
    torch.testing.assert_close(kl.full_jsd(a, b, beta), want, rtol=1e-9, atol=0)
    got32 = kl.full_jsd(a.float(), b.float(), beta).to(F64)
    assert bool(torch.isfinite(got32).all())
    torch.testing.assert_close(got32, want, rtol=2e-5, atol=0)
    a.requires_grad_(True)
    (gr,) = torch.autograd.grad(kl.full_jsd(a, b, beta).sum(), a)
    assert bool(torch.isfinite(gr).all())


# ------------------------------------------------------------------ top-k sums ≥ 1 by rounding


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_topk_peaked_teacher_stays_finite_lower_bound(direction):
    """A peaked float32 teacher: its top-20 log-probs, rounded, sum to ≥ 1 at many positions.
    The value stays finite, with finite gradients, and is at most the full KL (a lower bound),
    equal to the KL of the coarser partition (the merged tokens with the rest) in float64."""
    g = torch.Generator().manual_seed(0)
    N, V, k = 200, 64, 20
    t = torch.randn(N, V, generator=g) * 3
    t[:, 0] += 25.0  # top-1 probability ≈ 1 − 1e-9: its float32 log-prob rounds to 0
    s = torch.randn(N, V, generator=g) * 2
    r, i = torch.log_softmax(t, -1).topk(k)
    over = torch.logsumexp(r.double(), -1) >= 0
    assert int(over.sum()) > 20  # the case is exercised
    x = s.clone().requires_grad_(True)
    val = kl.topk_kl(x, r, i, direction=direction)
    assert bool(torch.isfinite(val).all())
    (gr,) = torch.autograd.grad(val.sum(), x)
    assert bool(torch.isfinite(gr).all())
    # a float64 teacher whose top-1 log-prob rounds to 0 exactly: a lower bound of the full KL
    t64 = t.double()
    t64[:, 0] += 20.0
    r64, i64 = torch.log_softmax(t64, -1).topk(k)
    v64 = kl.topk_kl(s.double(), r64, i64, direction=direction)
    full = kl.full_kl(s.double(), t64, direction=direction)
    assert bool(torch.isfinite(v64).all()) and bool((v64 <= full * (1 + 1e-12) + 1e-12).all())
    full32 = kl.full_kl(s.double(), t.double(), direction=direction)  # float32 r: 1e-5 rounding
    assert bool((val.double() <= full32 * (1 + 1e-5)).all())
    # float64 reference of the coarser partition at the positions over 1
    rd, sd = r.double(), torch.log_softmax(s.double(), -1)
    for n in torch.nonzero(over).flatten()[:10].tolist():
        srt = torch.sort(rd[n], descending=True)
        cum = torch.logcumsumexp(srt.values, 0)
        kept = int((cum < math.log1p(-4 * k * torch.finfo(torch.float32).eps)).sum())
        ids = i[n][srt.indices[:kept]]
        q = srt.values[:kept].exp()
        p = sd[n][ids].exp()
        Rq = 1 - q.sum()
        Rp = 1 - p.sum()
        P, Q = (torch.cat([p, Rp[None]]), torch.cat([q, Rq[None]]))
        if direction == "forward":
            P, Q = Q, P
        want = (P * (P / Q).log()).sum()
        torch.testing.assert_close(val[n].double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
def test_entropy_of_a_one_hot_row_is_plus_zero(dtype):
    """H = -Σ p log p of a point mass is 0 (e^{-1e4} underflows every other term): printed as
    0, not -0."""
    x = torch.zeros(3, 50, dtype=dtype)
    x[:, 7] = 1e4
    _, H = kl.token_logprobs(x, torch.zeros(3, dtype=torch.long), return_entropy=True)
    assert bool((H == 0).all()) and not bool(torch.signbit(H).any())
