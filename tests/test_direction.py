"""The direction test (math.md §3): an asymmetric pair catches a swapped direction."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

import klest
from conftest import N_SIGMA

REVERSE = math.log(2) + 1 / 8 - 1 / 2  # KL(N(0,1) ‖ N(0,4)) = 0.31815
FORWARD = -math.log(2) + 2 - 1 / 2  # KL(N(0,4) ‖ N(0,1)) = 0.80685

REVERSE_ESTIMATORS = {"k1": klest.k1, "k3": klest.k3}
FORWARD_ESTIMATORS = {"forward_k1": klest.forward_k1, "forward_k3": klest.forward_k3}


def test_truths():
    assert REVERSE == pytest.approx(0.31815, abs=1e-5)
    assert FORWARD == pytest.approx(0.80685, abs=1e-5)


def _expectation_under_q(fn, q_scale: float, p_scale: float) -> float:
    """E_{x~q}[fn(L(x))] by adaptive quadrature (exact up to 1e-10, no Monte Carlo)."""

    def integrand(x: float) -> float:
        lq = stats.norm.logpdf(x, scale=q_scale)
        lp = stats.norm.logpdf(x, scale=p_scale)
        return float(fn(np.array([lq]), np.array([lp]))[0]) * math.exp(lq)

    # ±38 (not ±inf): the density there is below e^-700 and r·L stays finite in float64
    return integrate.quad(integrand, -38.0, 38.0, epsabs=1e-12, epsrel=1e-11, limit=400)[0]


@pytest.mark.parametrize("name", [*REVERSE_ESTIMATORS, *FORWARD_ESTIMATORS])
def test_expectations_q_narrow_p_wide(name):
    """q = N(0,1), p = N(0,2²): reverse estimators average to 0.31815, forward ones to 0.80685.

    Exact expectations: here r = p/q is unbounded and k3's and the forward estimators' variances
    are infinite, so a Monte Carlo tolerance could not be derived from a standard error.
    """
    fn = {**REVERSE_ESTIMATORS, **FORWARD_ESTIMATORS}[name]
    want = REVERSE if name in REVERSE_ESTIMATORS else FORWARD
    assert _expectation_under_q(fn, 1.0, 2.0) == pytest.approx(want, rel=1e-8)


def test_monte_carlo_q_narrow_p_wide_k1():
    """k1 has finite variance on the issue's pair: the sample mean lands on 0.31815."""
    n = 1_000_000
    x = np.random.default_rng(11).standard_normal(n)
    lq, lp = stats.norm.logpdf(x), stats.norm.logpdf(x, scale=2.0)
    r = klest.estimate(lq, lp, "k1")
    sigma = math.sqrt(2) * 3 / 8  # k1 = log 2 - 3x²/8, Var = (3/8)²·2
    assert abs(r.mean - REVERSE) <= N_SIGMA * sigma / math.sqrt(n)
    assert abs(r.mean - FORWARD) > 100 * sigma / math.sqrt(n)


@pytest.mark.parametrize("name", [*REVERSE_ESTIMATORS, *FORWARD_ESTIMATORS])
def test_monte_carlo_q_wide_p_narrow(name):
    """Sampling from the wide one, q = N(0,2²), p = N(0,1): r <= 2, all variances finite;
    the directions swap: reverse estimators give 0.80685, forward ones 0.31815."""
    n = 1_000_000
    x = 2.0 * np.random.default_rng(12).standard_normal(n)
    lq, lp = stats.norm.logpdf(x, scale=2.0), stats.norm.logpdf(x)
    values = {**REVERSE_ESTIMATORS, **FORWARD_ESTIMATORS}[name](lq, lp)
    r = klest.estimate(lq, lp, name)
    want = FORWARD if name in REVERSE_ESTIMATORS else REVERSE
    other = REVERSE if name in REVERSE_ESTIMATORS else FORWARD
    se = values.std(ddof=1) / math.sqrt(n)
    assert abs(r.mean - want) <= N_SIGMA * se
    assert abs(r.mean - other) > 50 * se
