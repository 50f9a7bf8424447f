r"""Ground truth D_f(p, q) = E_{x~q}[f(p(x)/q(x))] for a pair of distributions, with its source.

:func:`truth` tries, in order:

1. ``"torch registry"``: ``torch.distributions.kl_divergence`` when both are torch distributions
   (reverse and forward KL);
2. ``"closed form"``: the registry filled by :func:`register_truth` (most-specific dispatch on the
   two distribution types, as torch's ``register_kl``; the forward KL of (q, p) is looked up as
   the reverse KL of (p, q));
3. ``"exact sum"``: Σ_x q(x) f(p(x)/q(x)) over the support of a discrete q (for an unbounded
   support, the points carrying all but 1e-17 of q's mass);
4. ``"quadrature"``: adaptive Gauss-Kronrod (``scipy.integrate.quad``) over the support of a
   univariate continuous q, split at quantiles of both distributions;
5. ``"monte carlo"``: the last resort, a high-sample estimate with the tangent-corrected estimator,
   labelled approximate and carrying its standard error.

A pair whose truth is +inf (p = 0 on part of q's support for the reverse KL) comes back as
``value = inf`` with source ``"support mismatch"``. Mass m that p puts where q has none counts
f*(0)·m in D_f, with f*(0) = lim f(t)/t: where f*(0) = +inf (forward KL, χ², α > 1) that raises
:class:`klest.KlestError`, since no estimator that samples q can see it; where it is finite
(TV 1/2, Hellinger 1, JS log 2 / 2, α < 1) it is added to the value, and estimators that sample q
show the bias it causes. Supports are compared as unions of intervals: the gap between two
mixture components is not support.

>>> from klest.lab import parse
>>> t = truth(parse("normal(0, 1)"), parse("normal(1, 1)"))
>>> t.value, t.source
(0.5, 'closed form')
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import klest
from klest import FDivergence, KlestError

from . import distributions as D

__all__ = [
    "Truth",
    "estimator_target",
    "exact_moments",
    "register_truth",
    "truth",
]


@dataclass(frozen=True)
class Truth:
    """A true divergence value, where it came from, and (Monte Carlo only) its standard error."""

    value: float
    source: str
    stderr: float = 0.0

    @property
    def approximate(self) -> bool:
        return self.source == "monte carlo"

    def describe(self) -> str:
        if self.approximate:
            return f"monte carlo ±{self.stderr:.2g} (approximate)"
        return self.source


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
def _normal_alpha_moment(q: D.Normal, p: D.Normal, a: float) -> float:
    """E_q[r^α] = ∫ p^α q^(1-α) for two normals (+inf where the integral diverges)."""
    s = a * q.scale**2 + (1 - a) * p.scale**2
    if s <= 0:
        return math.inf
    d = p.loc - q.loc
    log_m = (
        (1 - a) * math.log(p.scale)
        + a * math.log(q.scale)
        - 0.5 * math.log(s)
        - a * (1 - a) * d * d / (2 * s)
    )
    return math.exp(log_m) if log_m < 700 else math.inf


@register_truth(D.Normal, D.Normal, "reverse_kl")
def _kl_normal(q: D.Normal, p: D.Normal, div: FDivergence) -> float:
    return (
        math.log(p.scale / q.scale) + (q.scale**2 + (q.loc - p.loc) ** 2) / (2 * p.scale**2) - 0.5
    )


@register_truth(D.Normal, D.Normal, "chi2")
def _chi2_normal(q: D.Normal, p: D.Normal, div: FDivergence) -> float:
    return _normal_alpha_moment(q, p, 2.0) - 1.0


@register_truth(D.Normal, D.Normal, "squared_hellinger")
def _hellinger_normal(q: D.Normal, p: D.Normal, div: FDivergence) -> float:
    return 2.0 - 2.0 * _normal_alpha_moment(q, p, 0.5)


@register_truth(D.Normal, D.Normal, "alpha")
def _alpha_normal(q: D.Normal, p: D.Normal, div: FDivergence) -> float:
    a = dict(div.params)["alpha"]
    return (_normal_alpha_moment(q, p, a) - 1.0) / (a * (a - 1.0))


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


@register_truth(D.MultivariateNormal, D.MultivariateNormal, "reverse_kl")
def _kl_mvn(q: D.MultivariateNormal, p: D.MultivariateNormal, div: FDivergence) -> float:
    if q.dim != p.dim:
        raise KlestError(f"dimensions differ: q has {q.dim}, p has {p.dim}", argument="p")
    sq, sp = np.asarray(q.cov), np.asarray(p.cov)
    d = np.asarray(p.loc) - np.asarray(q.loc)
    sp_inv = np.linalg.inv(sp)
    _, ldp = np.linalg.slogdet(sp)
    _, ldq = np.linalg.slogdet(sq)
    return 0.5 * float(np.trace(sp_inv @ sq) + d @ sp_inv @ d - q.dim + ldp - ldq)


@register_truth(D.Exponential, D.Exponential, "reverse_kl")
def _kl_exp(q: D.Exponential, p: D.Exponential, div: FDivergence) -> float:
    return math.log(q.rate / p.rate) + p.rate / q.rate - 1.0


@register_truth(D.Gamma, D.Gamma, "reverse_kl")
def _kl_gamma(q: D.Gamma, p: D.Gamma, div: FDivergence) -> float:
    from scipy.special import digamma

    aq, bq, ap, bp = q.shape, q.rate, p.shape, p.rate
    return float(
        (aq - ap) * digamma(aq)
        - math.lgamma(aq)
        + math.lgamma(ap)
        + ap * (math.log(bq) - math.log(bp))
        + aq * (bp - bq) / bq
    )


@register_truth(D.Beta, D.Beta, "reverse_kl")
def _kl_beta(q: D.Beta, p: D.Beta, div: FDivergence) -> float:
    from scipy.special import betaln, digamma

    aq, bq, ap, bp = q.a, q.b, p.a, p.b
    return float(
        betaln(ap, bp)
        - betaln(aq, bq)
        + (aq - ap) * digamma(aq)
        + (bq - bp) * digamma(bq)
        + (ap - aq + bp - bq) * digamma(aq + bq)
    )


@register_truth(D.Laplace, D.Laplace, "reverse_kl")
def _kl_laplace(q: D.Laplace, p: D.Laplace, div: FDivergence) -> float:
    d = abs(q.loc - p.loc)
    return (
        math.log(p.scale / q.scale) + d / p.scale + q.scale / p.scale * math.exp(-d / q.scale) - 1
    )


@register_truth(D.Uniform, D.Uniform, "reverse_kl")
def _kl_uniform(q: D.Uniform, p: D.Uniform, div: FDivergence) -> float:
    if q.low < p.low or q.high > p.high:
        return math.inf
    return math.log((p.high - p.low) / (q.high - q.low))


@register_truth(D.Poisson, D.Poisson, "reverse_kl")
def _kl_poisson(q: D.Poisson, p: D.Poisson, div: FDivergence) -> float:
    return q.rate * math.log(q.rate / p.rate) + p.rate - q.rate


# ------------------------------------------------------------------------- the dispatcher
def truth(
    q: Any,
    p: Any,
    divergence: str | FDivergence = "reverse_kl",
    *,
    mc_samples: int = 4_000_000,
    seed: int = 0,
) -> Truth:
    """The true ``divergence`` between p and q (samples from q), with where it came from."""
    q = D.as_distribution(q)
    p = D.as_distribution(p)
    div = klest.get_divergence(divergence)
    if q.dim != p.dim:
        raise KlestError(f"q has dimension {q.dim} but p has dimension {p.dim}", argument="p")
    if q.discrete != p.discrete:
        raise KlestError(
            "one distribution is discrete and the other continuous: they have no common density",
            argument="p",
        )
    key = _key(div)
    mismatch, unseen = _support_mismatch(q, p, div)
    if mismatch is not None:
        return mismatch
    if isinstance(q, D.TorchDistribution) and isinstance(p, D.TorchDistribution):
        if key in ("reverse_kl", "forward_kl"):
            import torch

            a, b = (q, p) if key == "reverse_kl" else (p, q)
            try:
                with torch.no_grad():
                    v = float(torch.distributions.kl_divergence(a.dist, b.dist))
                return Truth(v, "torch registry")
            except NotImplementedError:
                pass
    exact = closed_form(q, p, div)
    if exact is None:
        tq, tp = _lab_twin(q), _lab_twin(p)
        if tq is not q or tp is not p:  # torch Normal/Normal: the lab's closed forms
            exact = closed_form(tq, tp, div)
    if exact is not None:
        return Truth(exact, "closed form")
    # E_q[f(r)] sees only q's support; p's mass elsewhere adds f*(0)·mass (``unseen``)
    if q.discrete and q.dim == 1:
        return Truth(_exact_sum(q, p, lambda L: _f_of(div, L)) + unseen, "exact sum")
    if D.is_univariate_continuous(q) and _has_quantiles(q):
        return Truth(_quadrature(q, p, lambda L: _f_of(div, L)) + unseen, "quadrature")
    return _monte_carlo(q, p, div, mc_samples, seed)


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
                return float(d.dist.cdf(torch.as_tensor(x, dtype=d.dist.mean.dtype)))

        try:
            tcdf(float(d.dist.mean))
        except (NotImplementedError, ValueError, RuntimeError):
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


def _support_mismatch(q: Any, p: Any, div: FDivergence) -> tuple[Truth | None, float]:
    """Where the supports differ: (+inf truth with source "support mismatch", 0) where q has mass
    where p has none and f(0) = +inf; an error where p puts mass where q has none and
    f*(0) = +inf (no estimator that samples q can see that mass); else (None, f*(0)·m), with m
    p's mass where q has none — the part of D_f that E_q[f(r)] misses (0 where the supports
    agree). Supports are compared as unions of intervals, so a gap between the components of a
    mixture counts."""
    if q.dim != 1:
        return None, 0.0
    outside = f"support mismatch: p = {p.spec} puts mass where q = {q.spec} has none"
    m, q_only = _unseen_mass(q, p)
    if q_only and math.isinf(div.f(0.0)):
        return Truth(math.inf, "support mismatch"), 0.0
    if m > 0.0:
        w = f_star_zero(div)
        if math.isinf(w):
            raise KlestError(
                outside + f", which no estimator that samples q can see (the true {div.name} "
                "is +inf)",
                argument="p",
            )
        return None, w * m
    return None, 0.0


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
    }
    make = makers.get(type(t))
    if make is None:
        return d
    try:
        return make()
    except (TypeError, ValueError, RuntimeError):  # batched parameters
        return d


def _f_of(div: FDivergence, L: np.ndarray) -> np.ndarray:
    """f(e^L) elementwise (f(0) where L = -inf), through the divergence's stable form."""
    import array_api_compat.numpy as npx

    # r = e^L overflows beyond L ≈ 709; there q is astronomically small and f(e^700) stands in
    # (an integrand that still matters there diverges anyway).
    L = np.minimum(np.asarray(L, dtype=np.float64), 700.0)
    with klest.options(validate=False), np.errstate(all="ignore"):
        return np.asarray(div.plain(npx, L), dtype=np.float64)


