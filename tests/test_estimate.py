"""The one-call reduction: axis and mask semantics, Moments, jit."""

from __future__ import annotations

import math

import numpy as np
import pytest

import klest

RNG = np.random.default_rng(5)
LOGQ = RNG.normal(size=(3, 7, 40))
LOGP = LOGQ + RNG.normal(scale=0.3, size=(3, 7, 40))


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_moving_the_axis_gives_the_same_answer(axis):
    r = klest.estimate(LOGQ, LOGP, "k3", axis=axis)
    moved = klest.estimate(np.moveaxis(LOGQ, axis, -1), np.moveaxis(LOGP, axis, -1), "k3", axis=-1)
    np.testing.assert_allclose(r.mean, moved.mean, rtol=1e-13)
    np.testing.assert_allclose(r.std, moved.std, rtol=1e-12)
    values = np.moveaxis(klest.k3(LOGQ, LOGP), axis, -1)
    np.testing.assert_allclose(r.mean, values.mean(axis=-1), rtol=1e-13)
    np.testing.assert_allclose(r.std, values.std(axis=-1, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(r.stderr, r.std / np.sqrt(r.n), rtol=1e-15)


def test_mask_along_axis_equals_kept_subsets_and_empty_rows_are_nan():
    mask = RNG.random(LOGQ.shape[1:]) < 0.5
    mask[2] = False  # an empty row
    q, p = LOGQ[0], LOGP[0]
    r = klest.estimate(q, p, "k3", axis=1, mask=mask)
    for i in range(q.shape[0]):
        kept = klest.k3(q[i][mask[i]], p[i][mask[i]])
        assert r.n[i] == kept.size
        if kept.size >= 2:
            assert r.mean[i] == pytest.approx(kept.mean(), rel=1e-13)
            assert r.std[i] == pytest.approx(kept.std(ddof=1), rel=1e-12)
    assert math.isnan(r.mean[2]) and math.isnan(r.std[2])


def test_integer_mask_and_ddof():
    m = (RNG.random(LOGQ.shape) < 0.7).astype(np.int64)
    a = klest.estimate(LOGQ, LOGP, "k1", mask=m, ddof=0)
    values = klest.k1(LOGQ, LOGP)[m.astype(bool)]
    assert a.mean == pytest.approx(values.mean(), rel=1e-12)
    assert a.std == pytest.approx(values.std(), rel=1e-12)


def test_moments_merge_is_exact():
    a, b = RNG.normal(3.0, 2.0, 1001), RNG.normal(-1.0, 0.5, 17)
    merged = klest.Moments.of(a).merge(klest.Moments.of(b))
    both = np.concatenate([a, b])
    assert merged.n == both.size
    assert merged.mean == pytest.approx(both.mean(), rel=1e-14)
    assert merged.var() == pytest.approx(both.var(ddof=1), rel=1e-13)
    parts = [klest.Moments.of(c) for c in np.array_split(both, 9)]
    combined = klest.Moments.combine(
        [m.n for m in parts], [m.mean for m in parts], [m.m2 for m in parts]
    )
    assert combined.var() == pytest.approx(both.var(ddof=1), rel=1e-13)
    assert klest.Moments().merge(klest.Moments.of(a)) == klest.Moments.of(a)


def test_jax_jit():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    f = jax.jit(lambda q, p: klest.k3(q, p))
    got = f(jnp.asarray(LOGQ), jnp.asarray(LOGP))
    np.testing.assert_allclose(np.asarray(got), klest.k3(LOGQ, LOGP), rtol=1e-13)


def test_custom_callable_estimator():
    def half_k1(*, log_ratio):
        return -log_ratio / 2

    r = klest.estimate(LOGQ, LOGP, half_k1)
    assert r.mean == pytest.approx(np.mean(klest.k1(LOGQ, LOGP)) / 2, rel=1e-12)
    assert klest.estimate(LOGQ, LOGP, klest.k3) == klest.estimate(LOGQ, LOGP, "k3")
