"""Ground truth: closed forms (Gaussian shift and others), torch's KL registry, quadrature,
exact sums, the labelled Monte Carlo fallback, and support mismatches."""

from __future__ import annotations

import math

import numpy as np
import pytest

import klest
from klest import KlestError
from klest.lab import distributions as D
from klest.lab import parse
from klest.lab.truth import exact_moments, truth

torch = pytest.importorskip("torch")
stats = pytest.importorskip("scipy.stats")

DIVERGENCES = [
    "reverse_kl",
    "forward_kl",
    "chi2",
    "squared_hellinger",
    "jensen_shannon",
    "total_variation",
    "log_squared",
    "alpha:0.5",
    "alpha:2",
    "alpha:-0.5",
]


@pytest.mark.parametrize("mu", [0.1, 1.0, 2.5])
def test_normal_shift_closed_forms(mu: float) -> None:
    q, p = D.Normal(0, 1), D.Normal(mu, 1)
    m2 = mu * mu
    cases = {
        "reverse_kl": m2 / 2,
        "forward_kl": m2 / 2,
        "chi2": math.expm1(m2),
        "squared_hellinger": 2 * (1 - math.exp(-m2 / 8)),
        "log_squared": m2 / 2 * (1 + m2 / 4),  # E[k2] = KL (1 + μ²/4)
        "alpha:0.5": (math.exp(0.5 * -0.5 * m2 / 2) - 1) / (0.5 * -0.5),
        "alpha:3": (math.exp(3 * 2 * m2 / 2) - 1) / 6,
    }
    for div, expected in cases.items():
        t = truth(q, p, div)
        assert t.source == "closed form", div
        assert t.value == pytest.approx(expected, rel=1e-12), div


def test_direction_on_an_asymmetric_pair() -> None:
    q, p = parse("normal(0, 1)"), parse("normal(0, 2)")
    assert truth(q, p, "reverse_kl").value == pytest.approx(math.log(2) + 1 / 8 - 1 / 2)
    assert truth(q, p, "forward_kl").value == pytest.approx(-math.log(2) + 2 - 1 / 2)


TORCH_PAIRS = [
    (
        "normal(0.3, 1.5)",
        "normal(-1, 0.7)",
        lambda: (torch.distributions.Normal(0.3, 1.5), torch.distributions.Normal(-1.0, 0.7)),
    ),
    (
        "exponential(2)",
        "exponential(0.5)",
        lambda: (torch.distributions.Exponential(2.0), torch.distributions.Exponential(0.5)),
    ),
    (
        "gamma(2, 3)",
        "gamma(1.5, 0.5)",
        lambda: (torch.distributions.Gamma(2.0, 3.0), torch.distributions.Gamma(1.5, 0.5)),
    ),
    (
        "beta(2, 5)",
        "beta(0.8, 1.2)",
        lambda: (torch.distributions.Beta(2.0, 5.0), torch.distributions.Beta(0.8, 1.2)),
    ),
    (
        "laplace(0.5, 1)",
        "laplace(-0.5, 2)",
        lambda: (torch.distributions.Laplace(0.5, 1.0), torch.distributions.Laplace(-0.5, 2.0)),
    ),
    (
        "poisson(3)",
        "poisson(4.5)",
        lambda: (torch.distributions.Poisson(3.0), torch.distributions.Poisson(4.5)),
    ),
    (
        "uniform(0, 1)",
        "uniform(-1, 2)",
        lambda: (torch.distributions.Uniform(0.0, 1.0), torch.distributions.Uniform(-1.0, 2.0)),
    ),
    (
        "mvnormal([0, 0], [[1, 0.2], [0.2, 2]])",
        "mvnormal([1, -1], [[2, -0.3], [-0.3, 1]])",
        lambda: (
            torch.distributions.MultivariateNormal(
                torch.zeros(2, dtype=torch.float64),
                torch.tensor([[1, 0.2], [0.2, 2]], dtype=torch.float64),
            ),
            torch.distributions.MultivariateNormal(
                torch.tensor([1.0, -1.0], dtype=torch.float64),
                torch.tensor([[2, -0.3], [-0.3, 1]], dtype=torch.float64),
            ),
        ),
    ),
]