def _exact_sum(
    q: Any, p: Any, g: Callable[[np.ndarray], np.ndarray], *, squared: bool = False
) -> float:
    """Σ_x q(x) g(L(x)) over q's support. An unbounded support is summed over the points holding
    all but 1e-17 of q's and p's mass, then extended block by block until a block adds less than
    1e-17 of the total (a term like q·r⁴ can peak far beyond q's own bulk); +inf if it never
    settles within max(10⁶, 4 × its size) points past the bulk."""

    c = None if squared else _linear_growth(g)

    def terms(xs: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            lq = q.logpdf(xs)
            keep = lq > -np.inf
            lp = p.logpdf(xs[keep])
            if c is not None:  # q·g(L) = c·p where r is astronomically large (as in quadrature)
                L = lp - lq[keep]
                huge = L > _HUGE_L
                if np.any(huge):
                    out = np.zeros(len(lp))
                    out[huge] = [
                        c(float(v)) * math.exp(float(w))
                        for v, w in zip(L[huge], lp[huge], strict=True)
                    ]
                    rest = ~huge
                    out[rest] = _terms(lq[keep][rest], lp[rest])
                    return out
            return _terms(lq[keep], lp)

    def _terms(lq: np.ndarray, lp: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            if squared:  # q·g² as (√q·g)²: g² alone may overflow where the product does not
                w = np.exp(0.5 * lq)
                t = w * g(lp - lq)
                return np.where(w > 0, t * t, 0.0)
            w = np.exp(lq)
            # where q's mass underflows to 0 the term vanishes (as in the quadrature)
            return np.where(w > 0, w * g(lp - lq), 0.0)

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
    """∫ q·g(L) over q's support (∫ q·g(L)², computed as (√q·g)², with ``squared``)."""
    from scipy import integrate

    lo, hi = q.support

    c = None if squared else _linear_growth(g)

    def integrand(x: float) -> float:
        if not lo < x < hi:  # the support's end points carry no mass (and p may vanish there)
            return 0.0
        xa = np.array([x])
        with np.errstate(all="ignore"):
            lq = q.logpdf(xa)
            if not lq[0] > -np.inf:
                return 0.0
            lp = p.logpdf(xa)
            L0 = float(lp[0] - lq[0])
            if c is not None and L0 > _HUGE_L:
                return c(L0) * math.exp(float(lp[0]))  # q·g(L) = h(L)·p, even where q underflows
            w = float(np.exp(0.5 * lq[0] if squared else lq[0]))
            if w == 0.0:  # q underflows: a vanishing weight times whatever f(r) is
                return 0.0
            v = w * float(g(lp - lq)[0])
            if squared:
                v = v * v
        return v if not math.isnan(v) else math.inf

    edges = [lo, *_breakpoints(q, p), hi]
    total = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for a, b in itertools.pairwise(edges):
            if b <= a:
                continue
            val, _ = integrate.quad(integrand, a, b, epsabs=0.0, epsrel=1e-11, limit=200)
            total += val
    return total


def _monte_carlo(q: Any, p: Any, div: FDivergence, n: int, seed: int) -> Truth:
    from .engine import run

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
    which it estimates with a bias; forward_* against the forward KL)."""
    if estimator in ("k1", "k2", "k3", "k_opt", "k_opt_crossfit"):
        return "reverse_kl"
    if estimator in ("forward_k1", "forward_k3"):
        return "forward_kl"
    return klest.get_divergence(estimator).name


def _per_sample_values(estimator: str, L: np.ndarray) -> np.ndarray:
    import array_api_compat.numpy as npx

    from klest.stats import per_sample

    _, fn = per_sample(estimator)
    L = np.minimum(np.asarray(L, dtype=np.float64), 700.0)  # as in _f_of
    with klest.options(validate=False), np.errstate(all="ignore"):
        return np.asarray(fn(npx, L), dtype=np.float64)


def exact_moments(q: Any, p: Any, estimator: str) -> tuple[float, float] | None:
    """(E_q[v], Var_q[v]) of the per-sample values v of ``estimator``, by exact sum (discrete q)
    or quadrature (univariate continuous q); Var may be +inf. None where neither applies.

    The optimal-λ estimator is taken at its population λ* = Cov(L, r)/Var(r) (its large-n limit).
    Infinite variance is detected by the tail behaviour of q·v² far in q's tails (see
    :func:`_second_moment_diverges`) before integrating.
    """
    q = D.as_distribution(q)
    p = D.as_distribution(p)
    if q.dim != 1 or (isinstance(q, D.TorchDistribution) and not q.discrete):
        return None
    if estimator == "k_opt_crossfit":
        estimator = "k_opt"
    if q.discrete:

        def integ(g: Callable[[np.ndarray], np.ndarray], squared: bool = False) -> float:
            return _exact_sum(q, p, g, squared=squared)

        def diverges(g: Callable[[np.ndarray], np.ndarray]) -> bool:
            return False

    elif _has_quantiles(q) and _has_quantiles(p):

        def integ(g: Callable[[np.ndarray], np.ndarray], squared: bool = False) -> float:
            return _quadrature(q, p, g, squared=squared)

        def diverges(g: Callable[[np.ndarray], np.ndarray]) -> bool:
            return _second_moment_diverges(q, p, g)

    else:
        return None
    if estimator == "k_opt":
        e = np.expm1
        mL = integ(lambda L: L)
        me = integ(lambda L: e(L))
        vL = integ(lambda L: L - mL, squared=True)
        if diverges(lambda L: e(L)):  # Var(r) = inf: λ* = Cov/Var = 0, k_opt tends to k1
            return (-mL, vL)
        ve = integ(lambda L: e(L) - me, squared=True)
        c = integ(lambda L: (L - mL) * (e(L) - me))
        lam = c / ve if ve > 0 else 1.0
        return (-mL + lam * me, max(vL - c * c / ve, 0.0) if ve > 0 else vL)

    def v(L: np.ndarray) -> np.ndarray:
        return _per_sample_values(estimator, L)

    mean = integ(v)
    if diverges(v):
        return (mean, math.inf)
    var = integ(lambda L: v(L) - mean, squared=True)
    return (mean, var)


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


def _second_moment_diverges(q: Any, p: Any, g: Callable[[np.ndarray], np.ndarray]) -> bool:
    """True when ∫ q·g(L)² dx looks infinite.

    A convergent integral needs d(x)·q(x)·g(L(x))² → 0 where d is the distance to an end of the
    support (|x| for an unbounded end). At each end the product is evaluated at two distances
    and divergence is marked when it does not shrink (by at least half) towards the end: on an
    unbounded end at the 1e-150 and 1e-300 tail quantiles of q (of each component of a mixture),
    on a finite end at two small distances. So q = N(0, 1), p = Student-t has ∫ q·r² = ∞ at ±∞,
    q = Beta(2, 3), p = Uniform(0, 1) at x = 0, while q = N(0, 1), p = N(0, 1.4) (q·r² shrinks
    like e^{-0.01x²}) is finite however slowly it decays.
    """
    lo, hi = q.support
    pairs: list[tuple[np.ndarray, np.ndarray, float]] = []  # (points, distances, threshold)
    comps = list(q.components) if isinstance(q, D.Mixture) else [q]
    for c in comps:
        s = c.scipy()
        if s is None:
            return False
        for end, tail in ((lo, s.ppf), (hi, s.isf)):
            if math.isinf(end):
                xs = np.array([float(tail(1e-150)), float(tail(1e-300))])
                if np.all(np.isfinite(xs)) and np.all((xs > lo) & (xs < hi)) and xs[0] != xs[1]:
                    pairs.append((xs, np.abs(xs) + 1.0, -math.inf))
    for end, side in ((lo, 1.0), (hi, -1.0)):
        if math.isfinite(end):
            scale = 1.0 if end == 0 else abs(end)
            d1, d2 = (1e-150, 1e-300) if end == 0 else (1e-8 * scale, 4e-16 * scale)
            xs = np.array([end + side * d1, end + side * d2])
            pairs.append((xs, np.array([d1, d2]), math.log(1e-12)))
    for xs, ds, floor in pairs:
        with np.errstate(all="ignore"):
            lq = q.logpdf(xs)
            gv = np.abs(g(p.logpdf(xs) - lq))
            h = np.log(ds) + lq + 2 * np.log(gv)
        if np.any(np.isinf(gv) & (lq > -np.inf)):
            return True
        if np.any(np.isnan(h)):
            continue
        if h[1] == math.inf:
            return True
        if math.isfinite(h[1]) and h[1] > floor and h[1] >= h[0] - math.log(2.0):
            return True
    return False
