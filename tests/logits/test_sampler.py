"""Log-probs under the distribution a sampler draws from (temperature, min-p, top-k, top-p)
against a float64 reference written here from the definitions, row by row, independently of
the streaming code (vLLM's and Hugging Face's rule: top-k keeps every value ≥ the k-th largest;
top-p keeps a token when the renormalised mass strictly above it is < p)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import klest.logits as kl  # noqa: E402
from klest import KlestError  # noqa: E402

F64 = torch.float64
INF = math.inf


def kept(x: torch.Tensor, k, p, min_p, order="vllm") -> torch.Tensor:
    """The kept set of one row x (already divided by T), float64."""
    V = x.shape[0]
    keep = torch.ones(V, dtype=torch.bool)

    def apply_min_p(keep):
        if min_p:
            pr = torch.softmax(x, 0)
            keep = keep & (pr >= min_p * pr.max())
        return keep

    def apply_k(keep):
        if k is not None and 1 <= k < V:
            kth = torch.sort(x, descending=True).values[k - 1]
            keep = keep & (x >= kth)
        return keep

    def apply_p(keep):
        if p is not None and p < 1:
            q = torch.softmax(torch.where(keep, x, -INF), 0)
            new = keep.clone()
            for v in range(V):
                if keep[v]:
                    before = float(q[(x > x[v]) & keep].sum())
                    new[v] = before < p
            keep = new
        return keep

    if order == "vllm":
        return apply_p(apply_k(apply_min_p(keep)))
    return apply_min_p(apply_p(apply_k(keep)))


def reference(logits, tokens, T, k=None, p=None, min_p=None, order="vllm"):
    """(log-probs, entropy, outside) of the processed distributions, float64."""
    x = logits.to(F64).reshape(-1, logits.shape[-1]) / T
    t = tokens.reshape(-1)
    lps, Hs, outs = [], [], []
    for n in range(x.shape[0]):
        keep = kept(x[n], k, p, min_p, order)
        ls = torch.log_softmax(torch.where(keep, x[n], -INF), 0)
        lps.append(ls[t[n]])
        Hs.append(-(ls.exp() * torch.where(keep, ls, 0.0)).sum())
        outs.append(not bool(keep[t[n]]))
    shape = tokens.shape
    return (
        torch.stack(lps).reshape(shape),
        torch.stack(Hs).reshape(shape),
        torch.tensor(outs).reshape(shape),
    )


def rows(shape=(3, 5, 40), seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=F64) * scale
    tok = torch.randint(0, shape[-1], shape[:-1], generator=g)
    return x, tok


SETTINGS = [
    dict(k=5),
    dict(p=0.8),
    dict(min_p=0.05),
    dict(k=10, p=0.7),
    dict(k=10, p=0.7, min_p=0.1),
    dict(k=10, p=0.7, min_p=0.1, order="hf"),
    dict(p=0.5, min_p=0.2, order="hf"),
    dict(p=0.5, min_p=0.2),
    dict(k=1),
    dict(k=40),  # k = V: everything
    dict(k=100),  # k > V
    dict(p=1.0),
    dict(p=1e-9),  # only the most probable
]


@pytest.mark.parametrize("T", [1.0, 0.7])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: repr(s))
def test_against_reference(setting, T):
    x, tok = rows()
    k, p, min_p = setting.get("k"), setting.get("p"), setting.get("min_p")
    order = setting.get("order", "vllm")
    # half of the tokens drawn from the processed distribution itself (inside), half anywhere
    xs = (x / T).reshape(-1, x.shape[-1])
    inside = torch.stack([torch.nonzero(kept(r, k, p, min_p, order))[0, 0] for r in xs])
    tok = torch.where(
        torch.arange(tok.numel()).reshape(tok.shape) % 2 == 0, tok, inside.view(tok.shape)
    )
    lp, H, out = kl.token_logprobs(
        x, tok, T, top_k=k, top_p=p, min_p=min_p, sampler_order=order,
        return_entropy=True, return_outside=True, chunk_size=4,
    )  # fmt: skip
    wlp, wH, wout = reference(x, tok, T, k, p, min_p, order)
    assert torch.equal(out, wout)
    assert torch.equal(torch.isinf(lp), wout)
    torch.testing.assert_close(lp, wlp, rtol=0, atol=1e-12)
    torch.testing.assert_close(H, wH, rtol=0, atol=1e-12)
    # float32 logits: computed in float32, compared with float64 on the same rounded inputs
    x32 = x.float()
    lp32 = kl.token_logprobs(x32, tok, T, top_k=k, top_p=p, min_p=min_p, sampler_order=order)
    wlp32, _, _ = reference(x32, tok, T, k, p, min_p, order)
    assert torch.equal(torch.isinf(lp32), torch.isinf(wlp32))
    fin = torch.isfinite(wlp32)
    torch.testing.assert_close(lp32[fin].double(), wlp32[fin], rtol=1e-5, atol=2e-6)


def test_filters_off_are_the_plain_softmax():
    x, tok = rows(seed=1)
    plain = kl.token_logprobs(x, tok)
    for kw in (dict(top_k=0), dict(top_k=-1), dict(top_p=1.0), dict(min_p=0.0), dict(top_k=40)):
        torch.testing.assert_close(kl.token_logprobs(x, tok, **kw), plain, rtol=0, atol=0)


def test_top_k_one_is_the_argmax():
    x, _ = rows(seed=2)
    am = x.argmax(-1)
    lp = kl.token_logprobs(x, am, top_k=1)
    assert bool((lp == 0).all())
    other = (am + 1) % x.shape[-1]
    lp, out = kl.token_logprobs(x, other, top_k=1, return_outside=True)
    assert bool((lp == -INF).all()) and int(out.sum()) == out.numel()


def test_ties():
    """Every token tied with the k-th value is kept (vLLM, HF: ``logits < kth`` is removed);
    at the top-p boundary all tied tokens are kept."""
    x = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0]], dtype=F64)
    lp = kl.token_logprobs(x, torch.tensor([3]), top_k=2)
    want = 2.0 - math.log(math.exp(3) + 3 * math.exp(2))
    assert abs(float(lp[0]) - want) < 1e-14
    # top-p: the mass strictly above each of the tied 2's is e³/Z < p: all three kept
    Z = math.exp(3) + 3 * math.exp(2) + math.exp(1) + 1
    p = math.exp(3) / Z + 1e-3
    lp = kl.token_logprobs(x, torch.tensor([4]), top_p=p)
    assert abs(float(lp[0]) - want) < 1e-14
    lp = kl.token_logprobs(x, torch.tensor([1]), top_p=p)
    assert float(lp[0]) == -INF


def test_masked_rows_and_bad_arguments():
    x, tok = rows(seed=3)
    mask = torch.ones(tok.shape, dtype=torch.bool)
    mask[0, 1] = False
    x = x.clone()
    x[0, 1] = math.nan
    lp, out = kl.token_logprobs(x, tok, top_k=3, top_p=0.9, mask=mask, return_outside=True)
    assert float(lp[0, 1]) == 0.0 and not bool(out[0, 1])
    for kw, arg in (
        (dict(top_k=2.5), "top_k"),
        (dict(top_k=-3), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(top_k=True), "top_k"),
        (dict(top_k=3, sampler_order="sglang"), "sampler_order"),
    ):
        with pytest.raises(KlestError, match=arg):
            kl.token_logprobs(x, tok, mask=mask, **kw)


def test_gradients_gradcheck():
    """Away from the filters' boundaries (measure zero), ∂ log π_S(t)/∂x_v = [v = t] − π_S(v)
    on S, 0 off S; outside tokens have zero gradient (their log-prob is −inf whatever x is)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 2, 10, generator=g, dtype=F64) * 2
    am = x.argmax(-1)
    for kw in (dict(top_k=4), dict(top_k=6, top_p=0.7, min_p=0.05)):
        xx = x.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda a, kw=kw: kl.token_logprobs(a, am, 0.9, **kw, chunk_size=2), (xx,)
        )
        assert torch.autograd.gradcheck(
            lambda a, kw=kw: kl.token_logprobs(a, am, 0.9, return_entropy=True, **kw)[1], (xx,)
        )
        y = x + 0.01 * torch.randn(2, 2, 10, generator=g, dtype=F64)  # the same kept sets
        assert bool(torch.isfinite(kl.full_kl(x, y, temperature=1.1, **kw)).all())
        yy = y.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda a, b, kw=kw: kl.full_kl(a, b, temperature=1.1, **kw), (xx, yy)
        )
    # an outside token: −inf, zero gradient
    xx = x.clone().requires_grad_(True)
    lp = kl.token_logprobs(xx, (am + 1) % 10, top_k=1)
    lp.sum().backward()
    assert xx.grad is not None and bool((xx.grad == 0).all())


