r"""Ground truth D_f(p, q) = E_{x~q}[f(p(x)/q(x))] for a pair of distributions, with its source.

:func:`ground_truth` (also importable from here as ``truth``) tries, in order:

1. ``"torch registry"``: ``torch.distributions.kl_divergence`` when both are torch distributions
   (reverse and forward KL);
2. ``"closed form"``: the registry filled by :func:`register_truth` (most-specific dispatch on the
   two distribution types, as torch's ``register_kl``; the forward KL of (q, p) is looked up as
   the reverse KL of (p, q));
3. ``"exact sum"``: Σ_x q(x) f(p(x)/q(x)) over the support of a discrete q (for an unbounded
   support, the points carrying all but 1e-17 of q's mass);
4. ``"quadrature"``: adaptive Gauss-Kronrod (``scipy.integrate.quad``) of the tangent-corrected
   q·(f(r) - f'(1)(r - 1)) >= 0 over the support of a univariate continuous q, in log space,
   with the far tails and the neighbourhood of a finite end in t = log(distance) and their
   convergence decided from the integrand's decay (see :func:`_integral`): +inf with the
   reason in ``Truth.note`` where it diverges, :class:`klest.KlestError` where undecidable;
5. ``"monte carlo"``: the last resort, a high-sample estimate with the tangent-corrected estimator,
   labelled approximate and carrying its standard error.

A divergence is never negative (rounding below -1e-12 is an error) and never NaN.

A pair whose truth is +inf (p = 0 on part of q's support for the reverse KL) comes back as
``value = inf`` with source ``"support mismatch"``. Mass m that p puts where q has none counts
f*(0)·m in D_f, with f*(0) = lim f(t)/t: where f*(0) = +inf (forward KL, χ², α > 1) that raises
:class:`klest.KlestError`, since no estimator that samples q can see it; where it is finite
(TV 1/2, Hellinger 1, JS log 2 / 2, α < 1) it is added to the value, and estimators that sample q
show the bias it causes. Supports are compared as unions of intervals: the gap between two
mixture components is not support.

>>> from klest.lab import parse
>>> t = ground_truth(parse("normal(0, 1)"), parse("normal(1, 1)"))
>>> t.value, t.source
(0.5, 'closed form')
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import klest
from klest import FDivergence, KlestError
from klest._numerics import expm1mx
from klest.table import check_values, is_builtin

from . import distributions as D
from .engine import run
from .specs import as_distribution

__all__ = [
    "Truth",
    "estimator_target",
    "exact_mean_sd",
    "exact_moments",
    "ground_truth",
    "register_truth",
    "truth",
]


@dataclass(frozen=True)
class Truth:
    """A true divergence value, where it came from, and (Monte Carlo only) its standard error."""

    value: float
    source: str
    stderr: float = 0.0
    note: str = ""  # why the value is +inf, or what a quadrature extrapolated

    @property
    def approximate(self) -> bool:
        return self.source == "monte carlo"

    def describe(self) -> str:
        if self.approximate:
            return f"monte carlo ±{self.stderr:.2g} (approximate)"
        return f"{self.source} ({self.note})" if self.note else self.source


ClosedForm = Callable[[Any, Any, FDivergence], float]
_REGISTRY: dict[tuple[type, type, str], ClosedForm] = {}


def register_truth(
    q_type: type, p_type: type, divergence: str
) -> Callable[[ClosedForm], ClosedForm]:
    """Decorator: register ``fn(q, p, div) -> float`` as the closed form of ``divergence``
    (a name such as ``"reverse_kl"``, or ``"alpha"`` for the whole α family) for q of type
    ``q_type`` and p of type ``p_type``. The most specific registration wins.

    >>> from klest.lab.distributions import Exponential
    >>> @register_truth(Exponential, Exponential, "chi2")
    ... def _chi2_exp(q, p, div):
    ...     a, b = q.rate, p.rate
    ...     return b * b / (a * (2 * b - a)) - 1 if 2 * b > a else math.inf
    """

    def deco(fn: ClosedForm) -> ClosedForm:
        _REGISTRY[(q_type, p_type, divergence)] = fn
        return fn

    return deco


def _key(div: FDivergence) -> str:
    params = dict(div.params)
    if "alpha" in params:
        a = params["alpha"]
        return "reverse_kl" if a == 0 else "forward_kl" if a == 1 else "alpha"
    return div.name


def _lookup(q: Any, p: Any, key: str) -> ClosedForm | None:
    best: tuple[int, ClosedForm] | None = None
    for (qt, pt, k), fn in _REGISTRY.items():
        if k != key or not isinstance(q, qt) or not isinstance(p, pt):
            continue
        rank = type(q).__mro__.index(qt) + type(p).__mro__.index(pt)
        if best is None or rank < best[0]:
            best = (rank, fn)
    return None if best is None else best[1]


def closed_form(q: Any, p: Any, div: FDivergence) -> float | None:
    """The registered closed form, or None when there is none for this pair and divergence."""
    key = _key(div)
    fn = _lookup(q, p, key)
    if fn is not None:
        return float(fn(q, p, div))
    if key == "forward_kl":
        fn = _lookup(p, q, "reverse_kl")
        if fn is not None:
            return float(fn(p, q, klest.get_divergence("reverse_kl")))
    return None


# ---------------------------------------------------------------------- closed forms
def _expm1mx(x: float) -> float:
    """e^x - 1 - x without cancellation (klest's own primitive)."""
    return float(expm1mx(np, np.array([float(x)]))[0])


def _gauss_pieces(q: Any, p: Any) -> tuple[np.ndarray, np.ndarray]:
    """(λ, w²) for two Gaussians: λ the eigenvalues of Σp⁻¹Σq, w² the squared coordinates of
    Lp⁻¹(μq - μp) in their eigenbasis (Lp the Cholesky factor of Σp) — through triangular
    solves, never an inverse. Every Gaussian closed form below is a sum over these."""
    from scipy.linalg import solve_triangular

    if isinstance(q, D.Normal):
        lam = np.array([(q.scale / p.scale) ** 2])
        return lam, np.array([((q.loc - p.loc) / p.scale) ** 2])
    if q.dim != p.dim:
        raise KlestError(f"dimensions differ: q has {q.dim}, p has {p.dim}", argument="p")
    lp, lq = p._chol, q._chol
    a = solve_triangular(lp, lq, lower=True)  # Lp⁻¹Lq: Σp⁻¹Σq is similar to A·Aᵀ
    lam, u = np.linalg.eigh(a @ a.T)
    z = solve_triangular(lp, np.asarray(q.loc, float) - np.asarray(p.loc, float), lower=True)
    return np.maximum(lam, 0.0), (u.T @ z) ** 2


def _gauss_kl(q: Any, p: Any) -> float:
    """KL(q‖p) = ½ Σ_i [(λ_i - 1 - log λ_i) + w_i²]: each term >= 0, no cancellation."""
    lam, w2 = _gauss_pieces(q, p)
    return 0.5 * float(sum(_expm1mx(math.log(v)) for v in lam) + np.sum(w2))


def _gauss_log_alpha_moment(q: Any, p: Any, a: float) -> float:
    """log E_q[r^α] = log ∫ p^α q^(1-α) for two Gaussians (+inf where it diverges):
    -½ Σ_i [log(1 + α(λ_i - 1)) - α log λ_i + α(1 - α) w_i² / (1 + α(λ_i - 1))].
    For α > ½ as E_p[(q/p)^(1-α)] (the same integral), whose terms are O(1 - α) each instead of
    cancelling O(1) terms."""
    if a > 0.5:
        q, p, a = p, q, 1.0 - a
    lam, w2 = _gauss_pieces(q, p)
    den = 1.0 + a * (lam - 1.0)
    if np.any(den <= 0):
        return math.inf
    terms = np.log1p(a * (lam - 1.0)) - a * np.log(lam) + a * (1.0 - a) * w2 / den
    return -0.5 * float(np.sum(terms))


def _gauss_alpha(q: Any, p: Any, a: float) -> float:
    """(E_q[r^α] - 1)/(α(α - 1)) through expm1: accurate for α near 0 and 1 too."""
    lm = _gauss_log_alpha_moment(q, p, a)
    if lm <= 709:
        return math.expm1(lm) / (a * (a - 1.0))
    if math.isinf(lm):  # E_q[r^α] diverges
        return math.inf
    # e^lm/(α(α - 1)) (the -1 is below rounding): finite; refused where beyond float64
    log_value = lm - math.log(abs(a * (a - 1.0)))
    if log_value > 709.78:
        raise KlestError(
            f"the alpha:{a:g} divergence of p = {p.spec} from q = {q.spec} is finite but about "
            f"e^{log_value:.6g}, beyond float64's range",
            argument="p",
        )
    return math.copysign(math.exp(log_value), a * (a - 1.0))


for _g in (D.Normal, D.MultivariateNormal):
    register_truth(_g, _g, "reverse_kl")(lambda q, p, div: _gauss_kl(q, p))
    register_truth(_g, _g, "chi2")(lambda q, p, div: 2.0 * _gauss_alpha(q, p, 2.0))
    register_truth(_g, _g, "squared_hellinger")(lambda q, p, div: 0.5 * _gauss_alpha(q, p, 0.5))
    register_truth(_g, _g, "alpha")(lambda q, p, div: _gauss_alpha(q, p, dict(div.params)["alpha"]))


def _normal_log_ratio_coefficients(q: D.Normal, p: D.Normal) -> tuple[float, float, float]:
    """L(x) = log p(x) - log q(x) = a x² + b x + c."""
    a = 0.5 / q.scale**2 - 0.5 / p.scale**2
    b = p.loc / p.scale**2 - q.loc / q.scale**2
    c = q.loc**2 / (2 * q.scale**2) - p.loc**2 / (2 * p.scale**2) + math.log(q.scale / p.scale)
    return a, b, c


@register_truth(D.Normal, D.Normal, "log_squared")
def _log_squared_normal(q: D.Normal, p: D.Normal, div: FDivergence) -> float:
    # x = m + s z: L = A z² + B z + C, E[L²] = 2A² + B² + (A + C)².
    a, b, c = _normal_log_ratio_coefficients(q, p)
    m, s = q.loc, q.scale
    A, B, C = a * s * s, (2 * a * m + b) * s, a * m * m + b * m + c
    return 0.5 * (2 * A * A + B * B + (A + C) ** 2)


_S_SERIES = (  # S(x) = Σ_k c_k / x^k, k = 2..15 (see _t_normal_gap)
    7 / 16,
    25 / 48,
    65 / 128,
    157 / 320,
    127 / 256,
    913 / 1792,
    2065 / 4096,
    4453 / 9216,
    2017 / 4096,
    24601 / 45056,
    17075 / 32768,
    68269 / 212992,
    27307 / 65536,
    1421089 / 983040,
)


def _t_normal_gap(nu: float) -> float:
    r"""S(x) = R(x) - [(x + ½)(ψ(x + ½) - ψ(x)) - ½] + 1/(2x - 2) at x = ν/2, with
    R(x) = log Γ(x + ½) - log Γ(x) - ½ log x: the part of KL(t_ν‖N(0, 1)) beyond its leading
    terms, ~ 7/(4ν²). For x >= 50 from its asymptotic series (checked against mpmath; the
    three pieces are each ~ 1/ν and cancel), below directly."""
    from scipy.special import digamma

    x = nu / 2
    if x >= 50.0:
        y = 1.0 / x
        return float(sum(c * y ** (k + 2) for k, c in enumerate(_S_SERIES)))
    e = (x + 0.5) * float(digamma(x + 0.5) - digamma(x)) - 0.5
    return D.log_gamma_ratio_remainder(x) - e + 1.0 / (2 * x - 2)


@register_truth(D.StudentT, D.Normal, "reverse_kl")
def _kl_t_normal(q: D.StudentT, p: D.Normal, div: FDivergence) -> float:
    """KL(t_ν(m, s)‖N(μ, σ)) = -H(t) + ½ log 2πσ² + E_q[(x - μ)²]/(2σ²), with the entropy
    H(t) = log s + (ν+1)/2 (ψ((ν+1)/2) - ψ(ν/2)) + log(√ν B(ν/2, ½)) and
    E_q[(x - μ)²] = s²ν/(ν - 2) + (m - μ)² (+inf for ν <= 2); rearranged without cancellation as
    ½(ρ - 1 - log ρ) + S(ν/2) + (ρ - 1)/(ν - 2) + (m - μ)²/(2σ²), ρ = s²/σ²."""
    nu = q.df
    if nu <= 2:
        return math.inf
    rho = (q.scale / p.scale) ** 2
    return (
        0.5 * _expm1mx(math.log(rho))
        + _t_normal_gap(nu)
        + (rho - 1.0) / (nu - 2.0)
        + (q.loc - p.loc) ** 2 / (2 * p.scale**2)
    )


def _lgamma_bregman(a: float, b: float) -> float:
    """log Γ(b) - log Γ(a) - (b - a) ψ(a) >= 0: by its Taylor series Σ_k ψ^(k-1)(a) δ^k / k!
    (δ = b - a) where |δ| < a/10, where the direct form would cancel."""
    from scipy.special import digamma, polygamma

    d = b - a
    if abs(d) < 0.1 * a:
        total, fact = 0.0, 1.0
        for k in range(2, 30):
            fact *= k
            term = float(polygamma(k - 1, a)) * d**k / fact
            total += term
            if abs(term) < 1e-17 * abs(total):
                break
        return total
    return math.lgamma(b) - math.lgamma(a) - d * float(digamma(a))


def _kl_gamma_params(aq: float, bq: float, ap: float, bp: float) -> float:
    """KL(Gamma(aq, bq)‖Gamma(ap, bp)) (shape, rate) = B(aq → ap) + aq·(u - 1 - log u)
    + (aq - ap) log u with u = bp/bq and B the log Γ Bregman term."""
    lu = math.log(bp / bq)
    return _lgamma_bregman(aq, ap) + aq * _expm1mx(lu) + (aq - ap) * lu


@register_truth(D.Exponential, D.Exponential, "reverse_kl")
def _kl_exp(q: D.Exponential, p: D.Exponential, div: FDivergence) -> float:
    return _expm1mx(math.log(p.rate / q.rate))


@register_truth(D.Gamma, D.Gamma, "reverse_kl")
def _kl_gamma(q: D.Gamma, p: D.Gamma, div: FDivergence) -> float:
    return _kl_gamma_params(q.shape, q.rate, p.shape, p.rate)


@register_truth(D.Gamma, D.Exponential, "reverse_kl")
def _kl_gamma_exp(q: D.Gamma, p: D.Exponential, div: FDivergence) -> float:
    return _kl_gamma_params(q.shape, q.rate, 1.0, p.rate)


@register_truth(D.Exponential, D.Gamma, "reverse_kl")
def _kl_exp_gamma(q: D.Exponential, p: D.Gamma, div: FDivergence) -> float:
    return _kl_gamma_params(1.0, q.rate, p.shape, p.rate)


def _kl_beta_params(aq: float, bq: float, ap: float, bp: float) -> float:
    """KL(Beta(aq, bq)‖Beta(ap, bp)) = B(aq → ap) + B(bq → bp) - B(aq + bq → ap + bp)."""
    return _lgamma_bregman(aq, ap) + _lgamma_bregman(bq, bp) - _lgamma_bregman(aq + bq, ap + bp)


@register_truth(D.Beta, D.Beta, "reverse_kl")
def _kl_beta(q: D.Beta, p: D.Beta, div: FDivergence) -> float:
    return _kl_beta_params(q.a, q.b, p.a, p.b)


@register_truth(D.Beta, D.Uniform, "reverse_kl")
def _kl_beta_uniform(q: D.Beta, p: D.Uniform, div: FDivergence) -> float:
    """-H(Beta(a, b)) + log(high - low) = KL(Beta(a, b)‖Beta(1, 1)) + log(high - low)."""
    if p.low > 0 or p.high < 1:
        return math.inf
    return _kl_beta_params(q.a, q.b, 1.0, 1.0) + math.log(p.high - p.low)


@register_truth(D.Laplace, D.Laplace, "reverse_kl")
def _kl_laplace(q: D.Laplace, p: D.Laplace, div: FDivergence) -> float:
    # log(bp/bq) + bq/bp·e^{-d/bq} + d/bp - 1 = (u - 1 - log u) + u·expm1(-d/bq) + d/bp, u = bq/bp
    d = abs(q.loc - p.loc)
    u = q.scale / p.scale
    return _expm1mx(math.log(u)) + u * math.expm1(-d / q.scale) + d / p.scale


@register_truth(D.Uniform, D.Uniform, "reverse_kl")
def _kl_uniform(q: D.Uniform, p: D.Uniform, div: FDivergence) -> float:
    if q.low < p.low or q.high > p.high:
        return math.inf
    return math.log((p.high - p.low) / (q.high - q.low))


@register_truth(D.Poisson, D.Poisson, "reverse_kl")
def _kl_poisson(q: D.Poisson, p: D.Poisson, div: FDivergence) -> float:
    return q.rate * _expm1mx(math.log(p.rate / q.rate))


# ------------------------------------------------------------------------- the dispatcher
def ground_truth(
    q: Any,
    p: Any,
    divergence: str | FDivergence = "reverse_kl",
    *,
    mc_samples: int = 4_000_000,
    seed: int = 0,
) -> Truth:
    """The true ``divergence`` between p and q (samples from q), with where it came from."""
    q = as_distribution(q)
    p = as_distribution(p)
    div = klest.get_divergence(divergence)
    if q.dim != p.dim:
        raise KlestError(f"q has dimension {q.dim} but p has dimension {p.dim}", argument="p")
    if q.discrete != p.discrete:
        raise KlestError(
            "one distribution is discrete and the other continuous: they have no common density",
            argument="p",
        )
    key = _key(div)
    mismatch, unseen, m = _support_mismatch(q, p, div)
    if mismatch is not None:
        return mismatch
    if isinstance(q, D.TorchDistribution) and isinstance(p, D.TorchDistribution):
        if key in ("reverse_kl", "forward_kl"):
            reg = _torch_registry(q, p) if key == "reverse_kl" else _torch_registry(p, q)
            if reg is not None:
                return _never_negative(Truth(reg, "torch registry"), q, p, div)
    exact = closed_form(q, p, div)
    if exact is None:
        tq, tp = _lab_twin(q), _lab_twin(p)
        if tq is not q or tp is not p:  # torch Normal/Normal: the lab's closed forms
            exact = closed_form(tq, tp, div)
    if exact is not None:
        return _never_negative(Truth(exact, "closed form"), q, p, div)
    # E_q[f(r)] sees only q's support; p's mass m elsewhere adds f*(0)·m (``unseen``)
    if q.discrete and q.dim > 1 and isinstance(q, D.TorchDistribution):
        if q.dist.has_enumerate_support:
            return _never_negative(Truth(_enumerated_sum(q, p, div), "exact sum"), q, p, div)
    if q.discrete and q.dim == 1:
        return _never_negative(
            Truth(_exact_sum(q, p, lambda L: _f_of(div, L)) + unseen, "exact sum"), q, p, div
        )
    if D.is_univariate_continuous(q) and _has_quantiles(q):
        # the tangent-corrected f(r) - f'(1)(r - 1) >= 0: no cancellation where p ≈ q, and a
        # divergent tail is +inf rather than inf - inf; E_q[r - 1] = -m puts f'(1)·m back
        res = _integral(q, p, lambda L: _corrected(div, L))
        value = res.value + (unseen - div.f_prime_at_1 * m if m > 0 else 0.0)
        return _never_negative(Truth(value, "quadrature", note=res.note), q, p, div)
    return _monte_carlo(q, p, div, mc_samples, seed)


#: The same function under the module's name (``from klest.lab.truth import truth``); the
#: package exports it as ``klest.lab.ground_truth``, so that ``klest.lab.truth`` is this module.
truth = ground_truth


def _never_negative(t: Truth, q: Any, p: Any, div: FDivergence) -> Truth:
    """A divergence is >= 0: rounding below 0 (|v| <= 1e-12) reads as 0, more is an error."""
    if t.value >= 0 or math.isnan(t.value):
        if math.isnan(t.value):
            raise KlestError(
                f"the {div.name} of p = {p.spec} from q = {q.spec} came out NaN ({t.source})",
                argument="p",
            )
        return t
    if t.value >= -1e-12:
        return Truth(0.0, t.source, t.stderr, t.note)
    raise KlestError(
        f"the {div.name} of p = {p.spec} from q = {q.spec} came out negative ({t.value:.6g}, "
        f"{t.source}): is f convex with f(1) = 0?",
        argument="p",
    )


def _corrected(div: FDivergence, L: np.ndarray) -> np.ndarray:
    """f(e^L) - f'(1)·expm1(L) elementwise, through the divergence's stable form."""
    import array_api_compat.numpy as npx

    with klest.options(validate=False), np.errstate(all="ignore"):
        return np.asarray(div.corrected(npx, np.asarray(L, dtype=np.float64)), dtype=np.float64)


def _torch_registry(a: Any, b: Any) -> float | None:
    """torch.distributions.kl_divergence(a, b) in float64 where the parameters allow, or None
    where torch has no registration."""
    import torch

    try:
        with torch.no_grad():
            return float(torch.distributions.kl_divergence(a.dist, b.dist).double())
    except NotImplementedError:
        return None


def f_star_zero(div: FDivergence) -> float:
    """f*(0) = lim_{t→∞} f(t)/t: the weight D_f gives to p's mass where q has none (+inf for
    forward KL, χ² and α > 1; 0 for the reverse KL and log-squared; 1/2 for TV).

    >>> f_star_zero(klest.get_divergence("total_variation"))
    0.5
    """
    vals = []
    for t in (1e100, 1e200, 1e300):
        try:
            vals.append(float(div.f(t)) / t)
        except (ArithmeticError, ValueError):
            return math.inf
    a, b = vals[1], vals[2]
    if not (math.isfinite(a) and math.isfinite(b)) or abs(b - a) > 1e-9 * max(1.0, abs(b)):
        return math.inf  # still growing (t log t, t^α with α > 1) or not settled: count as +inf
    return 0.0 if abs(b) < 1e-12 else b


def _uncovered(
    a: list[tuple[float, float]], b: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    """The parts of the intervals ``a`` not covered by the intervals ``b``, of positive length."""
    out: list[tuple[float, float]] = []
    for lo, hi in a:
        cur = lo
        for blo, bhi in sorted(b):
            if bhi <= cur or blo >= hi:
                continue
            if blo > cur:
                out.append((cur, blo))
            cur = max(cur, bhi)
            if cur >= hi:
                break
        if cur < hi:
            out.append((cur, hi))
    return [(x, y) for x, y in out if y > x]


def _mass(d: Any, intervals: list[tuple[float, float]]) -> float:
    """P_d(∪ intervals) for a univariate continuous d: by its CDF where one is known, else by
    quadrature of its density."""
    total = 0.0
    for lo, hi in intervals:
        cdf = _cdf(d)
        if cdf is not None:
            total += float(cdf(hi)) - float(cdf(lo))
            continue
        from scipy import integrate

        def dens(x: float) -> float:
            with np.errstate(all="ignore"):
                return float(np.exp(d.logpdf(np.array([x]))[0]))

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            total += float(integrate.quad(dens, lo, hi, limit=200)[0])
    return min(max(total, 0.0), 1.0)


def _cdf(d: Any) -> Callable[[float], float] | None:
    if isinstance(d, D.Mixture):
        cdfs = [_cdf(c) for c in d.components]
        if any(c is None for c in cdfs):
            return None
        return lambda x: sum(
            w * c(x)  # type: ignore[misc]
            for w, c in zip(d.weights, cdfs, strict=True)
            if w > 0
        )
    s = d.scipy()
    if s is not None:
        return lambda x: float(s.cdf(x))
    if isinstance(d, D.TorchDistribution):
        import torch

        def tcdf(x: float) -> float:
            if math.isinf(x):
                return 0.0 if x < 0 else 1.0
            with torch.no_grad():
                return float(d.dist64.cdf(torch.as_tensor(x, dtype=d.float_dtype())))

        try:
            tcdf(float(d._a_point(torch.float64)))
        except (NotImplementedError, ValueError, RuntimeError, TypeError):
            return None
        return tcdf
    return None


def _unseen_mass(q: Any, p: Any) -> tuple[float, bool]:
    """(m, q_only) for univariate q and p: m is p's mass where q has none (so E_q[r] = 1 - m),
    q_only whether q has mass where p has none."""
    if q.discrete:
        xs = np.unique(np.concatenate([q.enumerate_support(), p.enumerate_support()]))
        with np.errstate(all="ignore"):
            lq, lp = q.logpdf(xs), p.logpdf(xs)
        m = float(np.sum(np.exp(lp[lq == -np.inf])))
        return (m if m > 1e-15 else 0.0), bool(np.any((lq > -np.inf) & (lp == -np.inf)))
    iq, ip = q.support_intervals(), p.support_intervals()
    gaps = _uncovered(ip, iq)
    m = _mass(p, gaps) if gaps else 0.0
    if gaps and m <= 0.0:
        m = 1e-300  # positive length but a mass too small to compute: still mass
    return m, bool(_uncovered(iq, ip))


def _support_mismatch(q: Any, p: Any, div: FDivergence) -> tuple[Truth | None, float, float]:
    """Where the supports differ: (+inf truth with source "support mismatch", 0, 0) where q has mass
    where p has none and f(0) = +inf; an error where p puts mass where q has none and
    f*(0) = +inf (no estimator that samples q can see that mass); else (None, f*(0)·m, m), with m
    p's mass where q has none — the part of D_f that E_q[f(r)] misses (0 where the supports
    agree). Supports are compared as unions of intervals, so a gap between the components of a
    mixture counts."""
    if q.dim != 1:
        return None, 0.0, 0.0
    outside = f"support mismatch: p = {p.spec} puts mass where q = {q.spec} has none"
    m, q_only = _unseen_mass(q, p)
    if q_only and math.isinf(div.f(0.0)):
        return Truth(math.inf, "support mismatch"), 0.0, 0.0
    if m > 0.0:
        w = f_star_zero(div)
        if math.isinf(w):
            raise KlestError(
                outside + f", which no estimator that samples q can see (the true {div.name} "
                "is +inf)",
                argument="p",
            )
        return None, w * m, m
    return None, 0.0, 0.0


def _has_quantiles(d: Any) -> bool:
    """True where quadrature can find break points (a SciPy twin, or torch's icdf/moments)."""
    if isinstance(d, D.Mixture):
        return all(_has_quantiles(c) for c in d.components)
    if isinstance(d, D.TorchDistribution):
        return D.is_univariate_continuous(d) and bool(d.quantile_points())
    return d.scipy() is not None


def _lab_twin(d: Any) -> Any:
    """The lab's own distribution with the same law as a torch one (scalar parameters, exact
    type match), so that the closed forms registered for the lab's families apply; else d."""
    if not isinstance(d, D.TorchDistribution):
        return d
    import torch

    td = torch.distributions
    t = d.dist
    makers: dict[type, Callable[[], D.Distribution]] = {
        td.Normal: lambda: D.Normal(float(t.loc), float(t.scale)),
        td.StudentT: lambda: D.StudentT(float(t.df), float(t.loc), float(t.scale)),
        td.Laplace: lambda: D.Laplace(float(t.loc), float(t.scale)),
        td.Exponential: lambda: D.Exponential(float(t.rate)),
        td.Gamma: lambda: D.Gamma(float(t.concentration), float(t.rate)),
        td.Beta: lambda: D.Beta(float(t.concentration1), float(t.concentration0)),
        td.Uniform: lambda: D.Uniform(float(t.low), float(t.high)),
        td.Poisson: lambda: D.Poisson(float(t.rate)),
        td.MultivariateNormal: lambda: _mvn_twin(t),
        td.LowRankMultivariateNormal: lambda: _mvn_twin(t),
    }
    make = makers.get(type(t))
    if make is None:
        return d
    try:
        return make()
    except (TypeError, ValueError, RuntimeError):  # batched parameters
        return d


def _mvn_twin(t: Any) -> D.MultivariateNormal:
    """The lab's N(loc, cov) for a torch (low-rank) multivariate normal."""
    loc = t.loc.detach().double().numpy()
    cov = t.covariance_matrix.detach().double().numpy()
    return D.MultivariateNormal(tuple(map(float, loc)), tuple(tuple(map(float, r)) for r in cov))


def _enumerated_sum(q: Any, p: Any, div: FDivergence) -> float:
    """D_f by Σ_x q(x) f(p(x)/q(x)) over the enumerated support of a multivariate discrete torch
    q (one-hot categoricals), with p's mass off q's support weighted f*(0)."""
    xs = q.enumerate_support()
    with np.errstate(all="ignore"):
        lq, lp = q.logpdf(xs), p.logpdf(xs)
    seen = lq > -np.inf
    off = 1.0 - float(np.sum(np.exp(lp[seen])))  # p's mass where q has none
    total = math.fsum(np.exp(lq[seen]) * _f_of(div, lp[seen] - lq[seen]))
    if np.any(seen & (lp == -np.inf)) and math.isinf(div.f(0.0)):
        return math.inf
    if off > 1e-12:
        w = f_star_zero(div)
        if math.isinf(w):
            raise KlestError(
                f"support mismatch: p = {p.spec} puts mass where q = {q.spec} has none, which no "
                f"estimator that samples q can see (the true {div.name} is +inf)",
                argument="p",
            )
        total += w * off
    return total


def _f_of(div: FDivergence, L: np.ndarray) -> np.ndarray:
    """f(e^L) elementwise (f(0) where L = -inf), through the divergence's stable form."""
    import array_api_compat.numpy as npx

    # r = e^L overflows beyond L ≈ 709; there q is astronomically small and f(e^700) stands in
    # (an integrand that still matters there diverges anyway).
    L = np.minimum(np.asarray(L, dtype=np.float64), 700.0)
    with klest.options(validate=False), np.errstate(all="ignore"):
        return np.asarray(div.plain(npx, L), dtype=np.float64)


def _exact_log_sum_sq(q: Any, p: Any, g: Callable[[np.ndarray], np.ndarray]) -> float:
    """log Σ_x q(x)·g(L(x))² over a discrete q's support, every term in log space (log q + 2
    log|g|, with g's growth model where L is huge: :func:`_log_terms`), so that neither q's
    underflow nor g's overflow truncates the sum: q·r² = p²/q peaks near x = λ_p²/λ_q for two
    Poissons, far beyond both bulks, where √q alone is 0 in float64. An unbounded support is
    extended in blocks that double, until a block's largest term is below e^-40 of the total
    and falling; +inf (a divergent sum) if that never happens within 2^40 points."""
    grow = _growth_both(g)

    def log_terms(xs: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            lq = np.asarray(q.logpdf(xs), dtype=np.float64)
            keep = lq > -np.inf
            lq = lq[keep]
            L = np.asarray(q.log_ratio(p, xs[keep]), dtype=np.float64)
            lp = np.asarray(p.logpdf(xs[keep]), dtype=np.float64)
            lv, _, ok = _log_terms(lq, L, g, grow, True, lp)
            g_inf = ~ok & np.isfinite(lq) & np.isinf(np.asarray(g(L), dtype=np.float64))
        return np.where(g_inf, np.inf, lv)

    def lse(v: np.ndarray) -> float:
        m = float(np.max(v, initial=-math.inf))
        if not math.isfinite(m):
            return m
        return m + math.log(math.fsum(np.exp(v - m)))

    xs = q.enumerate_support()
    if math.isinf(q.support[1]) and p.discrete and p.dim == 1:
        with contextlib.suppress(KlestError):
            xs = np.union1d(xs, p.enumerate_support())
    total = lse(log_terms(xs))
    if not math.isinf(q.support[1]) or total == math.inf:
        return total
    last, step = float(xs[-1]), max(256, len(xs))
    while last < 2.0**40:
        block = np.arange(last + 1, last + 1 + step)
        v = log_terms(block)
        add = lse(v)
        total = float(np.logaddexp(total, add))
        last = float(block[-1])
        if total == math.inf:
            return total
        if len(v) and add < total - 40.0 and v[-1] <= v[0]:
            return total
        step *= 2
    return math.inf


def _exact_sum(
    q: Any, p: Any, g: Callable[[np.ndarray], np.ndarray], *, squared: bool = False
) -> float:
    """Σ_x q(x) g(L(x)) over q's support. An unbounded support is summed over the points holding
    all but 1e-17 of q's and p's mass, then extended block by block until a block adds less than
    1e-17 of the total (a term like q·r⁴ can peak far beyond q's own bulk); +inf if it never
    settles within max(10⁶, 4 × its size) points past the bulk."""

    if squared:  # in log space (see _exact_log_sum_sq); +inf also where it overflows float64
        log_total = _exact_log_sum_sq(q, p, g)
        return math.exp(log_total) if log_total < 709.0 else math.inf
    c = _linear_growth(g)

    def terms(xs: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            lq = np.asarray(q.logpdf(xs), dtype=np.float64)
            keep = lq > -np.inf
            lq = lq[keep]
            L = np.asarray(q.log_ratio(p, xs[keep]), dtype=np.float64)
            if c is not None:  # q·g(L) = c·p where r is astronomically large (as in quadrature)
                huge = L > _HUGE_L
                if np.any(huge):
                    out = np.zeros(len(L))
                    out[huge] = [
                        c(float(v)) * math.exp(float(v + w))
                        for v, w in zip(L[huge], lq[huge], strict=True)
                    ]
                    rest = ~huge
                    out[rest] = _terms(lq[rest], L[rest])
                    return out
            return _terms(lq, L)

    def _terms(lq: np.ndarray, L: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            if squared:  # q·g² as (√q·g)²: g² alone may overflow where the product does not
                w = np.exp(0.5 * lq)
                t = w * g(L)
                return np.where(w > 0, t * t, 0.0)
            w = np.exp(lq)
            # where q's mass underflows to 0 the term vanishes (as in the quadrature)
            return np.where(w > 0, w * g(L), 0.0)

    xs = q.enumerate_support()
    if math.isinf(q.support[1]) and p.discrete and p.dim == 1:
        try:
            xs = np.union1d(xs, p.enumerate_support())
        except KlestError:
            pass
    parts = [terms(xs)]
    total = math.fsum(parts[0])
    if math.isinf(q.support[1]):
        last = float(xs[-1])
        step = max(256, len(xs))
        # relative to where the bulk ends (Poisson(10⁶)'s bulk alone reaches past 10⁶)
        limit = last + max(1e6, 4.0 * step)
        while True:
            block = np.arange(last + 1, last + 1 + step)
            t = terms(block)
            add = math.fsum(t)
            if not math.isfinite(add):
                return math.inf if add > 0 else math.nan
            total += add
            last = float(block[-1])
            if abs(add) <= 1e-17 * abs(total) or (add == 0.0 and total == 0.0):
                break
            if last > limit:
                return math.inf
    return float(total)


def _breakpoints(q: Any, p: Any) -> list[float]:
    lo, hi = q.support
    pts = set(D._quantile_points(q))
    if _has_quantiles(p):
        pts |= set(D._quantile_points(p))
    return sorted(x for x in pts if lo < x < hi)


def _quadrature(
    q: Any, p: Any, g: Callable[[np.ndarray], np.ndarray], *, squared: bool = False
) -> float:
    """∫ q·g(L) over q's support (∫ q·g(L)² with ``squared``): +inf where it diverges,
    :class:`klest.KlestError` where its convergence cannot be decided. See :func:`_integral`."""
    return _integral(q, p, g, squared=squared).value


@dataclass(frozen=True)
class _Integral:
    value: float
    note: str = ""  # why the value is +inf, or what was extrapolated


@dataclass(frozen=True)
class _Growth:
    """log|g(L)| for L beyond ``lmax`` (where g itself may overflow): κL + μ log L + c + d/L
    + e/L², fitted at five points up to ``lmax`` (e^{κL}·L^μ is the growth of every f and
    per-sample value in klest; κ and μ snapped to integers when within 1e-2 / 0.05, so that
    q·g = p·L^μ·e^(c + ...) exactly when κ = 1, however small q is)."""

    lmax: float
    kappa: float
    mu: float
    c: float
    d: float  # 1/L and 1/L² terms: log(L - 1) = log L - 1/L - 1/(2L²) - ...
    e: float
    # the same model of log|g(-M)| in M = -L for L below -neg.lmax, where g(L) overflows as
    # r -> 0 (e.g. α < 0: g ~ e^{αL}); with it, q·g = exp((1 + κ)·log q - κ·log p + ...) stays
    # evaluable where a fast-falling p (Gaussian under an exponential q) makes g overflow, so
    # the tail's verdict is decided from its log-slope instead of refused
    neg: _Growth | None = None
    neg_sign: float = 1.0


def _growth(g: Callable[[np.ndarray], np.ndarray]) -> _Growth:
    grid = np.array([10.0, 20.0, 40.0, 60.0, 80.0, 120.0, 160.0, 200.0, 240.0, 320.0, 480.0, 640.0])
    with np.errstate(all="ignore"):
        vals = np.asarray(g(grid), dtype=np.float64)
        lv = np.log(np.abs(vals))
    ok = np.isfinite(lv)
    if np.all(vals == 0):
        return _Growth(grid[-1], 0.0, 0.0, -math.inf, 0.0, 0.0)
    last = -1
    for i in range(4, len(grid)):
        if np.all(ok[i - 4 : i + 1]):
            last = i
    if last < 0:
        raise KlestError("cannot follow the growth of the integrand for large log-ratios")
    xs, ys = grid[last - 4 : last + 1], lv[last - 4 : last + 1]

    def solve(cols: list[np.ndarray], y: np.ndarray) -> list[float]:
        n = len(cols)
        a = np.stack([c[-n:] for c in cols], axis=1)
        return [float(v) for v in np.linalg.solve(a, y[-n:])]

    one, inv, lg = np.ones(5), 1.0 / xs, np.log(xs)
    c, kappa, mu, d, e = solve([one, xs, lg, inv, inv * inv], ys)
    if abs(kappa - round(kappa)) < 1e-2:  # e^L·(L - 1) fits κ = 1 - 1e-5: make it exact
        kappa = float(round(kappa))
        c, mu, d, e = solve([one, lg, inv, inv * inv], ys - kappa * xs)
    if abs(mu - round(mu)) < 0.05:
        mu = float(round(mu))
        c, d, e = solve([one, inv, inv * inv], ys - kappa * xs - mu * lg)
    return _Growth(float(xs[-1]), kappa, mu, c, d, e)


def _growth_both(g: Callable[[np.ndarray], np.ndarray]) -> _Growth:
    """:func:`_growth`, with the model toward L -> -inf added where g grows there (it is used
    only where g(L) itself overflows)."""
    grow = _growth(g)
    try:
        neg = _growth(lambda M: g(-M))
    except KlestError:
        return grow
    with np.errstate(all="ignore"):
        sign = float(np.sign(np.asarray(g(np.array([-neg.lmax])), dtype=np.float64)[0]))
    if neg.kappa <= 0 or sign == 0:
        return grow
    return dataclasses.replace(grow, neg=neg, neg_sign=sign)


def _log_terms(
    lq: np.ndarray,
    L: np.ndarray,
    g: Callable[[np.ndarray], np.ndarray],
    grow: _Growth,
    squared: bool,
    lp: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log|q·g(L)|, sign, valid) with L = log p - log q given (never formed from the two log
    densities here: a small-shape gamma's cancel; see ``Distribution.log_ratio_at``) and q·g(L)²
    with ``squared``, computed in log space so that q's underflow or g's overflow loses nothing.
    ``lq`` and ``lp`` may carry the same Jacobian (densities of t = log distance); ``lp`` serves
    only where L is beyond the growth model's reach (there L ~ -log q is itself huge, and
    lq + L would cancel where κ·lp + (1 - κ)·lq does not). ``valid`` is False where the
    value cannot be evaluated (log q not finite, or log p = -inf while g(-inf) is infinite)."""
    k = 2.0 if squared else 1.0
    with np.errstate(all="ignore"):
        L = np.asarray(L, dtype=np.float64)
        big = L > grow.lmax
        Ls = np.where(big, 0.0, L)
        v = np.asarray(g(Ls), dtype=np.float64)
        lg = np.log(np.abs(v))
        sign = np.sign(v) if not squared else np.ones_like(v)
        direct = lq + k * lg
        # beyond lmax: q·|g|^k = exp(kκ·lp + (1 - kκ)·lq + k(μ log L + c)), no cancellation
        kk = k * grow.kappa
        Lb = np.where(big, L, 1.0)
        lin = kk * lp if kk == 1.0 else kk * lp + (1.0 - kk) * lq
        model = lin + k * (grow.mu * np.log(Lb) + grow.c + (grow.d + grow.e / Lb) / Lb)
        out = np.where(big, model, direct)
        sign = np.where(big, 1.0, sign)
        n = grow.neg
        if n is not None:  # g overflowed toward r -> 0: log q + k·log|g| from the model in -L
            nb = np.isinf(v) & (L < -n.lmax) & np.isfinite(L)
            M = np.where(nb, -L, 1.0)
            n_model = lq + k * (n.kappa * M + n.mu * np.log(M) + n.c + (n.d + n.e / M) / M)
            out = np.where(nb, n_model, out)
            sign = np.where(nb, 1.0 if squared else grow.neg_sign, sign)
        valid = np.isfinite(lq) & ~np.isnan(out) & (out < np.inf)
    return np.where(valid, out, -np.inf), np.where(valid, sign, 0.0), valid


def _integral(
    q: Any, p: Any, g: Callable[[np.ndarray], np.ndarray], *, squared: bool = False
) -> _Integral:
    r"""∫ q·g(L) dx over q's support (q·g(L)² with ``squared``), with convergence decided.

    The support is cut at quantiles of q and p: between the outermost cuts adaptive
    Gauss-Kronrod in x; beyond them, toward an infinite end in t = log|x| and toward a finite
    end in t = log(distance to the end) (:meth:`Distribution.logpdf_at`), which turns power
    tails and x^(a-1) singularities into exponentials in t, over pieces 2^k ≤ τ ≤ 2^(k+1) of
    the distance τ from the cut, out to τ = 2^17. Everything is computed in log space.
    The integral of each tail converges iff log|integrand| = a + β|t| + m log|t| has β < 0
    (or β = 0 and m < -1); (β, m) are fitted on the last three pieces' ends and the decision
    checked against the three before. A divergent tail gives +inf with the reason; the rest of
    a convergent tail beyond the last piece (or beyond where the densities stop being
    representable, |x| ≈ 1e154 for a normal) is the fitted model's integral.
    """
    from scipy import integrate

    grow = _growth_both(g)
    lo, hi = q.support
    pts = _breakpoints(q, p)
    # (end, side, t0, dirn, name): x = end + side·e^t, t = t0 + dirn·τ for τ >= 0
    tails: list[tuple[float, float, float, float, str]] = []
    edges: list[float] = []  # the part integrated in x (only where both ends are infinite)
    if math.isinf(lo) and math.isinf(hi):
        qpts = D._quantile_points(q)
        c = max([1.0, *(abs(v) for v in qpts if math.isfinite(v))])
        edges = sorted({-c, c, *(v for v in pts if -c < v < c)})
        tails = [(0.0, -1.0, math.log(c), 1.0, "-inf"), (0.0, 1.0, math.log(c), 1.0, "+inf")]
    elif math.isinf(hi) or math.isinf(lo):  # one finite end: t = log(distance to it) for all x
        end, side = (lo, 1.0) if math.isinf(hi) else (hi, -1.0)
        t0 = 0.0
        tails = [
            (end, side, t0, -1.0, f"x = {end:g}"),
            (end, side, t0, 1.0, "+inf" if side > 0 else "-inf"),
        ]
    else:  # two finite ends: each half in t = log(distance to its end)
        t0 = math.log((hi - lo) / 2)
        tails = [(lo, 1.0, t0, -1.0, f"x = {lo:g}"), (hi, -1.0, t0, -1.0, f"x = {hi:g}")]

    def core(x: float) -> float:
        xa = np.array([x])
        lq = np.asarray(q.logpdf(xa), dtype=np.float64)
        lp = np.asarray(p.logpdf(xa), dtype=np.float64)
        lv, s, ok = _log_terms(lq, q.log_ratio(p, xa), g, grow, squared, lp)
        if not ok[0]:
            return 0.0
        return float(s[0]) * math.exp(min(float(lv[0]), 709.0)) if lv[0] < 709.0 else math.inf

    notes: list[str] = []
    total = 0.0
    for end, side, t0, dirn, where in tails:  # the tails first: a divergent one decides
        with np.errstate(all="ignore"):
            ts = [math.log(side * (v - end)) for v in pts if side * (v - end) > 0]
        splits = sorted({dirn * (t - t0) for t in ts if dirn * (t - t0) > 0})
        part = _tail(q, p, g, grow, squared, end, side, t0, dirn, where, splits, 1e-16 * abs(total))
        if not math.isfinite(part.value):
            return part
        total += part.value
        if part.note:
            notes.append(part.note)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for a, b in itertools.pairwise(edges):
            if b > a:
                total += integrate.quad(core, a, b, epsabs=0.0, epsrel=1e-12, limit=200)[0]
    if math.isnan(total):
        raise KlestError(f"the integral of {p.spec} against {q.spec} is undefined", argument="p")
    return _Integral(total, "; ".join(notes))


_TAIL_PIECES = 17  # τ up to 2^17 in t-units: e^-131072 from a finite end, e^131072 out


def _tail(
    q: Any,
    p: Any,
    g: Callable[[np.ndarray], np.ndarray],
    grow: _Growth,
    squared: bool,
    end: float,
    side: float,
    t0: float,
    dirn: float,
    where: str,
    splits: list[float],
    floor: float = 0.0,
) -> _Integral:
    """One tail of :func:`_integral`: x = end + side·e^t, t = t0 + dirn·τ, τ from 0 to ∞, in
    pieces between the powers of two and the ``splits`` (the break points' τ); ``floor``: an
    absolute tolerance (1e-16 of what the other tails already gave)."""
    from scipy import integrate

    intervals = q.support_intervals()

    def log_f(tau: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t = t0 + dirn * tau
        # the density of t (q·dx/dt) and L, each by its own formula (see log_density_t)
        lqt = np.asarray(q.log_density_t(end, side, t), dtype=np.float64)
        L = np.asarray(q.log_ratio_at(p, end, side, t), dtype=np.float64)
        lpt = np.asarray(p.log_density_t(end, side, t), dtype=np.float64)
        lv, s, ok = _log_terms(lqt, L, g, grow, squared, lpt)
        with np.errstate(all="ignore"):
            x = end + side * np.exp(t)
        gap = ~np.any([(x >= a) & (x <= b) for a, b in intervals], axis=0)  # q = 0: nothing
        return np.where(gap, -np.inf, lv), np.where(gap, 0.0, s), ok | gap

    def f(tau: float) -> float:
        lv, s, ok = log_f(np.array([tau]))
        return float(s[0]) * math.exp(float(lv[0])) if ok[0] and lv[0] < 709.0 else 0.0

    # a small-shape gamma or beta spreads its mass over |t| ~ 1/a near 0: as many more pieces
    scale = max(q.t_scale(end, side), p.t_scale(end, side)) if dirn < 0 else 1.0
    extra = min(math.ceil(math.log2(scale)), 400) if scale > 1.0 else 0
    taus = np.array([0.0] + [2.0**k for k in range(_TAIL_PIECES + extra + 1)])
    lv, sg, ok = log_f(taus)
    n_ok = len(taus) if bool(np.all(ok)) else int(np.argmin(ok))
    # the pieces: powers of two and break points, as far as the densities are evaluable
    grid = np.array(sorted({*taus[:n_ok], *(v for v in splits if n_ok and v < taus[n_ok - 1])}))
    glv, _, gok = log_f(grid)
    peak = float(np.max(glv[gok], initial=-math.inf))
    # the decision: log|integrand| ≈ a + β s + m log s, s = |t|, on the last valid probes
    s = np.abs(t0 + dirn * taus)
    use = [i for i in range(n_ok) if taus[i] >= 1.0 and s[i] >= 8.0]
    vanishes = bool(use) and bool(np.all(lv[use[-3:]] == -np.inf))
    if n_ok >= 3 and lv[n_ok - 1] < min(peak - 745.0, lv[n_ok - 2]):
        # already below e^-745 of the largest value and falling where the densities stop being
        # evaluable (a SciPy log-density that underflows to -inf): nothing left to count
        vanishes = True
    if not vanishes and len(use) < 4:
        raise KlestError(
            f"cannot decide whether the integral converges toward {where}: the densities "
            "cannot be evaluated far enough into that tail",
            argument="p",
        )

    def fit(idx: list[int]) -> tuple[float, float]:
        ss, ys = s[idx], lv[idx]
        a = np.stack([np.ones(3), ss, np.log(ss)], axis=1)
        with np.errstate(all="ignore"):
            _, beta, m = (float(v) for v in np.linalg.solve(a, ys))
        return beta, m

    def verdict(beta: float, m: float) -> str:
        if not math.isfinite(beta):
            return "converges" if beta < 0 or math.isnan(beta) else "diverges"
        if beta < -1e-9:
            return "converges"
        if beta > 1e-9:
            return "diverges"
        return "converges" if m < -1.01 else "diverges" if m > -0.99 else "undecided"

    model = False
    if not vanishes:
        last = float(lv[use[-1]])
        falling = last < lv[use[-2]]
        # far below the largest value and still falling: nothing left to decide or add
        if not (last < peak - 745.0 and falling):
            beta, m = fit(use[-3:])
            prev = verdict(*fit(use[-4:-1]))
            now = verdict(beta, m)
            if now == "diverges" and (prev == "diverges" or not falling):
                grows = "grows" if beta > 0 else "decays too slowly"
                return _Integral(
                    math.inf,
                    f"diverges toward {where}: the integrand {grows} (log-slope {beta:+.3g} "
                    "in t = log distance)",
                )
            if now != "converges" or prev == "diverges":
                raise KlestError(
                    f"cannot decide whether the integral converges toward {where} (log-slope "
                    f"{beta:+.3g}, log-power {m:+.3g} in t = log distance)",
                    argument="p",
                )
            model = True
    # an absolute tolerance 1e-16 of the largest piece's rough size (value × width): pieces
    # that add less than that are not refined to 1e-12 of their own tiny size (a small-shape
    # gamma's tail has hundreds of them, each costing thousands of evaluations)
    with np.errstate(all="ignore"):
        sizes = np.maximum(glv[:-1], glv[1:]) + np.log(np.diff(grid))
    big = float(np.max(sizes[np.isfinite(sizes)], initial=-math.inf))
    epsabs = max(floor, 1e-16 * math.exp(big) if -700.0 < big < 700.0 else 0.0)
    total = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(len(grid) - 1):
            if max(glv[i], glv[i + 1]) < peak - 90.0 and grid[i] > 8.0:
                continue  # both ends below e^-90 of the largest value: nothing inside either
            total += integrate.quad(
                f, grid[i], grid[i + 1], epsabs=epsabs, epsrel=1e-12, limit=200
            )[0]
        if not model:
            return _Integral(total)
        # the model's integral from the last valid probe on: e^{λ(s_v)} ∫ e^{βu}(1 + u/s_v)^m du
        sv = float(s[use[-1]])
        rest = integrate.quad(
            lambda u: math.exp(beta * u + m * math.log1p(u / sv)), 0.0, math.inf, epsrel=1e-12
        )[0]
    extra = float(sg[use[-1]]) * math.exp(last) * rest
    total += extra
    if abs(extra) > 1e-12 * max(abs(total), 1e-300):
        return _Integral(
            total,
            f"the tail toward {where} beyond |t| = {sv:.3g} is its fitted power law's "
            f"({abs(extra / total):.1g} of the value)",
        )
    return _Integral(total)


def _monte_carlo(q: Any, p: Any, div: FDivergence, n: int, seed: int) -> Truth:
    # the control-variate estimator first; where single samples dominate it (r unbounded, its
    # variance infinite) the plain one, whose values grow only like log r
    key = _key(div)
    names = (
        ["k3", "k1"]
        if key == "reverse_kl"
        else ["forward_k3", "forward_k1"]
        if key == "forward_kl"
        else [div.name]
    )
    results = run(q, p, names, n=n, seed=seed)
    good = [results[k] for k in names if results[k].reliable and math.isfinite(results[k].mean)]
    res = good[0] if good else results[names[0]]
    if not good:
        raise KlestError(
            f"no closed form or quadrature for {div.name} of p = {p.spec} from q = {q.spec}, and "
            "the Monte Carlo fallback is dominated by single samples (the divergence or its "
            "estimator's variance may be infinite)",
            argument="p",
        )
    return Truth(res.mean, "monte carlo", res.stderr)


# -------------------------------------------------------------- estimators' exact moments
def estimator_target(estimator: str) -> str:
    """The divergence an estimator is measured against (k2 is measured against the reverse KL,
    which it estimates with a bias; forward_* against the forward KL): the estimator table's
    ``target``."""
    return klest.get_estimator(estimator).target


def _per_sample_values(estimator: str, L: np.ndarray) -> np.ndarray:
    import array_api_compat.numpy as npx

    rec = klest.get_estimator(estimator)
    L = np.minimum(np.asarray(L, dtype=np.float64), 700.0)  # as in _f_of
    with klest.options(validate=False), np.errstate(all="ignore"):
        out = rec.values(npx, L)
    if not is_builtin(rec):  # a registered estimator's values are checked by the core's rule
        check_values(rec, L, out)
    return np.asarray(out, dtype=np.float64)


def exact_moments(q: Any, p: Any, estimator: str) -> tuple[float, float] | None:
    """(E_q[v], Var_q[v]) of the per-sample values v of ``estimator``, by exact sum (discrete q)
    or quadrature (univariate continuous q); Var may be +inf. None where neither applies.

    The optimal-λ estimator is taken at its population λ* = Cov(L, r)/Var(r) (its large-n limit).
    Whether E_q[v²] is finite is decided by the tails of the integrand q·v² (see
    :func:`_integral`), not assumed: +inf where they diverge, an error where undecidable.
    A finite variance beyond the float64 range (a standard deviation above ~1e154) cannot be
    returned here: that raises :class:`klest.KlestError`; :func:`exact_mean_sd` returns the
    standard deviation itself.
    """
    res = exact_mean_sd(q, p, estimator)
    if res is None:
        return None
    mean, sd = res
    var = sd * sd
    if math.isinf(var) and math.isfinite(sd):
        raise KlestError(
            f"the variance of {estimator}'s values is finite but beyond float64 (stdev {sd:.4g}); "
            "use exact_mean_sd",
            argument="estimator",
        )
    return mean, var


def exact_mean_sd(q: Any, p: Any, estimator: str) -> tuple[float, float] | None:
    """(E_q[v], sd_q[v]) of the per-sample values v of ``estimator``, as :func:`exact_moments`,
    with the standard deviation computed as s·√(E_q[((v - E v)/s)²]) for a scale s (|E v|, the
    values' size): finite wherever it is, even where the variance itself overflows
    (v ~ 1e160 for p = N(0, 1e-80) against q = N(0, 1)). sd may be +inf (infinite variance)."""
    q = as_distribution(q)
    p = as_distribution(p)
    if q.dim != 1 or (isinstance(q, D.TorchDistribution) and not q.discrete):
        return None
    if estimator == "k_opt_crossfit":
        estimator = "k_opt"
    if q.discrete:

        def integ(g: Callable[[np.ndarray], np.ndarray], squared: bool = False) -> float:
            return _exact_sum(q, p, g, squared=squared)

        def log_sq(g: Callable[[np.ndarray], np.ndarray]) -> float:
            return _exact_log_sum_sq(q, p, g)

    elif _has_quantiles(q) and _has_quantiles(p):

        def integ(g: Callable[[np.ndarray], np.ndarray], squared: bool = False) -> float:
            return _quadrature(q, p, g, squared=squared)

        def log_sq(g: Callable[[np.ndarray], np.ndarray]) -> float:
            v = _quadrature(q, p, g, squared=True)
            return math.log(v) if v > 0 else -math.inf

    else:
        return None

    def root(log_v: float) -> float:
        """√(e^log_v): finite where the variance itself would overflow; +inf for a divergent
        second moment; refused where the finite standard deviation is beyond float64."""
        if log_v < 1419.0 or math.isinf(log_v):
            return math.exp(0.5 * log_v) if log_v < 1419.0 else math.inf
        raise KlestError(
            f"the exact stdev of {estimator}'s values is finite but about e^{0.5 * log_v:.6g}, "
            "beyond float64",
            argument="estimator",
        )

    def scale_of(m: float) -> float:
        return abs(m) if math.isfinite(m) and abs(m) > 1.0 else 1.0

    if estimator == "k_opt":
        # v = -L + λ*(r - 1): Var = Var(L) - Cov(L, r)²/Var(r), each moment of L scaled by s
        e = np.expm1
        mL = integ(lambda L: L)
        me = integ(lambda L: e(L))
        s = scale_of(mL)
        vL = integ(lambda L: (L - mL) / s, squared=True)  # Var(L)/s²
        log_ve = log_sq(lambda L: e(L) - me)
        if log_ve > 700.0:  # Var(r) = inf or huge: λ* = Cov/Var -> 0, k_opt tends to k1
            if math.isfinite(log_ve):  # the λ*-term's share of the variance is below 1e-300
                c = integ(lambda L: (L - mL) / s * (e(L) - me))
                if math.isfinite(c) and 2.0 * math.log(abs(c) + 1e-300) - log_ve > -650.0:
                    raise KlestError(
                        "k_opt's exact variance needs Cov(L, r)²/Var(r) beyond float64",
                        argument="estimator",
                    )
            return (-mL, s * math.sqrt(vL))
        ve = math.exp(log_ve)
        c = integ(lambda L: (L - mL) / s * (e(L) - me))  # Cov(L, r)/s
        lam = c * s / ve if ve > 0 else 1.0
        if ve > 0:
            mean = -mL + lam * me
            rest = vL - c * c / ve
            if rest > 1e-6 * vL:
                return (mean, s * math.sqrt(rest))
            # the λ*-term removes all but a sliver of Var(L) (p ≈ q: Var = μ²·μ²/2 for
            # N(μ, 1) against N(0, 1), below float64's resolution of μ²): integrate
            # v - E v = (λ* - 1)(r - 1) + (r - 1 - L) - E v directly
            s2 = scale_of(mean)
            dev = integ(
                lambda L: ((lam - 1.0) * e(L) + _per_sample_values("k3", L) - mean) / s2,
                squared=True,
            )
            return (mean, s2 * math.sqrt(dev))
        return (-mL, s * math.sqrt(vL))

    def v(L: np.ndarray) -> np.ndarray:
        return _per_sample_values(estimator, L)

    mean = integ(v)
    if not math.isfinite(mean):
        return (mean, math.inf)
    s = scale_of(mean)
    return (mean, s * root(log_sq(lambda L: (v(L) - mean) / s)))


def _linear_growth(g: Callable[[np.ndarray], np.ndarray]) -> Callable[[float], float] | None:
    """h with g(L) ≈ e^L·h(L) for large L, h(L) = c1·L + c0 (c0 = f*(0) for g = f(e^L) with
    f*(0) finite; c1 ≠ 0 for t log t, the forward KL); None where g grows faster (t²)."""
    xs = (300.0, 450.0, 600.0)
    with np.errstate(all="ignore"):
        r3, r4, r6 = (float(g(np.array([x]))[0]) / math.expm1(x) for x in xs)
    if not all(math.isfinite(v) for v in (r3, r4, r6)):
        return None
    c1 = (r6 - r3) / 300.0
    c0 = r3 - 300.0 * c1
    if abs(c0 + 450.0 * c1 - r4) > 1e-9 * max(1.0, abs(r4)):
        return None
    if abs(c1) < 1e-14:
        c1 = 0.0
    if abs(c0) < 1e-12:
        c0 = 0.0
    return lambda L: c1 * L + c0


#: Where L = log r exceeds this, q·g(L) is taken as h(L)·p (see :func:`_linear_growth`):
#: exact to about e^-600, and computable where q underflows but p does not (a Student-t p's
#: far tails, beyond |x| ≈ 38 for q = N(0, 1)).
_HUGE_L = 600.0
