"""Edge cases found in review: overflow, backends through estimate(), masked clamps, validation."""

from __future__ import annotations

import math
import subprocess
import sys

import mpmath
import numpy as np
import pytest

import klest


def test_estimate_keeps_jax_arrays_and_traces():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    lq, lp = jnp.zeros(4), jnp.asarray([0.1, 0.2, -0.1, 0.3])
    r = klest.estimate(lq, lp)
    assert isinstance(r.mean, jax.Array)
    jitted = jax.jit(lambda a, b: klest.estimate(a, b).mean)(lq, lp)
    assert float(jitted) == pytest.approx(float(np.mean(klest.k3(np.zeros(4), np.asarray(lp)))))
    grad = jax.grad(lambda a: klest.estimate(a, lp).mean)(lq)
    np.testing.assert_allclose(np.asarray(grad), -np.expm1(np.asarray(lp)) / 4, rtol=1e-12)


def test_jax_default_float32_mode_warns_nothing():
    pytest.importorskip("jax")
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "import jax.numpy as jnp, klest\n"
        "v = klest.k3(jnp.zeros(3), jnp.ones(3), clamp=0.5)\n"
        "r = klest.estimate(jnp.zeros(3), jnp.ones(3), 'k3', mask=jnp.asarray([1, 0, 1]))\n"
        "print(v.dtype, r.mean.dtype)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["float32", "float32"]


@pytest.mark.parametrize(("dtype", "big"), [(np.float32, 89.0), (np.float64, 710.0)])
def test_overflow_gives_inf_not_nan(dtype, big):
    L = np.array([big, -big], dtype=dtype)
    with np.errstate(over="ignore"):
        for fn in (klest.k3, klest.forward_k3, klest.forward_k1):
            v = fn(log_ratio=L)
            assert v[0] == np.inf, fn.__name__
            assert np.isfinite(v[1]), fn.__name__
        for name in (*klest.divergence_names(), "alpha:2", "alpha:0.5", "alpha:-1", "alpha:3"):
            v = klest.fdiv(log_ratio=L, divergence=name)
            assert not np.isnan(v).any(), name
            assert v[0] > 0 and v[1] > 0, name


def test_jensen_shannon_far_from_one_matches_mpmath():
    L = np.array([-700.0, -100.0, -30.0, -3.5, -2.9, 2.9, 3.5, 30.0, 100.0, 700.0])
    got = klest.fdiv(log_ratio=L, divergence="jensen_shannon")
    for x, g in zip(L, got, strict=True):
        t = mpmath.exp(mpmath.mpf(float(x)))
        want = (t * mpmath.log(t) - (1 + t) * mpmath.log((1 + t) / 2)) / 2
        assert float(abs(g - want)) <= 1e-13 * float(abs(want)), x


def test_alpha_divergence_keeps_values_that_fit_the_dtype():
    # α = 2 at float32 L = 44.3: (e^{88.6} - 2e^{44.3} + 1)/2 ≈ 1.6e38 < float32 max
    L = np.array([44.3], dtype=np.float32)
    got = klest.fdiv(log_ratio=L, divergence="alpha:2")
    want = float((mpmath.exp(2 * mpmath.mpf(float(L[0]))) - 2 * mpmath.exp(float(L[0])) + 1) / 2)
    # e^{88.6} from a float32 exponent: relative error ~ 88.6 · 2^-24 is inherent to the dtype
    assert got[0] == pytest.approx(want, rel=2e-5)
    L64 = np.array([-800.0, -50.0, 50.0, 300.0])
    for alpha in (2.0, 0.5, -1.0, 3.0):
        with np.errstate(over="ignore"):  # a value beyond float64 is +inf, with numpy's warning
            got = klest.fdiv(log_ratio=L64, divergence=f"alpha:{alpha}")
        a = mpmath.mpf(alpha)
        for x, g in zip(L64, got, strict=True):
            t = mpmath.exp(mpmath.mpf(float(x)))
            want = (t**a - a * t - (1 - a)) / (a * (a - 1))
            if want > 1e300:
                assert g == np.inf
            else:
                assert float(abs(g - want)) <= 1e-12 * float(abs(want)), (alpha, x)


