"""Values *and* torch gradients stay right at extreme log-ratios: +inf (with a ±inf slope) where
the value overflows the dtype, the finite limit where it has one, never NaN (issue 7 §2).

Every expectation is computed here with mpmath at 50 digits from the textbook f of each
divergence (math.md §2), written in terms of L = log r, and differentiated numerically by mpmath.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest

import klest

torch = pytest.importorskip("torch")
mpmath.mp.dps = 50


def _alpha(a: float):
    a = mpmath.mpf(a)
    return lambda L: (mpmath.exp(a * L) - a * mpmath.exp(L) - (1 - a)) / (a * (a - 1))


# F(L) = f(e^L) - f'(1)(e^L - 1), the per-sample value fdiv returns
REFERENCE = {
    "reverse_kl": lambda L: mpmath.expm1(L) - L,
    "forward_kl": lambda L: L * mpmath.exp(L) - mpmath.expm1(L),
    "chi2": lambda L: mpmath.expm1(L) ** 2,
    "squared_hellinger": lambda L: mpmath.expm1(L / 2) ** 2,
    "jensen_shannon": lambda L: (
        (mpmath.exp(L) * L - (1 + mpmath.exp(L)) * mpmath.log((1 + mpmath.exp(L)) / 2)) / 2
    ),
    "total_variation": lambda L: abs(mpmath.expm1(L)) / 2,
    "log_squared": lambda L: L * L / 2,
    "alpha:0.5": _alpha(0.5),
    "alpha:2": _alpha(2),
    "alpha:3": _alpha(3),
    "alpha:-1": _alpha(-1),
}
# F'(L), derived by hand (mpmath's numerical derivative loses e^L against a constant at L = -709)
SLOPE = {
    "reverse_kl": mpmath.expm1,
    "forward_kl": lambda L: L * mpmath.exp(L),
    "chi2": lambda L: 2 * mpmath.expm1(L) * mpmath.exp(L),
    "squared_hellinger": lambda L: mpmath.expm1(L / 2) * mpmath.exp(L / 2),
    "jensen_shannon": lambda L: mpmath.exp(L) * (L - mpmath.log((1 + mpmath.exp(L)) / 2)) / 2,
    "total_variation": lambda L: mpmath.sign(L) * mpmath.exp(L) / 2,
    "log_squared": lambda L: L,
    **{
        f"alpha:{a}": (lambda a: lambda L: (mpmath.exp(a * L) - mpmath.exp(L)) / (a - 1))(
            mpmath.mpf(a)
        )
        for a in ("0.5", "2", "3", "-1")
    },
}
# the limit at L = -inf (r = 0): f(0) + f'(1)
AT_MINUS_INF = {
    "reverse_kl": math.inf,
    "forward_kl": 1.0,
    "chi2": 1.0,
    "squared_hellinger": 1.0,
    "jensen_shannon": math.log(2) / 2,
    "total_variation": 0.5,
    "log_squared": math.inf,
    "alpha:0.5": 2.0,
    "alpha:2": 0.5,
    "alpha:3": 1 / 3,
    "alpha:-1": math.inf,
}
GRID = [s * v for v in (1e-8, 50.0, 88.0, 100.0, 709.0, 710.0, 1e4) for s in (1, -1)]
RTOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def _expected(x: mpmath.mpf, dtype: torch.dtype) -> float:
    big = torch.finfo(dtype).max
    if abs(x) > big:
        return math.copysign(math.inf, float(mpmath.sign(x)))
    return float(x)


def _close(got: float, want: float, dtype: torch.dtype) -> bool:
    if math.isinf(want):
        return got == want
    tiny = torch.finfo(dtype).tiny
    return abs(got - want) <= RTOL[dtype] * abs(want) + tiny


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_value_and_gradient_over_extreme_log_ratios(name, dtype):
    L = torch.tensor(GRID, dtype=dtype, requires_grad=True)
    v = klest.fdiv(log_ratio=L, divergence=name)
    v.sum().backward()
    F = REFERENCE[name]
    for x, got, g in zip(GRID, v.tolist(), L.grad.tolist(), strict=True):
        Lx = mpmath.mpf(float(torch.tensor(x, dtype=dtype)))  # the value the dtype holds
        want = _expected(F(Lx), dtype)
        slope = _expected(SLOPE[name](Lx), dtype)
        assert _close(got, want, dtype), (name, dtype, x, got, want)
        assert not math.isnan(g), (name, dtype, x)
        if math.isinf(got):  # overflowed value: the slope is ±inf with the true sign
            assert g == math.copysign(math.inf, float(mpmath.sign(SLOPE[name](Lx)))), (x, g)
        else:
            # a slope within a factor 8 of the dtype's largest value may overflow in the chain
            # rule's intermediate products: +inf of the right sign is accepted there
            near_max = abs(slope) > torch.finfo(dtype).max / 8
            assert _close(g, slope, dtype) or (near_max and g == math.copysign(math.inf, slope)), (
                name,
                dtype,
                x,
                g,
                slope,
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_minus_infinity_gives_the_limit_value_and_slope(name, dtype):
    L = torch.tensor([-math.inf, 0.5], dtype=dtype, requires_grad=True)
    v = klest.fdiv(log_ratio=L, divergence=name)
    v.sum().backward()
    assert v[0].item() == pytest.approx(AT_MINUS_INF[name], rel=1e-6)
    assert not torch.isnan(L.grad).any(), L.grad
    # the slope's limit at L = -inf: -1 for k3 (e^L - 1), -inf where F'(L) ~ L or ~ -e^{-L}/2
    limit = {"reverse_kl": -1.0, "log_squared": -math.inf, "alpha:-1": -math.inf}
    assert L.grad[0].item() == limit.get(name, 0.0)
    slope = float(SLOPE[name](mpmath.mpf(0.5)))
    assert L.grad[1].item() == pytest.approx(slope, rel=RTOL[dtype])


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_plus_infinity_is_refused(name):
    with pytest.raises(klest.KlestError, match="inf"):
        klest.fdiv(log_ratio=torch.tensor([math.inf]), divergence=name)


# ------------------------------------------------------------------ k_opt / k_lambda (§2.1)
def _naive_k_opt(L: torch.Tensor) -> torch.Tensor:
    """-L + λ̂(r - 1), λ̂ = Cov(L, r)/Var(r), written out plainly (float64, no overflow here)."""
    e = torch.expm1(L)
    dL, de = L - L.mean(), e - e.mean()
    lam = (dL * de).sum() / (de * de).sum()
    return -L + lam * e


@pytest.mark.parametrize("lam", [1.0, 0.0, -2.0, 0.5])
def test_k_lambda_is_inf_where_logp_is_minus_inf(lam):
    lp = np.array([-0.1, -np.inf, 0.2])
    v = klest.k_lambda(np.zeros(3), lp, lam)
    assert v[1] == np.inf
    np.testing.assert_allclose(v[[0, 2]], -lp[[0, 2]] + lam * np.expm1(lp[[0, 2]]), rtol=1e-12)


@pytest.mark.parametrize("cross_fit", [False, True])
def test_k_opt_is_inf_where_logp_is_minus_inf_even_when_lambda_is_one(cross_fit):
    # every finite L is 0: Var(r) = 0, λ̂ = 1, and (λ̂ - 1)·L was 0·(-inf) = NaN
    lp = np.array([0.0, 0.0, -np.inf, 0.0, 0.0, -np.inf])
    v, lam = klest.k_opt(np.zeros(6), lp, cross_fit=cross_fit, return_lambda=True)
    np.testing.assert_array_equal(v, [0.0, 0.0, np.inf, 0.0, 0.0, np.inf])
    assert np.all(np.asarray(lam) == 1.0)


def _shift_sample(n: int = 2000, big: float = 89.0) -> np.ndarray:
    """L of q = N(0,1), p = N(0.1, 1) (L ~ N(-0.005, 0.1²)) with one sample at ``big``."""
    L = np.random.default_rng(3).normal(-0.005, 0.1, n)
    L[17] = big
    return L


def test_k_opt_agrees_in_float32_and_float64_when_one_r_overflows_float32():
    L = _shift_sample()  # e^89 > float32's largest value
    ref = _naive_k_opt(torch.tensor(L, dtype=torch.float64))
    ref_lam = float(np.cov(L, np.expm1(L))[0, 1] / np.var(np.expm1(L), ddof=1))
    for dtype in (np.float64, np.float32):
        v, lam = klest.k_opt(log_ratio=L.astype(dtype), return_lambda=True)
        assert np.isfinite(v).all(), dtype
        assert float(lam) == pytest.approx(ref_lam, rel=1e-5), dtype
        assert float(np.mean(v, dtype=np.float64)) == pytest.approx(
            float(ref.mean()), rel=1e-4, abs=1e-6
        )
        lam_opt = klest.optimal_lambda(log_ratio=L.astype(dtype))
        assert float(lam_opt) == pytest.approx(ref_lam, rel=1e-5), dtype


def test_k_opt_gradients_finite_with_an_overflowing_sample():
    L64 = torch.tensor(_shift_sample(big=95.0), dtype=torch.float64, requires_grad=True)
    _naive_k_opt(L64).sum().backward()
    L32 = torch.tensor(_shift_sample(big=95.0), dtype=torch.float32, requires_grad=True)
    v = klest.k_opt(log_ratio=L32)
    assert torch.isfinite(v).all()
    v.sum().backward()
    assert torch.isfinite(L32.grad).all()
    np.testing.assert_allclose(L32.grad.numpy(), L64.grad.numpy(), rtol=1e-3, atol=1e-4)


def test_k_opt_infinite_value_does_not_poison_other_gradients():
    L = _shift_sample(n=200, big=0.3)
    L[5] = -np.inf  # log p = -inf on one sample
    t = torch.tensor(L, requires_grad=True)
    v = klest.k_opt(log_ratio=t)
    assert v[5].item() == math.inf
    v[torch.isfinite(v)].sum().backward()
    assert torch.isfinite(t.grad).all()
    keep = torch.tensor(np.delete(L, 5), requires_grad=True)
    _naive_k_opt(keep).sum().backward()
    np.testing.assert_allclose(np.delete(t.grad.numpy(), 5), keep.grad.numpy(), rtol=1e-9)
