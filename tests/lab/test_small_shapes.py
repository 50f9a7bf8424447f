"""Small-shape gamma and beta pairs: L = log p - log q is O(1) while each log density is of size
1/a near 0, so L, the exact moments (quadrature) and the samples must never form it as the
difference of the two. Checked against mpmath (digamma/trigamma closed forms of the moments)."""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest

from klest import KlestError
from klest.lab import distributions as D
from klest.lab import ground_truth, parse, run
from klest.lab.truth import exact_mean_sd, exact_moments

pytest.importorskip("scipy")

SHAPES = [1e-3, 1e-6, 1e-15, 1e-30]


def _gamma_log_ratio_mp(aq: float, ap: float, bq: float, bp: float, t: float) -> mp.mpf:
    """log p(e^t) - log q(e^t) for two gamma laws, in mpmath."""

    def logpdf(a: float, b: float) -> mp.mpf:
        a, b = mp.mpf(a), mp.mpf(b)
        return a * mp.log(b) - mp.loggamma(a) + (a - 1) * t - b * mp.exp(t)

    return logpdf(ap, bp) - logpdf(aq, bq)


@pytest.mark.parametrize("t", [-1e30, -1e6, -3.0, 0.5, 2.0])
def test_gamma_log_ratio_at_matches_mpmath(t: float) -> None:
    with mp.workdps(80):
        pairs = [(1e-30, 2e-30, 1.0, 1.0), (1e-100, 3e-100, 1.0, 2.0), (1e-6, 3e-6, 2.0, 0.5)]
        for aq, ap, bq, bp in [*pairs, (0.5, 2.0, 1.0, 3.0)]:
            got = float(D.Gamma(aq, bq).log_ratio_at(D.Gamma(ap, bp), 0.0, 1.0, np.array([t]))[0])
            want = float(_gamma_log_ratio_mp(aq, ap, bq, bp, t))
            assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("a", SHAPES)
def test_gamma_small_shape_k1_k3_moments(a: float) -> None:
    """k1 = -L: mean KL(q‖p), variance (a_p - a_q)²ψ'(a_q); k3 = r - 1 - L: variance
    χ² - 2(KL(q‖p) + KL(p‖q)) + Var(L) (E_q[(r - 1)L] = E_p[L] - E_q[L]), with
    χ² = Γ(2a_p - a_q)Γ(a_q)/Γ(a_p)² - 1 (same rate)."""
    q, p = parse(f"gamma({a!r})"), parse(f"gamma({2 * a!r})")
    with mp.workdps(50):
        aq, ap = mp.mpf(a), 2 * mp.mpf(a)
        kl_qp = mp.loggamma(ap) - mp.loggamma(aq) - (ap - aq) * mp.digamma(aq)
        kl_pq = mp.loggamma(aq) - mp.loggamma(ap) - (aq - ap) * mp.digamma(ap)
        var_l = (ap - aq) ** 2 * mp.psi(1, aq)
        chi2 = mp.gamma(2 * ap - aq) * mp.gamma(aq) / mp.gamma(ap) ** 2 - 1
        var_k3 = chi2 - 2 * (kl_qp + kl_pq) + var_l
    assert ground_truth(q, p).value == pytest.approx(float(kl_qp), rel=1e-10)
    mean, var = exact_moments(q, p, "k1")  # type: ignore[misc]
    assert mean == pytest.approx(float(kl_qp), rel=1e-8)
    assert var == pytest.approx(float(var_l), rel=1e-8)
    mean, var = exact_moments(q, p, "k3")  # type: ignore[misc]
    assert mean == pytest.approx(float(kl_qp), rel=1e-8)
    assert var == pytest.approx(float(var_k3), rel=1e-7)


@pytest.mark.parametrize("a", [1e-6, 1e-30])
def test_beta_small_shape_k1_moments(a: float) -> None:
    """L = δa·log x + δb·log(1 - x) + c: its variance from trigammas, its mean from digammas."""
    aq, bq, ap, bp = a, 1.0, 2 * a, 3.0
    q, p = D.Beta(aq, bq), D.Beta(ap, bp)
    with mp.workdps(50):
        Aq, Bq, Ap, Bp = (mp.mpf(v) for v in (aq, bq, ap, bp))
        s = Aq + Bq
        da, db = Ap - Aq, Bp - Bq
        lbeta = lambda x, y: mp.loggamma(x) + mp.loggamma(y) - mp.loggamma(x + y)  # noqa: E731
        mean_l = (
            da * (mp.digamma(Aq) - mp.digamma(s))
            + db * (mp.digamma(Bq) - mp.digamma(s))
            + lbeta(Aq, Bq)
            - lbeta(Ap, Bp)
        )
        t1 = lambda x: mp.psi(1, x)  # noqa: E731
        var_l = da**2 * (t1(Aq) - t1(s)) + db**2 * (t1(Bq) - t1(s)) - 2 * da * db * t1(s)
    assert ground_truth(q, p).value == pytest.approx(float(-mean_l), rel=1e-10)
    mean, var = exact_moments(q, p, "k1")  # type: ignore[misc]
    assert mean == pytest.approx(float(-mean_l), rel=1e-8)
    assert var == pytest.approx(float(var_l), rel=1e-8)