def test_plain_forms_do_not_cancel():
    L = np.array([-300.0, -1e-9, 1e-9, 300.0])
    np.testing.assert_allclose(
        klest.fdiv(log_ratio=L, divergence="reverse_kl", control_variate=False), -L
    )
    np.testing.assert_allclose(
        klest.fdiv(log_ratio=L, divergence="forward_kl", control_variate=False),
        klest.forward_k1(log_ratio=L),
    )


def test_estimate_mean_stays_finite_when_only_the_spread_overflows():
    L = np.array([200.0, 0.0])
    with np.errstate(over="ignore"):
        r = klest.estimate(log_ratio=L, estimator="chi2")
        by_axis = klest.estimate(log_ratio=L, estimator="chi2", axis=0)
    assert r.mean == pytest.approx(np.expm1(200.0) ** 2 / 2)
    assert r.std == np.inf
    assert float(by_axis.mean) == pytest.approx(float(r.mean))


@pytest.mark.parametrize("estimator", ["total_variation", "chi2", "jensen_shannon", "forward_k3"])
def test_estimate_rejects_bad_input_that_the_estimator_would_hide(estimator):
    with pytest.raises(klest.KlestError, match="logq"):
        klest.estimate(np.array([np.inf, 0.0]), np.zeros(2), estimator)


def test_estimate_rejects_bad_input_hidden_by_a_clamp_or_a_kept_entry():
    with pytest.raises(klest.KlestError, match="logq"):
        klest.estimate(np.array([-np.inf, 0.0]), np.zeros(2), "k3", clamp=20)
    # a NaN that the mask keeps is bad input; one it masks out is not data (the mask rule below)
    with pytest.raises(klest.KlestError, match="logq"):
        klest.estimate(np.array([np.nan, 0.0]), np.zeros(2), "k3", mask=np.array([True, True]))


def test_estimate_refuses_both_input_forms():
    with pytest.raises(klest.KlestError, match="not both"):
        klest.estimate(np.zeros(2), np.zeros(2), log_ratio=np.zeros(2))


def test_clamp_counts_only_kept_elements():
    L = np.array([100.0, 0.0, -100.0])
    m = np.array([False, True, True])
    assert klest.estimate(log_ratio=L, estimator="k3", mask=m, clamp=20).n_clamped == 1
    r = klest.estimate(log_ratio=L[None], estimator="k3", mask=m[None], clamp=20, axis=1)
    assert int(r.n_clamped) == 1


def test_k_lambda_at_one_is_k3_and_does_not_cancel():
    L = np.array([1e-6, -1e-6, 1e-3], dtype=np.float32)
    np.testing.assert_array_equal(klest.k_lambda(log_ratio=L, lam=1.0), klest.k3(log_ratio=L))
    lam = 0.75
    got = klest.k_lambda(log_ratio=L.astype(np.float64), lam=lam)
    for x, g in zip(L, got, strict=True):
        want = lam * mpmath.expm1(mpmath.mpf(float(x))) - mpmath.mpf(float(x))
        assert float(abs(g - want)) <= 1e-15 * float(abs(want))


def test_optimal_control_variate_needs_its_name_in_estimate():
    with pytest.raises(klest.KlestError, match="k_opt"):
        klest.estimate(log_ratio=np.zeros(3), estimator=klest.k_opt)


def test_masks_must_be_zero_or_one():
    with pytest.raises(klest.KlestError, match="0 and 1"):
        klest.estimate(log_ratio=np.zeros(3), mask=np.array([0.5, 1.0, 0.0]))
    with pytest.raises(klest.KlestError, match="0 and 1"):
        klest.estimate(log_ratio=np.zeros((1, 3)), mask=np.array([[0.5, 1.0, 0.0]]), axis=1)


