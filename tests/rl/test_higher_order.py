"""Gradients that are right everywhere: no NaN where e^L overflows, correct second derivatives
(Hessian-vector products), torch.func, and the small input rules of issue 7 §2."""

from __future__ import annotations

import math
import warnings

import pytest

torch = pytest.importorskip("torch")
mpmath = pytest.importorskip("mpmath")

import klest.rl as rl  # noqa: E402
from klest import KlestError  # noqa: E402

F64 = torch.float64

# ---------------------------------------------------------------- f as written in the literature
# (t = p/q = e^L; value v(L) = f(t) - f'(1)(t - 1); mpmath at 50 digits)
_F = {
    "reverse_kl": (lambda t: -mpmath.log(t), -1),
    "forward_kl": (lambda t: t * mpmath.log(t), 1),
    "chi2": (lambda t: (t - 1) ** 2, 0),
    "squared_hellinger": (lambda t: (mpmath.sqrt(t) - 1) ** 2, 0),
    "jensen_shannon": (
        lambda t: (t * mpmath.log(t) - (1 + t) * mpmath.log((1 + t) / 2)) / 2,
        0,
    ),
    "total_variation": (lambda t: abs(t - 1) / 2, 0),
    "log_squared": (lambda t: mpmath.log(t) ** 2 / 2, 0),
}
for _a in (0.5, 2.0, 3.0, -1.0):
    _F[f"alpha:{_a:g}"] = (
        lambda t, a=_a: (t**a - a * t - (1 - a)) / (a * (a - 1)),
        0,
    )
_F["k3"] = _F["reverse_kl"]
_F["forward_k3"] = _F["forward_kl"]

GRID = [1e-8, 0.3, 5.0, 50.0, 88.0, 100.0, 709.0, 710.0, 1e4]


def _mp_derivatives(name: str, L: float) -> tuple[float, float]:
    """(v'(L), v(L) - v'(L)) at 50 digits, rounded to float64 (±inf beyond its range)."""
    f, fp1 = _F[name]
    with mpmath.workdps(60 + int(abs(L) / 2)):  # v and v' are ~e^|L|: v - v' cancels digits
        Lm = mpmath.mpf(L)

        def v(x):
            t = mpmath.exp(x)
            return f(t) - fp1 * (t - 1)

        d = mpmath.diff(v, Lm)
        return _to_float(d), _to_float(v(Lm) - d)


def _to_float(x) -> float:
    if abs(x) > mpmath.mpf("1.7976931348623157e308"):
        return math.copysign(math.inf, float(mpmath.sign(x)))
    return float(x)


def _round(x: float, dtype) -> float:
    if math.isinf(x):
        return x
    return float(torch.tensor(x, dtype=F64).to(dtype).to(F64))


@pytest.mark.parametrize("name", sorted(_F))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_overflowing_log_ratios_give_exact_or_infinite_gradients_never_nan(name, dtype):
    """As written (d/dlogp = -v') and with a differentiable weight (d/dlogp = v - v'), at
    |L| up to 1e4 in both directions: the mpmath value rounded to the dtype, ±inf beyond."""
    Ls = [s * L for L in GRID for s in (1.0, -1.0)]
    # (total_variation is not differentiable at L = 0 only, which the grid avoids)
    ref = torch.tensor([Ls], dtype=dtype)
    lp = torch.zeros_like(ref, requires_grad=True)
    est = "fdiv:" + name if name in ("reverse_kl", "forward_kl") else name
    kw = dict(estimator=est, gradient="as_written")
    (g_as,) = torch.autograd.grad(rl.kl_per_token(lp, ref, **kw).sum(), lp)
    (g_w,) = torch.autograd.grad(rl.kl_per_token(lp, ref, weight="differentiable", **kw).sum(), lp)
    assert not torch.isnan(g_as).any() and not torch.isnan(g_w).any()
    rtol = 2e-5 if dtype == torch.float32 else 1e-9
    for i, L in enumerate(float(x) for x in ref[0]):
        slope, score = _mp_derivatives(name, L)
        for got, want in ((float(g_as[0, i]), -slope), (float(g_w[0, i]), score)):
            want = _round(want, dtype)
            if math.isinf(want) or abs(want) > torch.finfo(dtype).max:
                assert got == math.copysign(math.inf, want), (name, L, got, want)
            else:
                tiny = torch.finfo(dtype).tiny
                assert got == pytest.approx(want, rel=rtol, abs=4 * tiny), (name, L, got, want)


