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
    q = parse("mvnormal([0, 0])")
    p = parse("mvnormal([0.3, 0], [[1.2, 0], [0, 1]])")
    t = truth(q, p, "squared_hellinger", mc_samples=200_000)
    assert t.source == "monte carlo" and t.approximate
    assert t.stderr > 0
    # the exact value is a product over coordinates of the 1-D Bhattacharyya coefficients
    bc = math.sqrt(2 * math.sqrt(1.2) / 2.2) * math.exp(-(0.3**2) / (4 * 2.2))
    assert abs(t.value - (2 - 2 * bc)) < 4 * t.stderr


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


def test_exact_moments_detect_infinite_variance() -> None:
    q, p = parse("normal(0, 1)"), parse("student_t(3)")
    mean, var = exact_moments(q, p, "k3")  # type: ignore[misc]
    assert var == math.inf
    # p's mass beyond |x| ≈ 38, where q underflows, is lost: 1e-3 relative
    assert mean == pytest.approx(truth(q, p).value, rel=1e-3)
    _, var1 = exact_moments(q, p, "k1")  # type: ignore[misc]
    assert math.isfinite(var1)


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