def test_full_kl_processed_against_reference():
    x, _ = rows(seed=5)
    y, _ = rows(seed=6)
    for kw, (k, p) in ((dict(top_k=8), (8, None)), (dict(top_k=8, top_p=0.9), (8, 0.9))):
        got = kl.full_kl(x, y, temperature=0.8, **kw)
        got_f = kl.full_kl(x, y, direction="forward", temperature=0.8, **kw)
        xs, ys = (x / 0.8).reshape(-1, 40), (y / 0.8).reshape(-1, 40)
        want, want_f = [], []
        for a, b in zip(xs, ys, strict=True):
            la = torch.log_softmax(torch.where(kept(a, k, p, None), a, -INF), 0)
            lb = torch.log_softmax(torch.where(kept(b, k, p, None), b, -INF), 0)
            pa, pb = la.exp(), lb.exp()

            def kl_(P, lP, lQ):
                terms = torch.where(P > 0, P * (lP - lQ), torch.zeros_like(P))
                return float(terms.sum())

            want.append(kl_(pa, la, lb))
            want_f.append(kl_(pb, lb, la))
        torch.testing.assert_close(
            got.reshape(-1), torch.tensor(want, dtype=F64), rtol=0, atol=1e-12
        )
        torch.testing.assert_close(
            got_f.reshape(-1), torch.tensor(want_f, dtype=F64), rtol=0, atol=1e-12
        )
    # the same filter on both sides of identical logits: 0
    assert bool((kl.full_kl(x, x, top_k=3, top_p=0.5) == 0).all())