@pytest.mark.parametrize(
    ("qs", "ps", "make"), TORCH_PAIRS, ids=[t[0].split("(")[0] for t in TORCH_PAIRS]
)
def test_closed_forms_agree_with_torch_registry(qs: str, ps: str, make: object) -> None:
    tq, tp = make()  # type: ignore[operator]
    q, p = parse(qs), parse(ps)
    ours = truth(q, p, "reverse_kl")
    assert ours.source == "closed form"
    ref = float(torch.distributions.kl_divergence(tq, tp))
    assert ours.value == pytest.approx(ref, rel=1e-5)
    if qs.startswith("uniform"):
        with pytest.raises(KlestError, match="support mismatch"):
            truth(q, p, "forward_kl")  # it counts p's mass outside q, invisible to q's samples
        return
    fwd = truth(q, p, "forward_kl")
    assert fwd.value == pytest.approx(float(torch.distributions.kl_divergence(tp, tq)), rel=1e-5)
    # and through the torch objects themselves: the registry is the source
    via = truth(tq, tp, "reverse_kl")
    assert via.source == "torch registry"
    assert via.value == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("div", DIVERGENCES)
def test_quadrature_matches_closed_form(div: str) -> None:
    # scipy twins of two normals have no closed-form registration: quadrature is used
    q = D.ScipyDistribution(stats.norm(0, 1))
    p = D.ScipyDistribution(stats.norm(0.7, 1.2))
    t = truth(q, p, div)
    assert t.source == "quadrature"
    ref = truth(D.Normal(0, 1), D.Normal(0.7, 1.2), div)
    if ref.source == "closed form":
        assert t.value == pytest.approx(ref.value, rel=1e-8)
    else:  # JS and TV: no closed form; compare with a direct scipy quadrature
        from scipy import integrate

        f = klest.get_divergence(div).f
        direct, _ = integrate.quad(
            lambda x: stats.norm.pdf(x) * f(stats.norm.pdf(x, 0.7, 1.2) / stats.norm.pdf(x)),
            -30,
            30,
            limit=400,
        )
        assert t.value == pytest.approx(direct, rel=1e-7)


@pytest.mark.parametrize("div", DIVERGENCES)
def test_exact_sum_on_categoricals(div: str) -> None:
    qp = np.array([0.1, 0.2, 0.3, 0.4])
    pp = np.array([0.25, 0.25, 0.4, 0.1])
    t = truth(D.Categorical(tuple(qp)), D.Categorical(tuple(pp)), div)
    assert t.source == "exact sum"
    f = klest.get_divergence(div).f
    assert t.value == pytest.approx(
        sum(a * f(b / a) for a, b in zip(qp, pp, strict=True)), rel=1e-12
    )


def test_exact_sum_poisson_matches_closed_form() -> None:
    q, p = D.Poisson(3.0), D.Poisson(4.5)
    t = truth(q, p, "chi2")
    assert t.source == "exact sum"
    assert t.value == pytest.approx(math.expm1((4.5 - 3.0) ** 2 / 3.0), rel=1e-10)


def test_monte_carlo_fallback_is_labelled_with_error_bar() -> None:
    # the exact value is a product over coordinates of the 1-D Bhattacharyya coefficients
    bc = math.sqrt(2 * math.sqrt(1.2) / 2.2) * math.exp(-(0.3**2) / (4 * 2.2))
    # two lab multivariate normals: the closed form
    q = parse("mvnormal([0, 0])")
    p = parse("mvnormal([0.3, 0], [[1.2, 0], [0, 1]])")
    t = truth(q, p, "squared_hellinger")
    assert t.source == "closed form"
    assert t.value == pytest.approx(2 - 2 * bc, rel=1e-12)
    # torch Independent normals (no closed form, no quadrature in 2-D): Monte Carlo, labelled;
    # a pure shift by 0.3 has Bhattacharyya coefficient e^{-0.3²/8}
    td, f64 = torch.distributions, torch.float64
    tq = td.Independent(td.Normal(torch.zeros(2, dtype=f64), torch.ones(2, dtype=f64)), 1)
    tp = td.Independent(td.Normal(torch.tensor([0.3, 0.0], dtype=f64), torch.ones(2, dtype=f64)), 1)
    t = truth(tq, tp, "squared_hellinger", mc_samples=200_000)
    assert t.source == "monte carlo" and t.approximate
    assert t.stderr > 0
    assert abs(t.value - (2 - 2 * math.exp(-(0.3**2) / 8))) < 4 * t.stderr