@pytest.mark.parametrize("a", [1e-15, 1e-30])
def test_small_shape_samples_unbiased(a: float) -> None:
    """The measured mean of k1 is KL(q‖p) within 5 standard errors (fixed seed)."""
    q, p = D.Gamma(a), D.Gamma(2 * a)
    res = run(q, p, ["k1"], n=200_000, seed=3)["k1"]
    with mp.workdps(50):
        aq = mp.mpf(a)
        kl = float(mp.loggamma(2 * aq) - mp.loggamma(aq) - aq * mp.digamma(aq))
    assert res.std == pytest.approx(1.0, rel=0.02)  # sd of L: a·√ψ'(a) -> 1
    assert abs(res.mean - kl) < 5 * res.stderr
    qb, pb = D.Beta(a, 1.0), D.Beta(2 * a, 1.0)
    res = run(qb, pb, ["k1"], n=200_000, seed=3)["k1"]
    # as a -> 0, Beta(a, 1) and Gamma(a, 1) share the law of a·log x: the same KL, to O(a)
    assert abs(res.mean - kl) < 5 * res.stderr
    assert math.isfinite(res.std)


def test_mixture_of_small_shape_gammas() -> None:
    """A mixture's L from the components' densities in t (no 1/a terms): KL of a one-component
    mixture equals the component's."""
    a = 1e-20
    q = D.Mixture((0.5, 0.5), (D.Gamma(a), D.Gamma(a)))
    p = D.Gamma(2 * a)
    with mp.workdps(50):
        aq = mp.mpf(a)
        kl = float(mp.loggamma(2 * aq) - mp.loggamma(aq) - aq * mp.digamma(aq))
    mean, _ = exact_moments(q, p, "k1")  # type: ignore[misc]
    assert mean == pytest.approx(kl, rel=1e-8)


# ------------------------------------------------------------------ values beyond float64
def test_poisson_k3_stdev_exact_far_beyond_the_bulk() -> None:
    """q = Poisson(1), p = Poisson(30): q·r² peaks near x = 900, where √q underflows; Var(k3) =
    χ² - 2(KL(q‖p) + KL(p‖q)) + Var(L), χ² = e^(λp²/λq - 2λp + λq) - 1, Var(L) = λq log²(λp/λq)."""
    lq, lp = 1.0, 30.0
    with mp.workdps(50):
        u = mp.mpf(lp) / lq
        kl_qp = lq * (u - 1 - mp.log(u))
        kl_pq = lp * (1 / u - 1 + mp.log(u))
        chi2 = mp.exp(mp.mpf(lp) ** 2 / lq - 2 * lp + lq) - 1
        sd = mp.sqrt(chi2 - 2 * (kl_qp + kl_pq) + lq * mp.log(u) ** 2)
    mean, got = exact_mean_sd("poisson(1)", "poisson(30)", "k3")  # type: ignore[misc]
    assert mean == pytest.approx(float(kl_qp), rel=1e-12)
    assert got == pytest.approx(float(sd), rel=1e-9)  # about 4.2e182: its square overflows
    # e^4896: finite, beyond float64: refused, never +inf (that would claim a divergence)
    with pytest.raises(KlestError, match="beyond float64"):
        exact_mean_sd("poisson(1)", "poisson(100)", "k3")


def test_normal_tiny_scale_exact_stdev_does_not_overflow() -> None:
    """p = N(0, σ²), q = N(0, 1): k1 = -L = x²(1/σ² - 1)/2 + log σ, sd = (1/σ² - 1)/√2."""
    s = 1e-80
    mean, sd = exact_mean_sd("normal(0, 1)", f"normal(0, {s!r})", "k1")  # type: ignore[misc]
    assert sd == pytest.approx((1 / s**2 - 1) / math.sqrt(2), rel=1e-9)
    assert mean == pytest.approx(0.5 / s**2, rel=1e-9)
    _, sd_opt = exact_mean_sd("normal(0, 1)", f"normal(0, {s!r})", "k_opt")  # type: ignore[misc]
    assert sd_opt == pytest.approx(sd, rel=1e-9)  # Var(r) is huge: λ* -> 0, k_opt -> k1


# ------------------------------------------------------------------ module layout
def test_truth_is_the_module_and_ground_truth_the_function() -> None:
    import types

    import klest.lab

    assert isinstance(klest.lab.truth, types.ModuleType)
    assert klest.lab.truth.register_truth is klest.lab.register_truth
    assert klest.lab.ground_truth is klest.lab.truth.ground_truth
    assert klest.lab.ground_truth("normal(0, 1)", "normal(1, 1)").value == 0.5


def test_distributions_never_import_specs() -> None:
    """Specs parse, distributions build: the import goes one way."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(D))
    names = [
        (n.module or "") + "." + a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom)
        for a in n.names
    ]
    assert not [m for m in names if "specs" in m or m.endswith(".parse")], names