# Whether f(0) = +inf (the value at ref_logp = -inf is then +inf), from each f's definition: f at
# t = 1e-100000 in mpmath is beyond 1e5 exactly for those (-log t, ½(log t)², t^-1 of α = -1);
# the others tend to a finite limit (t log t → 0, (t - 1)² → 1, ...).
_F_AT_ZERO_INFINITE = {n: bool(f(mpmath.mpf("1e-100000")) > 1e5) for n, (f, _) in _F.items()}


def test_minus_infinite_reference_gives_limits_not_nan():
    """ref_logp = -inf (r = 0): every gradient is its limit (finite or ±inf), never NaN."""
    for name in sorted(_F):
        lp = torch.zeros(1, 2, dtype=F64, requires_grad=True)
        ref = torch.tensor([[-math.inf, -1.0]], dtype=F64)
        est = "fdiv:" + name if name in ("reverse_kl", "forward_kl") else name
        for weight in ("detached", "differentiable"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = rl.kl_per_token(lp, ref, estimator=est, gradient="as_written", weight=weight)
            # the warning says the value is +inf there: given exactly when f(0) = +inf
            said = any("probability 0" in str(w.message) for w in caught)
            assert said == (_F_AT_ZERO_INFINITE[name]), (name, said)
            assert bool(torch.isposinf(out[0, 0])) == _F_AT_ZERO_INFINITE[name], (name, out)
            (g,) = torch.autograd.grad(out.sum(), lp)
            assert not torch.isnan(g).any(), (name, weight, g)


# ------------------------------------------------------------------------ second derivatives
def _reference_loss(option: str, lp, ref, old, mask):
    """Plain differentiable formulas (float64) with the same value and gradient as klest's."""
    m = mask.to(F64)
    L = ref - lp
    k2 = 0.5 * L**2
    k3 = torch.expm1(L) - L
    w = torch.exp(lp - old)
    if option == "default":  # k3 value, reverse-KL gradient: straight-through k2
        x = k3.detach() + k2 - k2.detach()
    elif option == "forward_kl":  # k3 value, gradient of KL(π_ref‖π): (1 - r) per token
        x = k3.detach() + (lp + torch.exp(L)) - (lp + torch.exp(L)).detach()
    elif option == "as_written":
        x = k3
    elif option == "differentiable_weight":
        x = w * k3
    elif option == "detached_weight":
        x = w.detach() * (k3.detach() + k2 - k2.detach())
    else:  # "chi2": an f-divergence as written
        x = torch.expm1(L) ** 2
    return (x * m).sum() / m.sum()


_OPTIONS = {
    "default": {},
    "forward_kl": dict(gradient="forward_kl"),
    "as_written": dict(gradient="as_written"),
    "differentiable_weight": dict(gradient="as_written", weight="differentiable", old=True),
    "detached_weight": dict(old=True),
    "chi2": dict(estimator="chi2", gradient="as_written"),
}


def _batch(seed=0, B=3, T=7):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=F64) * 2
    ref = lp + 0.5 * torch.randn(B, T, generator=g, dtype=F64)
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[0, 0] = True
    return lp, ref, old, mask