def test_empty_selection_gives_nan_mean_and_zero_count():
    r = klest.estimate(log_ratio=np.zeros(3), mask=np.zeros(3, dtype=bool))
    assert r.n == 0 and math.isnan(r.mean)


@pytest.mark.parametrize("axis", [None, 0])
def test_infinite_and_nan_means_have_matching_spreads(axis):
    r = klest.estimate(log_ratio=np.array([-np.inf, 0.0, 1.0]), axis=axis)
    assert float(r.mean) == np.inf and float(r.std) == np.inf
    with klest.options(validate=False):
        r = klest.estimate(log_ratio=np.array([np.nan, 0.0, 1.0]), axis=axis)
    assert math.isnan(float(r.mean)) and math.isnan(float(r.std))


# ------------------------------------------- the mask rule: masked-out entries are ignored
def test_masked_out_entries_may_hold_nan_and_infinities():
    """One rule in the core and in klest.rl: whatever a masked-out entry holds (NaN, ±inf in
    log q, +inf in log p: padding often holds garbage) is ignored; kept entries are checked."""
    torch = pytest.importorskip("torch")
    lq = np.array([-1.0, np.nan, -0.5, -np.inf, -2.0, -1.5])
    lp = np.array([-1.2, 0.0, np.nan, -1.0, -1.7, np.inf])
    mask = np.array([1, 0, 0, 0, 1, 0])
    kept = mask.astype(bool)
    for xp_lq, xp_lp, xp_mask in (
        (lq, lp, mask),
        (torch.tensor(lq), torch.tensor(lp), torch.tensor(mask)),
    ):
        v, lam = klest.k_opt(xp_lq, xp_lp, mask=xp_mask, return_lambda=True)
        ref_v, ref_lam = klest.k_opt(lq[kept], lp[kept], return_lambda=True)
        np.testing.assert_allclose(np.asarray(v)[kept], ref_v, rtol=1e-12)
        assert float(lam) == pytest.approx(float(ref_lam), rel=1e-12)
        assert float(klest.optimal_lambda(xp_lq, xp_lp, mask=xp_mask)) == pytest.approx(
            float(ref_lam), rel=1e-12
        )
        _, moved = klest.clamped_log_ratio(xp_lq, xp_lp, clamp=0.25, mask=xp_mask)
        assert int(moved) == 1  # only kept entries count: -1.7 - (-2.0) = 0.3 > 0.25
    t = torch.tensor(lq, requires_grad=True)
    v = klest.k_opt(t, torch.tensor(lp), mask=torch.tensor(kept))
    torch.where(torch.tensor(kept), v, 0.0).sum().backward()
    assert torch.isfinite(t.grad[torch.tensor(kept)]).all()
    # estimate follows the same rule on every path: equal to the estimate of the kept subset
    for name in ("k3", "k_opt", "fdiv:chi2"):
        ref = klest.estimate(lq[kept], lp[kept], name)
        for xp_lq, xp_lp, xp_mask in (
            (lq, lp, mask),
            (torch.tensor(lq), torch.tensor(lp), torch.tensor(mask)),
        ):
            r = klest.estimate(xp_lq, xp_lp, name, mask=xp_mask)
            assert int(r.n) == 2
            assert float(r.mean) == pytest.approx(float(ref.mean), rel=1e-12)
        rows = klest.estimate(
            np.stack([lq, lq]), np.stack([lp, lp]), name, mask=np.stack([mask, mask]), axis=1
        )
        np.testing.assert_allclose(rows.mean, [float(ref.mean)] * 2, rtol=1e-12)
    # the same entries, kept, are bad input
    with pytest.raises(klest.KlestError, match="NaN"):
        klest.estimate(lq, lp, "k3", mask=np.array([1, 1, 0, 0, 1, 0]))
    with pytest.raises(klest.KlestError, match="NaN"):
        klest.k_opt(lq, lp, mask=np.array([1, 1, 0, 0, 1, 0]))
    with pytest.raises(klest.KlestError, match="inf"):
        klest.optimal_lambda(lq, lp, mask=np.array([1, 0, 0, 1, 1, 0]))
