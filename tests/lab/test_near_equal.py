"""Near-equal pairs: p = q up to 1e-9 in a parameter, where KL ~ 1e-19 and log p - log q
cancels O(1) terms; the exact columns must still be the mathematics' values (mpmath)."""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest

from klest import KlestError
from klest.lab import distributions as D
from klest.lab.experiments import compare
from klest.lab.truth import exact_mean_sd

MU = 1e-9


def _mp_normal_L(q: D.Normal, p: D.Normal, x: float) -> mp.mpf:
    def logpdf(m: float, s: float) -> mp.mpf:
        z = (mp.mpf(x) - mp.mpf(m)) / mp.mpf(s)
        return -z * z / 2 - mp.log(mp.mpf(s)) - mp.log(2 * mp.pi) / 2

    return logpdf(p.loc, p.scale) - logpdf(q.loc, q.scale)


@pytest.mark.parametrize(
    ("q", "p"),
    [
        (D.Normal(0.0, 1.0), D.Normal(MU, 1.0)),
        (D.Normal(0.3, 1.0), D.Normal(0.3, 1.0 + 1e-9)),
        (D.Normal(-2.0, 3.0), D.Normal(5.0, 0.5)),
    ],
)
def test_normal_log_ratio_against_mpmath(q: D.Normal, p: D.Normal) -> None:
    xs = np.array([-40.0, -3.0, -1.0, 0.0, 0.5, 1.0, 3.0, 1e3])
    with mp.workdps(60):
        want = [float(_mp_normal_L(q, p, float(x))) for x in xs]
    got = q.log_ratio(p, xs)
    for g, w in zip(got, want, strict=True):
        assert abs(g - w) <= 1e-13 * abs(w), (g, w)
    # the tail coordinate x = end + side·e^t agrees
    t = np.log(np.abs(xs[xs != 0]))
    side = np.sign(xs[xs != 0])
    for ti, si, w in zip(
        t, side, [w for w, x in zip(want, xs, strict=True) if x != 0], strict=True
    ):
        g = float(q.log_ratio_at(p, 0.0, float(si), np.array([ti]))[0])
        assert abs(g - w) <= 1e-12 * abs(w), (g, w)


def test_exact_moments_of_a_tiny_shift() -> None:
    # L = μx - μ²/2 under x ~ N(0, 1): KL = μ²/2; sd(k1) = μ; k3 = e^L - 1 - L and
    # k_opt at λ* = Cov(L, r)/Var(r) = μ²/(e^{μ²} - 1): Var = μ² - μ⁴/(e^{μ²} - 1)
    q, p = D.Normal(0.0, 1.0), D.Normal(MU, 1.0)
    mu = mp.mpf(MU)
    with mp.workdps(80):
        kl = mu**2 / 2
        phi = lambda x: mp.exp(-x * x / 2) / mp.sqrt(2 * mp.pi)  # noqa: E731
        k3 = lambda x: mp.expm1(mu * x - kl) - (mu * x - kl)  # noqa: E731
        m3 = mp.quad(lambda x: phi(x) * k3(x), [-mp.inf, 0, mp.inf])
        sd3 = mp.sqrt(mp.quad(lambda x: phi(x) * (k3(x) - m3) ** 2, [-mp.inf, 0, mp.inf]))
        sd_opt = mp.sqrt(mu**2 - mu**4 / mp.expm1(mu**2))
    mean1, sd1 = exact_mean_sd(q, p, "k1")  # type: ignore[misc]
    assert sd1 == pytest.approx(MU, rel=1e-9)
    assert abs(mean1 - float(kl)) <= 1e-6 * float(kl)  # quadrature of a spread 2e9 times wider
    mean3, s3 = exact_mean_sd(q, p, "k3")  # type: ignore[misc]
    assert mean3 == pytest.approx(float(m3), rel=1e-9)
    assert s3 == pytest.approx(float(sd3), rel=1e-6)
    mo, so = exact_mean_sd(q, p, "k_opt")  # type: ignore[misc]
    assert mo == pytest.approx(float(kl), rel=1e-5)
    assert so == pytest.approx(float(sd_opt), rel=1e-6)  # was 0.0 (Var(L) - Cov²/Var(r))


@pytest.mark.parametrize(
    ("q", "p", "sd_over_true"),
    [
        # N(μ, 1) vs N(0, 1): sd(k_opt)/KL -> √2 as μ -> 0 (see the test above)
        ("normal(0, 1)", "normal(1e-9, 1)", math.sqrt(2.0)),
        # Poisson(λ) vs Poisson(λ + δ): L = x·log(1 + δ/λ) - δ; k_opt -> (L²/2 centred), whose
        # sd/KL -> √(Var((x - λ)²) - Cov²/Var(x - λ)) / λ ... = √2 at leading order
        ("poisson(3)", "poisson(3.000000001)", math.sqrt(2.0)),
    ],
)
def test_unbiased_exact_columns_read_zero(q: str, p: str, sd_over_true: float) -> None:
    rows = {r["estimator"]: r for r in compare(q, p, ["k1", "k3", "k_opt"], n=64, seed=0)}
    for name in ("k1", "k3", "k_opt"):  # all three unbiased: E_q[r] = 1
        assert rows[name]["expected_bias_over_true"] == 0.0, name
    assert rows["k_opt"]["expected_stdev_over_true"] == pytest.approx(sd_over_true, rel=1e-4)


def test_mismatch_beyond_float64_weights_is_refused_naming_mismatch() -> None:
    from klest.lab.mismatch_lab import run_mismatch

    with pytest.raises(KlestError, match="overflow float64") as e:
        run_mismatch(3.1, presets=False)
    assert e.value.argument == "mismatch"


@pytest.mark.parametrize(
    ("a", "b"),
    [(3.0, 3.0 + 1e-9), (1e6, 1e6 + 1.0), (2e6, 2e6 + 1.0), (1e20, 1.0000001e20), (5.0, 5.4)],
)
def test_lgamma_difference_of_close_arguments(a: float, b: float) -> None:
    with mp.workdps(60):
        want = float(mp.loggamma(mp.mpf(a)) - mp.loggamma(mp.mpf(b)))
    assert D._lgamma_diff(a, b) == pytest.approx(want, rel=1e-13)


def test_huge_shape_gamma_measured_k1_is_unbiased() -> None:
    # L = δ·log x - (log Γ(b) - log Γ(a)) with log Γ(1e20) = 4.5e21: its rounding (~5e5) was the
    # whole KL (δ²/(2a) = 5e5); k1 is unbiased, so the measured bias/true is 0 within 5 SE
    (row,) = compare("gamma(1e20)", "gamma(1.0000001e20)", ["k1"], n=10_000, seed=0)
    assert abs(row["bias_over_true"]) < 5 * row["stderr_bias_over_true"]