@pytest.mark.parametrize("option", sorted(_OPTIONS))
def test_hessian_vector_products_equal_the_plain_formula(option):
    kw = dict(_OPTIONS[option])
    use_old = kw.pop("old", False)
    lp0, ref, old, mask = _batch(1)
    g = torch.Generator().manual_seed(5)
    v = torch.randn(lp0.shape, generator=g, dtype=F64)

    def ours(lp):
        return rl.kl_loss(
            lp, ref, old_logp=old if use_old else None, mask=mask, diagnostics=False, **kw
        ).loss

    def theirs(lp):
        return _reference_loss(option, lp, ref, old, mask)

    _, hv_ours = torch.autograd.functional.hvp(ours, lp0, v)
    _, hv_theirs = torch.autograd.functional.hvp(theirs, lp0, v)
    torch.testing.assert_close(hv_ours, hv_theirs, rtol=1e-10, atol=1e-14)
    # the per-token path too
    lp = lp0.clone().requires_grad_(True)
    per_token = rl.kl_per_token(lp, ref, old_logp=old if use_old else None, mask=mask, **kw)
    (gr,) = torch.autograd.grad((per_token * v).sum(), lp, create_graph=True)
    (hv,) = torch.autograd.grad(gr.sum(), lp)
    lp = lp0.clone().requires_grad_(True)
    assert torch.isfinite(hv).all()
    assert (hv[~mask] == 0).all()


def test_the_kl_curvature_is_not_dropped():
    """The issue's 10-token example: policy loss ½‖logp‖² plus the default KL (token-mean):
    the Hessian's diagonal is 1 + 1/10 (k2's curvature ℓ' = 1 per token, over 10 tokens)."""
    lp0 = -torch.rand(1, 10, dtype=F64)
    ref = lp0 + 0.3
    v = torch.ones_like(lp0)
    _, hv = torch.autograd.functional.hvp(
        lambda lp: rl.kl_loss(lp, ref).loss + 0.5 * (lp**2).sum(), lp0, v
    )
    torch.testing.assert_close(hv, torch.full_like(lp0, 1.1), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(gradient="as_written", estimator="jensen_shannon", clamp=1.0),
        dict(gradient="as_written", weight="differentiable", value_clamp=0.3),
        dict(gradient="sequence_reverse_kl", aggregation="seq-mean-token-mean"),
    ],
)
def test_gradgradcheck(kw):
    lp0, ref, old, mask = _batch(2, B=2, T=4)
    use_old = kw.get("weight") == "differentiable"

    def f(lp):
        return rl.kl_loss(
            lp, ref, old_logp=old if use_old else None, mask=mask, diagnostics=False, **kw
        ).loss

    lp = lp0.clone().requires_grad_(True)
    if kw.get("gradient") == "as_written":  # the gradient is the value's derivative only here
        assert torch.autograd.gradcheck(f, (lp,))
    assert torch.autograd.gradgradcheck(f, (lp,))  # the derivative of the gradient, always


# ----------------------------------------------------------------------------------- torch.func
def test_torch_func_grad_and_vmap_equal_autograd():
    from torch.func import grad, vmap

    lp0, ref, old, mask = _batch(3)

    def f(lp, r, o, m):
        return rl.kl_loss(lp, r, old_logp=o, mask=m, weight="detached").loss

    want = []
    for b in range(lp0.shape[0]):
        lp = lp0[b : b + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(lp, ref[b : b + 1], old[b : b + 1], mask[b : b + 1]), lp)
        want.append(g)
    per_row = vmap(grad(f))(lp0[:, None], ref[:, None], old[:, None], mask[:, None])
    torch.testing.assert_close(per_row[:, 0], torch.cat(want), rtol=1e-12, atol=0)
    got = grad(f)(lp0[:1], ref[:1], old[:1], mask[:1])
    torch.testing.assert_close(got, want[0], rtol=1e-12, atol=0)
    values = vmap(f)(lp0[:, None], ref[:, None], old[:, None], mask[:, None])
    for b in range(lp0.shape[0]):
        one = f(lp0[b : b + 1], ref[b : b + 1], old[b : b + 1], mask[b : b + 1])
        torch.testing.assert_close(values[b], one, rtol=1e-12, atol=0)
    # a Hessian through torch.func: d²/dlogp² of the default loss is diag(1/N) on valid tokens
    h = torch.func.jacrev(
        torch.func.jacrev(lambda lp: rl.kl_loss(lp, ref[:1], mask=mask[:1]).loss)
    )(lp0[:1])
    n = int(mask[:1].sum())
    want_h = torch.diag((mask[0].to(F64)) / n)
    torch.testing.assert_close(h.reshape(want_h.shape), want_h, rtol=1e-12, atol=0)


