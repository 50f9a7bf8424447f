"""Accuracy of the stable primitives against a 50-digit mpmath reference (math.md §5)."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest

import klest
from conftest import ulp_error

mpmath.mp.dps = 50

# |L| from 1e-8 to 50, both signs, dense near the branch switch at |L| = 1.
MAGNITUDES = np.concatenate([np.logspace(-8, np.log10(50), 400), [0.999, 1.0, 1.001, 0.5, 2.0]])
POINTS = np.sort(np.concatenate([MAGNITUDES, -MAGNITUDES]))
MAX_ULP = 4.0  # "a few ulp"
BUILTIN_DIVERGENCES = [
    "chi2",
    "forward_kl",
    "jensen_shannon",
    "log_squared",
    "reverse_kl",
    "squared_hellinger",
    "total_variation",
]


def ref_k3(x: float) -> mpmath.mpf:
    x = mpmath.mpf(x)
    return mpmath.expm1(x) - x


def ref_forward_k3(x: float) -> mpmath.mpf:
    x = mpmath.mpf(x)
    return x * mpmath.exp(x) - mpmath.expm1(x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("fn", "ref"),
    [(klest.k3, ref_k3), (klest.forward_k3, ref_forward_k3)],
    ids=["k3", "forward_k3"],
)
def test_accuracy_in_ulp(fn, ref, dtype):
    L = POINTS.astype(dtype)
    got = fn(log_ratio=L)
    assert got.dtype == dtype
    errs = ulp_error(got, [ref(float(x)) for x in L], dtype)
    worst = int(np.argmax(errs))
    assert errs[worst] <= MAX_ULP, f"{errs[worst]:.1f} ulp at L = {L[worst]!r}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_naive_formula_would_fail(dtype):
    """The test above has teeth: exp(L) - 1 - L is off by far more than 4 ulp near 0."""
    L = np.array([1e-3, -1e-3, 1e-5], dtype=dtype)
    naive = np.exp(L) - 1 - L
    errs = ulp_error(naive, [ref_k3(float(x)) for x in L], dtype)
    assert errs.max() > 100


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_estimate_fast_path_matches_reference(dtype):
    """estimate()'s streaming kernels compute each value to the input's precision or better."""
    L = POINTS.astype(dtype)
    ref = np.array([float(ref_k3(float(x))) for x in L])
    r = klest.estimate(log_ratio=L, estimator="k3", ddof=0)
    assert r.mean == pytest.approx(ref.mean(), rel=1e-12)
    assert r.std == pytest.approx(ref.std(), rel=1e-12)


def test_fdiv_forms_match_mpmath():
    """Every registered divergence's stable log-space form equals f(r) - f'(1)(r - 1) to 1e-13."""
    L = np.concatenate([-np.logspace(-6, 1.5, 60), np.logspace(-6, 1.5, 60)])
    for name in BUILTIN_DIVERGENCES:
        div = klest.get_divergence(name)
        got = klest.fdiv(log_ratio=L, divergence=name)
        for x, g in zip(L, got, strict=True):
            t = mpmath.exp(mpmath.mpf(float(x)))
            f = _mp_f(name, t)
            want = f - div.f_prime_at_1 * (t - 1)
            assert float(abs(g - want)) <= 1e-13 * max(float(abs(want)), 1e-300) + 1e-300, (name, x)


def _mp_f(name: str, t):
    if name == "reverse_kl":
        return -mpmath.log(t)
    if name == "forward_kl":
        return t * mpmath.log(t)
    if name == "chi2":
        return (t - 1) ** 2
    if name == "squared_hellinger":
        return (mpmath.sqrt(t) - 1) ** 2
    if name == "jensen_shannon":
        return (t * mpmath.log(t) - (1 + t) * mpmath.log((1 + t) / 2)) / 2
    if name == "total_variation":
        return abs(t - 1) / 2
    if name == "log_squared":
        return mpmath.log(t) ** 2 / 2
    raise AssertionError(name)


@pytest.mark.parametrize("alpha", [-1.0, 0.25, 0.5, 2.0, 3.0])
def test_alpha_divergence_matches_mpmath(alpha):
    L = np.concatenate([-np.logspace(-6, 1, 40), np.logspace(-6, 1, 40)])
    got = klest.fdiv(log_ratio=L, divergence=f"alpha:{alpha}")
    a = mpmath.mpf(alpha)
    for x, g in zip(L, got, strict=True):
        t = mpmath.exp(mpmath.mpf(float(x)))
        want = (t**a - a * t - (1 - a)) / (a * (a - 1))
        assert float(abs(g - want)) <= 1e-12 * float(abs(want)), (alpha, x)


def test_builtin_registry():
    assert set(BUILTIN_DIVERGENCES) <= set(klest.divergence_names())


def test_neg_inf_logp_gives_inf_not_nan():
    lq = np.zeros(3)
    lp = np.array([-np.inf, 0.0, -1.0])
    for fn in (klest.k1, klest.k2, klest.k3):
        v = fn(lq, lp)
        assert v[0] == np.inf and np.isfinite(v[1:]).all()
    # forward direction: r = 0 contributes r log r = 0, and the control variate's +1
    assert klest.forward_k1(lq, lp)[0] == 0.0
    assert klest.forward_k3(lq, lp)[0] == 1.0
    assert klest.fdiv(lq, lp, "jensen_shannon")[0] == pytest.approx(np.log(2) / 2)
    assert klest.fdiv(lq, lp, "chi2")[0] == 1.0
    assert klest.fdiv(lq, lp, "alpha:0.5")[0] == pytest.approx(2.0)
    r = klest.estimate(lq, lp, "k3")
    assert r.mean == np.inf and r.std == np.inf and r.n == 3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_overflow_is_inf_not_nan(dtype):
    big = 100.0 if dtype == np.float32 else 800.0
    with np.errstate(over="ignore"):
        v = klest.k3(log_ratio=np.array([big], dtype=dtype))
    assert v[0] == np.inf


def test_clamp_is_explicit_and_counted():
    L = np.array([-30.0, -5.0, 0.0, 5.0, 30.0])
    assert klest.k3(log_ratio=L)[0] == pytest.approx(29.0)  # no clamp unless asked
    clamped = klest.k3(log_ratio=L, clamp=20.0)
    assert clamped[0] == pytest.approx(np.expm1(-20.0) + 20.0)
    r = klest.estimate(log_ratio=L, estimator="k3", clamp=20.0)
    assert r.n_clamped == 2
    r = klest.estimate(log_ratio=L, estimator="k3", clamp=(-4.0, 10.0))
    assert r.n_clamped == 3
    assert klest.estimate(log_ratio=L, estimator="k3").n_clamped == 0


@pytest.mark.parametrize("scale", [0.3, 5.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_chunked_kernels_match_the_generic_code(scale, dtype):
    """NumPy takes a chunked float64 kernel; array_api_strict runs the generic code. Same values,
    across chunk boundaries, with mostly-near-0 or mostly-far chunks and -inf entries."""
    xs = pytest.importorskip("array_api_strict")
    L = (scale * np.random.default_rng(9).standard_normal(3 * 2**14 + 5)).astype(dtype)
    L[[0, 7, 2**14]] = -np.inf
    L[[1, 2**14 + 1]] = 0.0
    for fn in (klest.k3, klest.forward_k3):
        got = fn(log_ratio=L)
        strict = np.asarray(fn(log_ratio=xs.asarray(L)))
        assert got.dtype == dtype
        np.testing.assert_array_equal(np.isinf(got), np.isinf(strict))
        finite = np.isfinite(strict)
        tol = 4 * np.finfo(dtype).eps
        np.testing.assert_allclose(got[finite], strict[finite], rtol=tol, atol=0)


def test_clamped_log_ratio_shows_what_a_clamp_does():
    L = np.array([-30.0, -5.0, 0.0, 5.0, 30.0])
    clipped, moved = klest.clamped_log_ratio(log_ratio=L, clamp=(-4.0, 10.0))
    np.testing.assert_array_equal(clipped, [-4.0, -4.0, 0.0, 5.0, 10.0])
    assert int(moved) == 3
    mask = np.array([False, True, True, True, True])
    assert int(klest.clamped_log_ratio(log_ratio=L, clamp=20, mask=mask)[1]) == 1
    np.testing.assert_array_equal(
        klest.k3(log_ratio=L, clamp=20), klest.k3(log_ratio=np.clip(L, -20, 20))
    )


@pytest.mark.parametrize(("kind", "ref"), [("expm1mx", ref_k3), ("lexpl_mexpm1", ref_forward_k3)])
def test_numpy_values_for_float32_data_keep_float32_precision(kind, ref):
    """The float32-origin NumPy form (closed form in float64, 2-term series only below 2^-20,
    found by one min over the values) is far within half a float32 ulp everywhere, including
    tiny |L| scattered among large ones and L = 0; L = -inf gives the limits (+inf, 1)."""
    from klest._numerics import F32_SERIES_RADIUS, numpy_values

    r = F32_SERIES_RADIUS
    tiny = [0.0, 1e-30, -1e-30, 1e-12, -3e-9, r * 0.999, -r * 0.999, r, -r, r * 1.001, 1e-6]
    L = np.concatenate([POINTS, tiny]).astype(np.float32).astype(np.float64)
    out = numpy_values(kind, L, np.empty(L.size), single=True)
    errs = ulp_error(out, [ref(float(x)) for x in L], np.float32)
    worst = int(np.argmax(errs))
    assert errs[worst] <= 0.05, f"{errs[worst]:.3f} float32 ulp at L = {L[worst]!r}"
    # the series is needed: the closed form alone is off by many float32 ulp at 1e-12
    closed = (
        np.expm1(1e-12) - 1e-12 if kind == "expm1mx" else 1e-12 * np.exp(1e-12) - np.expm1(1e-12)
    )
    assert ulp_error(np.array([closed]), [ref(1e-12)], np.float32)[0] > 100
    special = numpy_values(kind, np.array([-np.inf]), np.empty(1), single=True)
    assert special[0] == (np.inf if kind == "expm1mx" else 1.0)


@pytest.mark.parametrize("top", [1e-6, 1e-3, 0.1, 0.45, 0.9])
@pytest.mark.parametrize(
    ("fn", "ref"),
    [(klest.k3, ref_k3), (klest.forward_k3, ref_forward_k3)],
    ids=["k3", "forward_k3"],
)
def test_truncated_series_keeps_the_ulp_bound(fn, ref, top):
    """NumPy sums only as many series terms as the largest |L| of a chunk needs: chunks whose
    |L| stay below ``top`` (densest at ``top``, where the truncation bites) keep the bound."""
    rng = np.random.default_rng(int(top * 1e6))
    mags = top * np.concatenate([1 - np.geomspace(1e-6, 0.9, 200), rng.uniform(0, 1, 100)])
    L = np.concatenate([mags, -mags])
    errs = ulp_error(fn(log_ratio=L), [ref(float(x)) for x in L], np.float64)
    worst = int(np.argmax(errs))
    assert errs[worst] <= MAX_ULP, f"{errs[worst]:.1f} ulp at L = {L[worst]!r}"


@pytest.mark.parametrize(
    ("kind", "ref"), [("expm1mx", ref_k3), ("lexpl_mexpm1", ref_forward_k3)], ids=["k3", "fk3"]
)
def test_lab_radius_within_lab_rtol(kind, ref):
    """The lab's Monte Carlo values (series only on |L| < LAB_SERIES_RADIUS, the closed form
    elsewhere) are within LAB_RTOL relative of the 50-digit value: dense around the switch and
    down to 1e-8, where the closed form alone would be off by ~1e-8 relative; and the default
    radius keeps its few ulp on the same points."""
    from klest._numerics import LAB_RTOL, LAB_SERIES_RADIUS, numpy_values

    mags = np.concatenate(
        [MAGNITUDES, LAB_SERIES_RADIUS * np.linspace(0.9, 1.1, 201), np.logspace(-3, -1, 200)]
    )
    L = np.sort(np.concatenate([mags, -mags]))
    want = np.array([float(ref(float(x))) for x in L])
    got = numpy_values(kind, L, np.empty_like(L), radius=LAB_SERIES_RADIUS)
    rel = np.abs(got - want) / want
    worst = int(np.argmax(rel))
    assert rel[worst] <= LAB_RTOL, f"{rel[worst]:.2e} at L = {L[worst]!r}"
    # teeth: without the series below the radius, the small-|L| end fails the bound
    naive = numpy_values(kind, L, np.empty_like(L), radius=0.0)
    assert (np.abs(naive - want) / want).max() > 1e3 * LAB_RTOL
    full = numpy_values(kind, L, np.empty_like(L))
    assert ulp_error(full, [ref(float(x)) for x in L], np.float64).max() <= MAX_ULP