def test_hvp_with_filters():
    """Second derivatives go through the processed distribution too."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 9, generator=g, dtype=F64)
    v = torch.randn(4, 9, generator=g, dtype=F64)
    tok = x.argmax(-1)
    keep = torch.stack([kept(r, 4, 0.8, None) for r in x])

    def ref(z):
        return torch.log_softmax(torch.where(keep, z, -INF), -1).gather(-1, tok[:, None]).sum()

    def ours(z):
        return kl.token_logprobs(z, tok, top_k=4, top_p=0.8).sum()

    out = []
    for f in (ours, ref):
        z = x.clone().requires_grad_(True)
        (gz,) = torch.autograd.grad(f(z), z, create_graph=True)
        (hv,) = torch.autograd.grad((gz * v).sum(), z)
        out.append((gz.detach(), hv))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-12, atol=1e-12)


def test_top_p_beyond_the_first_block():
    """A flat row: top-p needs more than the first 1024 sorted values (the doubling path)."""
    g = torch.Generator().manual_seed(8)
    V = 3000
    x = torch.randn(2, V, generator=g, dtype=F64) * 0.01
    tok = torch.tensor([5, 7])
    lp = kl.token_logprobs(x, tok, top_p=0.9)
    wlp, _, _ = reference(x, tok, 1.0, None, 0.9, None)
    torch.testing.assert_close(lp, wlp, rtol=0, atol=1e-12)