def test_torch_continuous_pairs_without_a_registry_entry() -> None:
    td = torch.distributions
    f64 = torch.float64
    q = td.Normal(torch.tensor(0.0, dtype=f64), torch.tensor(1.0, dtype=f64))
    p = td.StudentT(torch.tensor(3.0, dtype=f64))
    # torch has no KL(Normal‖StudentT): quadrature with torch's log_prob, break points from icdf
    # (Normal) or a bracket from loc/scale (StudentT has no icdf)
    for div in ("reverse_kl", "total_variation"):
        t = truth(q, p, div)
        assert t.source == "quadrature", div
        ref = truth(parse("normal(0, 1)"), parse("student_t(3)"), div)
        assert t.value == pytest.approx(ref.value, rel=1e-9), div
    # torch Normal/Normal: the lab's closed forms for divergences torch has no registry entry for
    qn, pn = td.Normal(0.0, 1.0), td.Normal(1.0, 1.0)
    for div in ("chi2", "squared_hellinger", "alpha:0.5"):
        t = truth(qn, pn, div)
        assert t.source == "closed form", div
        assert t.value == truth(D.Normal(0, 1), D.Normal(1, 1), div).value
    # Monte Carlo: k3 is dominated by single samples (r unbounded against a Student-t), so the
    # fallback uses k1; the exact value is the sum of two one-dimensional KLs
    mq = td.MultivariateNormal(torch.zeros(2, dtype=f64), torch.eye(2, dtype=f64))
    mp = td.Independent(td.StudentT(torch.tensor([3.0, 3.0], dtype=f64)), 1)
    t = truth(mq, mp, mc_samples=200_000)
    assert t.source == "monte carlo"
    exact = 2 * truth(parse("normal(0, 1)"), parse("student_t(3)")).value
    assert abs(t.value - exact) < 4 * t.stderr


def test_support_mismatch() -> None:
    t = truth(parse("normal(0, 1)"), parse("exponential(1)"), "reverse_kl")
    assert t.value == math.inf and t.source == "support mismatch"
    with pytest.raises(KlestError, match="support mismatch"):
        truth(parse("exponential(1)"), parse("normal(0, 1)"), "forward_kl")
    # the reverse KL does not count p's mass outside q's support (f*(0) = 0)
    t = truth(parse("exponential(1)"), parse("normal(0, 1)"), "reverse_kl")
    assert t.source == "quadrature"
    assert t.value == pytest.approx(-1 + 0.5 * math.log(2 * math.pi) + 1.0, rel=1e-8)
    with pytest.raises(KlestError, match="support mismatch"):
        truth(parse("categorical([0.5, 0.5, 0])"), parse("categorical([0.2, 0.3, 0.5])"), "chi2")
    # the reverse KL gives p's extra mass weight f*(0) = 0: still the whole divergence
    t = truth(parse("categorical([0.5, 0.5, 0])"), parse("categorical([0.2, 0.3, 0.5])"))
    assert t.value == pytest.approx(0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.3))
    # f(0) finite: p = 0 on part of q's support is fine for the forward KL
    t = truth(parse("uniform(0, 2)"), parse("uniform(0, 1)"), "forward_kl")
    assert t.value == pytest.approx(math.log(2))


def test_mass_in_the_gap_of_a_mixture() -> None:
    # q has no mass on (1, 2); the hull [0, 3] hides the gap, the interval union does not
    gap = parse("mixture([0.5, 0.5], [uniform(0, 1), uniform(2, 3)])")
    assert gap.support_intervals() == [(0.0, 1.0), (2.0, 3.0)]
    assert parse("mixture([0.5, 0.5], [uniform(0, 1), uniform(1, 2)])").support_intervals() == [
        (0.0, 2.0)
    ]
    flat = parse("uniform(0, 3)")
    for div in ("forward_kl", "chi2", "alpha:2"):  # f*(0) = inf: p's mass in the gap is unseen
        with pytest.raises(KlestError, match="support mismatch"):
            truth(gap, flat, div)
    # finite f*(0): the gap's mass 1/3 counts f*(0)·1/3 on top of E_q[f(r)]
    assert truth(gap, flat, "total_variation").value == pytest.approx(1 / 3, rel=1e-9)
    h = 2 * (math.sqrt(1 / 3) - math.sqrt(1 / 2)) ** 2 + 1 / 3
    assert truth(gap, flat, "squared_hellinger").value == pytest.approx(h, rel=1e-9)
    assert truth(gap, flat, "reverse_kl").value == pytest.approx(math.log(1.5), rel=1e-9)
    # the other way round q has mass where p has none: +inf reverse KL, labelled as such
    t = truth(flat, gap, "reverse_kl")
    assert t.value == math.inf and t.source == "support mismatch"
    assert truth(flat, gap, "total_variation").value == pytest.approx(1 / 3, rel=1e-9)
    # a discrete gap: p's mass 0.5 at a point where q has none, TV = 0.5
    t = truth(
        parse("categorical([0.5, 0, 0.5])"),
        parse("categorical([0.25, 0.5, 0.25])"),
        "total_variation",
    )
    assert t.value == pytest.approx(0.5, rel=1e-12)


def test_exact_moments_detect_infinite_variance() -> None:
    q, p = parse("normal(0, 1)"), parse("student_t(3)")
    mean, var = exact_moments(q, p, "k3")  # type: ignore[misc]
    assert var == math.inf
    # p's mass beyond |x| ≈ 38, where q underflows, is lost: 1e-3 relative
    assert mean == pytest.approx(truth(q, p).value, rel=1e-3)
    _, var1 = exact_moments(q, p, "k1")  # type: ignore[misc]
    assert math.isfinite(var1)


