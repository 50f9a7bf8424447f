"""Property tests: signs, zeros and the forward/reverse swap, on arbitrary log-densities."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import klest

finite = st.floats(-40.0, 40.0, allow_nan=False, allow_infinity=False)
arrays = hnp.arrays(np.float64, st.integers(1, 30), elements=finite)
NONNEGATIVE = [
    "k2",
    "k3",
    "forward_k3",
    *klest.divergence_names(),
    "alpha:0.5",
    "alpha:-1.5",
    "alpha:2",
    "alpha:3",
]


def per_sample(name: str, logq, logp):
    if name in ("k2", "k3", "forward_k3"):
        return getattr(klest, name)(logq, logp)
    return klest.fdiv(logq, logp, name)


@settings(max_examples=60, deadline=None)
@given(arrays, arrays)
def test_control_variate_estimators_are_nonnegative(a, b):
    n = min(a.size, b.size)
    for name in NONNEGATIVE:
        v = per_sample(name, a[:n], b[:n])
        assert (v >= 0).all(), name


@settings(max_examples=60, deadline=None)
@given(arrays)
def test_zero_where_logq_equals_logp(a):
    for name in [*NONNEGATIVE, "k1", "forward_k1"]:
        if name in ("k1", "forward_k1"):
            v = getattr(klest, name)(a, a)
        else:
            v = per_sample(name, a, a)
        assert (v == 0).all(), name


@settings(max_examples=60, deadline=None)
@given(arrays, arrays)
def test_forward_is_reverse_with_roles_swapped_and_importance_weighted(a, b):
    """KL(p‖q) sampled from q: forward_kN(logq, logp) = r · kN(logp, logq), r = p/q."""
    n = min(a.size, b.size)
    lq, lp = a[:n], b[:n]
    r = np.exp(lp - lq)
    np.testing.assert_allclose(
        klest.forward_k1(lq, lp), r * klest.k1(lp, lq), rtol=1e-12, atol=1e-300
    )
    np.testing.assert_allclose(
        klest.forward_k3(lq, lp), r * klest.k3(lp, lq), rtol=1e-9, atol=1e-300
    )
    np.testing.assert_allclose(
        klest.fdiv(lq, lp, "forward_kl"), klest.forward_k3(lq, lp), rtol=1e-15
    )
    np.testing.assert_allclose(klest.fdiv(lq, lp, "reverse_kl"), klest.k3(lq, lp), rtol=1e-15)


@settings(max_examples=40, deadline=None)
@given(arrays, arrays, st.integers(0, 2**32 - 1))
def test_masked_equals_kept_subset(a, b, seed):
    n = min(a.size, b.size)
    lq, lp = a[:n], b[:n]
    mask = np.random.default_rng(seed).random(n) < 0.5
    if mask.sum() < 2:
        return
    for estimator in ("k1", "k3", "chi2"):
        full = klest.estimate(lq, lp, estimator, mask=mask)
        sub = klest.estimate(lq[mask], lp[mask], estimator)
        assert full.n == sub.n
        scale = 1e-12 * max(abs(float(sub.mean)), 1.0)
        np.testing.assert_allclose(
            [full.mean, full.std], [sub.mean, sub.std], rtol=1e-9, atol=scale
        )
