"""Registered estimators in klest.rl: what their functions return is checked once per call (one
value per token, a floating dtype at least as wide, no NaN where L is not NaN), with a KlestError
naming the estimator; and their derivatives, when taken by autograd, keep the estimator's
curvature under ``create_graph=True`` and work under ``torch.func``.

Expected values are written here from the formulas (k2 = ½L², k3 = expm1(L) − L), never taken
from klest's output."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import klest  # noqa: E402
import klest.rl as rl  # noqa: E402
from klest import table  # noqa: E402

F64 = torch.float64


@pytest.fixture
def registered():
    names = []

    def add(name, value, **kw):
        names.append(name)
        rec = klest.Estimator(name, "reverse_kl", value, unbiased=False, **kw)
        return klest.register_estimator(rec)

    yield add
    for n in names:
        table.unregister_estimator(n)


def _data(dtype=F64):
    g = torch.Generator().manual_seed(3)
    lp = torch.randn(2, 5, generator=g, dtype=F64) * 0.5
    ref = torch.randn(2, 5, generator=g, dtype=F64) * 0.5
    ref[1, 2] = lp[1, 2] + 1.5  # one L = ref - logp above 1
    return lp.to(dtype), ref.to(dtype)


BAD = {
    "drops_one": (lambda xp, L: xp.reshape(L, (-1,))[1:], "shape"),
    "scalar": (lambda xp, L: xp.sum(L), r"shape \(\)"),
    "broadcast": (lambda xp, L: L[None], "shape"),
    "python_list": (lambda xp, L: [0.0], "not an array"),
    "integer": (lambda xp, L: xp.astype(L > 0, xp.int64), "dtype"),
    "nan_above_1": (lambda xp, L: xp.where(L > 1, math.nan, -L), "NaN"),
}

CALLS = {
    "kl_per_token": lambda lp, ref, name: rl.kl_per_token(lp, ref, estimator=name),
    "kl_penalty": lambda lp, ref, name: rl.kl_penalty(lp, ref, estimator=name),
    "kl_loss": lambda lp, ref, name: (
        rl.kl_loss(lp.clone().requires_grad_(True), ref, estimator=name).loss
    ),
    "kl_loss_as_written": lambda lp, ref, name: (
        rl.kl_loss(lp.clone().requires_grad_(True), ref, estimator=name, gradient="as_written").loss
    ),
}


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_a_bad_value_function_is_refused(registered, case, call, dtype):
    fn, what = BAD[case]
    name = f"rl_bad_{case}"
    registered(name, fn)
    lp, ref = _data(dtype)
    with pytest.raises(klest.KlestError, match=what) as err:
        CALLS[call](lp, ref, name)
    assert f"'{name}'" in str(err.value)


def test_a_narrower_dtype_is_refused_and_a_wider_one_accepted(registered):
    registered("rl_narrow", lambda xp, L: xp.astype(-L, xp.float32))
    lp, ref = _data()
    with pytest.raises(klest.KlestError, match="dtype"):
        rl.kl_per_token(lp, ref, estimator="rl_narrow")
    registered("rl_wider", lambda xp, L: xp.astype(-L, xp.float64))
    lp32, ref32 = _data(torch.float32)
    got = rl.kl_per_token(lp32, ref32, estimator="rl_wider")
    want = (lp32 - ref32).to(F64)  # k1 = -L = logp - ref
    torch.testing.assert_close(got.to(F64), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "field,what",
    [("derivative", "(derivative)"), ("value_minus_derivative", "(value_minus_derivative)")],
)
@pytest.mark.parametrize("bad", ["nan", "drops_one"])
def test_bad_derivative_forms_are_refused(registered, field, what, bad):
    fn = (lambda xp, L: L * math.nan) if bad == "nan" else (lambda xp, L: xp.reshape(L, (-1,))[1:])
    name = f"rl_bad_{field}_{bad}"
    registered(name, lambda xp, L: -L, **{field: fn})
    lp, ref = _data()
    kw = {"gradient": "as_written"}
    if field == "value_minus_derivative":  # used by the differentiable weight
        kw.update(old_logp=lp - 0.1, weight="differentiable")
    with pytest.raises(klest.KlestError, match=name) as err:
        rl.kl_loss(lp.clone().requires_grad_(True), ref, estimator=name, **kw)
    assert what in str(err.value)


def test_an_autograd_derivative_that_is_nan_is_refused(registered):
    # sqrt(|L|)·0 is 0, but its derivative at L = 0 is inf·0 = NaN
    registered("rl_nan_slope", lambda xp, L: xp.sqrt(xp.abs(L)) * 0 - L)
    lp, ref = _data()
    ref[0, 0] = lp[0, 0]
    with pytest.raises(klest.KlestError, match=r"'rl_nan_slope' \(derivative\) returned NaN"):
        rl.kl_loss(
            lp.clone().requires_grad_(True), ref, estimator="rl_nan_slope", gradient="as_written"
        )


def test_nan_where_masked_is_not_the_estimators_fault(registered):
    registered("rl_nan_above_1", lambda xp, L: xp.where(L > 1, math.nan, -L))
    lp, ref = _data()
    mask = (ref - lp) <= 1
    got = rl.kl_per_token(lp, ref, mask=mask, estimator="rl_nan_above_1")
    want = torch.where(mask, lp - ref, torch.zeros_like(lp))
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)


FORMULAS = {
    "rl_k2_plain": (lambda xp, L: L * L / 2, lambda L: L * L / 2),
    "rl_k3_plain": (lambda xp, L: xp.expm1(L) - L, lambda L: torch.expm1(L) - L),
}


def _hvp(f, x, v):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)
    (h,) = torch.autograd.grad((g * v).sum(), x)
    return g.detach(), h


@pytest.mark.parametrize("name", sorted(FORMULAS))
@pytest.mark.parametrize("weight", ["none", "differentiable"])
def test_autograd_derivatives_keep_the_curvature(registered, name, weight):
    """Without a ``derivative`` the slope comes from autograd of the value; under
    ``create_graph=True`` it must stay a function of logp (before, v'' was dropped and the
    double backward raised, or lost the KL's curvature inside a larger graph)."""
    value, formula = FORMULAS[name]
    registered(name, value)
    lp, ref = _data()
    v = torch.randn(lp.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    n = lp.numel()
    old = lp + 0.2
    if weight == "none":

        def ours(x):
            return rl.kl_loss(x, ref, estimator=name, gradient="as_written").loss + (x**2).sum()

        def plain(x):
            return formula(ref - x).sum() / n + (x**2).sum()
    else:

        def ours(x):
            return rl.kl_loss(
                x, ref, old_logp=old, estimator=name, gradient="as_written", weight=weight
            ).loss

        def plain(x):
            return (torch.exp(x - old) * formula(ref - x)).sum() / n

    g1, h1 = _hvp(ours, lp, v)
    g2, h2 = _hvp(plain, lp, v)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(h1, h2, rtol=1e-12, atol=1e-14)


def test_autograd_derivatives_under_torch_func(registered):
    registered("rl_k2_func", lambda xp, L: L * L / 2)
    lp, ref = _data()
    n = lp.numel()
    got = torch.func.grad(
        lambda x: rl.kl_loss(x, ref, estimator="rl_k2_func", gradient="as_written").loss
    )(lp)
    torch.testing.assert_close(got, -(ref - lp) / n, rtol=1e-14, atol=0)  # d(½L²)/dlogp = -L
    per = torch.func.vmap(lambda a, b: rl.kl_per_token(a, b, estimator="rl_k2_func"))(lp, ref)
    torch.testing.assert_close(per, (ref - lp) ** 2 / 2, rtol=1e-14, atol=0)