def test_exact_sum_far_from_zero() -> None:
    # the bulk of Poisson(990000) ends past 10⁶ and q·r² peaks beyond it: the sum must go on
    t = truth(D.Poisson(990_000.0), D.Poisson(1e6), "chi2")
    assert t.value == pytest.approx(math.expm1(1e4**2 / 990_000), rel=1e-8)


def test_heavy_p_beyond_where_q_underflows() -> None:
    # N(0, 1)'s density underflows beyond |x| ≈ 38 while a Student-t(3) still has mass there:
    # q·f(r) → f*(0)·p (TV) or p·log r (forward KL) must be kept, not dropped with q
    q, p = parse("normal(0, 1)"), parse("student_t(3)")
    from scipy import integrate

    tp, tq = stats.t(3), stats.norm()
    tv = 0.5 * integrate.quad(lambda x: abs(tp.pdf(x) - tq.pdf(x)), -np.inf, np.inf, limit=500)[0]
    assert truth(q, p, "total_variation").value == pytest.approx(tv, rel=1e-8)
    # KL(p‖q) sampled from q is KL(q'‖p') with the roles swapped
    fwd = truth(q, p, "forward_kl").value
    assert fwd == pytest.approx(truth(p, q, "reverse_kl").value, rel=1e-9)
    # E_q[r] = 1: k3's exact mean is the KL itself, not 1 - (p's mass where q underflows)
    mean, _ = exact_moments(q, p, "k3")  # type: ignore[misc]
    assert mean == pytest.approx(truth(q, p).value, rel=1e-12)


def test_slowly_decaying_but_finite_variance() -> None:
    # q = N(0, 1), p = N(0, 1.4): q·r² ∝ e^{-0.01x²} decays slowly (still 1e-6 at x = 37) but
    # Var(k3) is finite; r = e^{a x²}/s with a = (1 - 1/s²)/2 gives it in closed form
    s = 1.4
    a, ls = (1 - 1 / s**2) / 2, math.log(s)
    er2 = 1 / s**2 / math.sqrt(1 - 4 * a)
    var = (er2 - 1) - 2 * a * (s * s - 1) + 2 * a * a  # Var(r) - 2 Cov(r, L) + Var(L)
    kl = ls + 1 / (2 * s * s) - 0.5
    mean, v = exact_moments("normal(0, 1)", f"normal(0, {s})", "k3")  # type: ignore[misc]
    assert mean == pytest.approx(kl, rel=1e-9)
    assert v == pytest.approx(var, rel=1e-7)
    assert math.sqrt(v) / kl == pytest.approx(16.2749, rel=1e-5)
    # at σp² = 2σq² E_q[r²] diverges, and against a Student-t the tails are polynomial
    for p in ("normal(0, 1.4143)", "student_t(3)", "student_t(30)"):
        assert exact_moments("normal(0, 1)", p, "k3")[1] == math.inf, p  # type: ignore[index]
    assert math.isfinite(exact_moments("normal(0, 1)", "student_t(3)", "k1")[1])  # type: ignore[index]


def test_exact_moments_normal_shift_match_closed_forms() -> None:
    from klest.lab.experiments import normal_shift_expected

    q, p = D.Normal(0, 1), D.Normal(1, 1)
    for est in ("k1", "k2", "k3", "forward_k3", "k_opt"):
        mean, var = exact_moments(q, p, est)  # type: ignore[misc]
        bias, sd = normal_shift_expected(1.0, est)
        assert (mean - 0.5) / 0.5 == pytest.approx(bias, abs=1e-9), est
        assert math.sqrt(var) / 0.5 == pytest.approx(sd, rel=1e-7), est


def test_infinite_variance_at_a_finite_end_of_the_support() -> None:
    # q = Beta(2, 3), p = Uniform(0, 1): r = 1/q(x) ~ 1/(12x) near 0, E_q[r²] = ∫ dx/q = ∞
    _, var = exact_moments("beta(2, 3)", "uniform(0, 1)", "k3")  # type: ignore[misc]
    assert var == math.inf
    # the other way round r = q_beta/1 is bounded: finite
    _, var = exact_moments("uniform(0, 1)", "beta(2, 2)", "k3")  # type: ignore[misc]
    assert math.isfinite(var)
    # p vanishes at the end points of q's support: a measure-zero set, the KL is finite
    t = truth(parse("uniform(0, 1)"), parse("beta(2, 2)"))
    assert t.value == pytest.approx(2 - math.log(6), rel=1e-9)