# ------------------------------------------------------------------ reward_to_go and horizon
def test_reward_to_go_bad_arguments_and_empty_sequences():
    x = torch.zeros(3, 0)
    for gamma in (1.0, 0.9, 0.0):
        out = rl.reward_to_go(x, gamma=gamma)
        assert out.shape == (3, 0)
    with pytest.raises(KlestError, match="gamma"):
        rl.reward_to_go(torch.ones(2, 3), gamma="0.9")
    with pytest.raises(KlestError, match="gamma"):
        rl.reward_to_go(torch.ones(2, 3), gamma=True)
    with pytest.raises(KlestError, match="gamma"):
        rl.reward_to_go(torch.ones(2, 3), gamma=float("nan"))
    out = rl.reward_to_go(torch.ones(1, 3, dtype=F64), gamma=0.5)
    torch.testing.assert_close(out, torch.tensor([[1.75, 1.5, 1.0]], dtype=F64))


@pytest.mark.parametrize("horizon", [2.5, 2.0, "8", True, 0, -3])
def test_horizon_must_be_a_positive_integer(horizon):
    x = torch.ones(2, 4)
    with pytest.raises(KlestError, match="horizon"):
        rl.aggregate(x, None, "seq-mean-token-sum-norm", horizon=horizon)
    with pytest.raises(KlestError, match="horizon"):
        rl.kl_loss(x, x, aggregation="seq-mean-token-sum-norm", horizon=horizon)


def test_horizon_accepts_integers_of_any_kind():
    import numpy as np

    x = torch.ones(2, 4)
    for h in (8, np.int64(8)):
        torch.testing.assert_close(
            rl.aggregate(x, None, "seq-mean-token-sum-norm", horizon=h), torch.tensor(0.5)
        )


# ------------------------------------------------------------------------------ the mask rule
def test_masked_entries_are_ignored_entirely():
    """NaN and ±inf under the mask (in logp, ref_logp and old_logp) are never checked and never
    reach a value or a gradient; the same at a valid token is refused."""
    lp0, ref, old, mask = _batch(4)
    bad = ~mask
    assert bad.any()
    lp_p = torch.where(bad, torch.tensor(math.nan, dtype=F64), lp0)
    ref_p = torch.where(bad, torch.tensor(math.inf, dtype=F64), ref)
    old_p = torch.where(bad, torch.tensor(-math.inf, dtype=F64), old)
    for kw in (dict(), dict(gradient="as_written", weight="differentiable", estimator="chi2")):
        lp = lp_p.clone().requires_grad_(True)
        out = rl.kl_loss(lp, ref_p, old_logp=old_p, mask=mask, **kw).loss
        (g,) = torch.autograd.grad(out, lp)
        lp = lp0.clone().requires_grad_(True)
        want = rl.kl_loss(lp, ref, old_logp=old, mask=mask, **kw).loss
        (g_want,) = torch.autograd.grad(want, lp)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(g, g_want)
        assert (g[bad] == 0).all()
    pen = rl.kl_penalty(lp_p, ref_p, mask=mask)
    assert torch.isfinite(pen).all() and (pen[bad] == 0).all()
    with pytest.raises(KlestError, match="NaN"):
        rl.kl_loss(lp_p, ref, mask=None)
