r"""Distributions the lab can sample from and evaluate: a small NumPy implementation of each family.

Every distribution offers ``sample(rng, n)`` (a NumPy ``Generator``; shape ``(n,)`` or ``(n, d)``),
``logpdf(x)`` (log density, or log mass for discrete ones; ``-inf`` outside the support) and
``spec`` (the canonical spec string, e.g. ``normal(0.1, 1)``). One-dimensional continuous families
also give their ``support`` and a frozen SciPy twin (``scipy()``, imported lazily) for quantiles
used by quadrature. Discrete families give ``enumerate_support(tol)``: the points that carry all
but ``tol`` of the mass, for exact sums.

Users can bring their own: :class:`ScipyDistribution` wraps a SciPy frozen distribution and
:class:`TorchDistribution` a ``torch.distributions.Distribution`` (torch is imported only when
such an object is passed); :func:`klest.lab.specs.as_distribution` picks the wrapper, or parses a
spec string. This module builds distributions and knows nothing of the spec language (the specs
module imports it, never the reverse).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from klest import KlestError

__all__ = [
    "Beta",
    "Categorical",
    "Distribution",
    "Exponential",
    "Gamma",
    "Laplace",
    "Logistic",
    "Mixture",
    "MultivariateNormal",
    "Normal",
    "Poisson",
    "ScipyDistribution",
    "StudentT",
    "TorchDistribution",
    "Uniform",
    "wrap",
]

_LOG_2PI = math.log(2 * math.pi)
_TINY = float(np.nextafter(0.0, 1.0))  # the smallest positive double
_BELOW_ONE = float(np.nextafter(1.0, 0.0))


def _log_distance(end: float, side: float, t: np.ndarray, loc: float) -> np.ndarray:
    """log|x - loc| at x = end + side·e^t, without forming x where e^t is huge or tiny."""
    t = np.asarray(t, dtype=np.float64)
    delta = end - loc
    if delta == 0.0:
        return t
    with np.errstate(all="ignore"):
        ld = math.log(abs(delta))
        # x - loc = e^t·(side + delta·e^-t) where e^t dominates, delta·(1 + side·e^t/delta) else
        big = t > ld
        tb = np.where(big, t, ld + 1.0)
        ts = np.where(big, ld - 1.0, t)
        far = tb + np.log(np.abs(side + delta * np.exp(-tb)))
        near = ld + np.log(np.abs(1.0 + side * np.exp(ts) / delta))
        return np.where(big, far, near)


def log_gamma_ratio_remainder(x: float) -> float:
    """R(x) = log Γ(x + ½) - log Γ(x) - ½ log x, without cancellation for large x.

    For x >= 30 the asymptotic series -1/(8x) + 1/(192x³) - 1/(640x⁵) + 17/(14336x⁷)
    - 31/(18432x⁹) + 691/(180224x¹¹) (next term below 1e-19 relative there); else lgamma.
    """
    if x < 30.0:
        return math.lgamma(x + 0.5) - math.lgamma(x) - 0.5 * math.log(x)
    y = 1.0 / (x * x)
    series = (-1 / 8) + y * (
        1 / 192 + y * (-1 / 640 + y * (17 / 14336 + y * (-31 / 18432 + y * 691 / 180224)))
    )
    return series / x


def _fmt(v: float) -> str:
    """The shortest text that reads back as exactly v (repr), '1' rather than '1.0'."""
    s = repr(float(v))
    return s[:-2] if s.endswith(".0") else s


def _lgamma_diff(a: float, b: float) -> float:
    """log Γ(a) - log Γ(b); for arguments below 1 as log Γ(a+1) - log Γ(b+1) + log(b/a), whose
    log(b/a) is exact where each log Γ (about -log a) is large."""
    if a < 1.0 or b < 1.0:
        return math.lgamma(a + 1.0) - math.lgamma(b + 1.0) + math.log(b / a)
    d = b - a
    if 0.0 < abs(d) < 0.1 * a:
        # -Σ_k ψ^(k-1)(a)·d^k/k!: the two log Γ (~ a log a: 1.4e7 at a = 1e6) cancel to
        # ~d·ψ(a), leaving their rounding in L (gamma(1e6) vs gamma(1e6 + 1): KL = 5e-7)
        from scipy.special import polygamma

        total, fact = 0.0, 1.0
        for k in range(1, 60):
            fact *= k
            term = float(polygamma(k - 1, a)) * d**k / fact
            total -= term
            if abs(term) <= 1e-17 * abs(total):
                break
        return total
    return math.lgamma(a) - math.lgamma(b)


def _gamma_log_ratio(q: tuple[float, float], p: tuple[float, float], t: np.ndarray) -> np.ndarray:
    """L = log p(x) - log q(x) for two gamma laws (shape, rate) at x = e^t:
    (a_p - a_q)·t + (a_p - a_q)·log b_p + a_q·log(b_p/b_q) + log Γ(a_q) - log Γ(a_p)
    - (b_p - b_q)·e^t, with no term of the size 1/a that each log density has near 0."""
    (aq, bq), (ap, bp) = q, p
    t = np.asarray(t, dtype=np.float64)
    c = (ap - aq) * math.log(bp) + aq * math.log(bp / bq) + _lgamma_diff(aq, ap)
    out = (ap - aq) * t + c
    if bp != bq:
        with np.errstate(over="ignore"):
            out = out - (bp - bq) * np.exp(t)
    return out


def _lbeta_diff(q: tuple[float, float], p: tuple[float, float]) -> float:
    """log B(a_q, b_q) - log B(a_p, b_p), as three log Γ differences."""
    (aq, bq), (ap, bp) = q, p
    return _lgamma_diff(aq, ap) + _lgamma_diff(bq, bp) - _lgamma_diff(aq + bq, ap + bp)


class Distribution:
    """Base class. Subclasses set ``name`` and implement ``sample`` and ``logpdf``."""

    name: str = "distribution"
    discrete: bool = False
    dim: int = 1  # 1 for univariate; d for a d-variate distribution
    singular: bool = False  # log_density_t has its own formula (see log_ratio_at)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def logpdf(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    @property
    def spec(self) -> str:  # pragma: no cover
        raise NotImplementedError

    @property
    def support(self) -> tuple[float, float]:
        """Closed hull (lo, hi) of the support of a univariate distribution."""
        return (-math.inf, math.inf)

    def support_intervals(self) -> list[tuple[float, float]]:
        """The support of a univariate distribution as disjoint closed intervals, in order (one
        interval, the hull, for every family but a mixture whose components leave gaps)."""
        return [self.support]

    def scipy(self) -> Any:
        """A frozen SciPy distribution with the same law (univariate families only), or None."""
        return None

    def logpdf_at(self, end: float, side: float, t: np.ndarray) -> np.ndarray:
        """log density at x = end + side·e^t (univariate), for any real t: the coordinate in
        which ground truth integrates far tails (end = 0, t → +∞) and the neighbourhood of a
        finite end of the support (t → -∞), where x itself is not representable.

        This default evaluates :meth:`logpdf` where x is representable (finite, distinct from
        ``end``, e^t at most e^100) and continues the log density linearly in t beyond — exact
        for power-law tails and x^(a-1) singularities; the lab's families override it with their
        exact formulas.
        """
        t = np.asarray(t, dtype=np.float64)
        t_hi = 100.0
        t_lo = -740.0 if end == 0 else math.log(abs(end)) - 20.0  # distance exact to ~1e-7
        inside = (t >= t_lo) & (t <= t_hi)
        out = np.full(t.shape, np.nan)
        if np.any(inside):
            out[inside] = self._logpdf_offset(end, side, t[inside])
        for edge, other in ((t_hi, t_hi - 5.0), (t_lo, t_lo + 5.0)):
            far = (t > t_hi) if edge == t_hi else (t < t_lo)
            if not np.any(far):
                continue
            with np.errstate(all="ignore"):
                xs = end + side * np.exp(np.array([edge, other]))
                ref = np.log(side * (xs - end))  # the distances x actually has
                y = np.asarray(self.logpdf(xs), dtype=np.float64)
                slope = (y[0] - y[1]) / (ref[0] - ref[1])
                ext = y[0] + slope * (t[far] - ref[0])
            out[far] = ext if np.all(np.isfinite(y)) else np.where(y[0] == -np.inf, -np.inf, np.nan)
        return out

    def _logpdf_offset(self, end: float, side: float, t: np.ndarray) -> np.ndarray:
        x = end + side * np.exp(t)
        with np.errstate(all="ignore"):
            return np.asarray(self.logpdf(x), dtype=np.float64)

    def log_ratio(self, p: Distribution, x: np.ndarray) -> np.ndarray:
        """L(x) = log p(x) - log self(x), by default the difference of the two log densities;
        families whose log densities share large terms that cancel in L (Poisson pairs: the
        log x! of size x log x) override it with L's own formula."""
        with np.errstate(all="ignore"):
            lp = np.asarray(p.logpdf(x), dtype=np.float64)
            return lp - np.asarray(self.logpdf(x), dtype=np.float64)

    def log_ratio_at(self, p: Distribution, end: float, side: float, t: np.ndarray) -> np.ndarray:
        """L = log p(x) - log self(x) at x = end + side·e^t (the coordinate of
        :meth:`logpdf_at`): the difference of the two ``logpdf_at``, or, where either side has
        an x^(a-1) singularity in t-form (``singular``: a gamma or beta, or a mixture with one),
        of the two ``log_density_t``, in which the (a - 1)·t of size 1/a that the log densities
        share is gone. Same-family pairs override it with L's own formula."""
        with np.errstate(all="ignore"):
            if self.singular or p.singular:
                lp = np.asarray(p.log_density_t(end, side, t), dtype=np.float64)
                return lp - np.asarray(self.log_density_t(end, side, t), dtype=np.float64)
            lp = np.asarray(p.logpdf_at(end, side, t), dtype=np.float64)
            return lp - np.asarray(self.logpdf_at(end, side, t), dtype=np.float64)

    def log_density_t(self, end: float, side: float, t: np.ndarray) -> np.ndarray:
        """log of the density of t = log|x - end| (x = end + side·e^t): log self(x) + t. Gamma
        and beta override it with a formula in which the x^(a-1) singularity's (a - 1)·t and
        the Jacobian's t are one term a·t (each alone is of size 1/a near 0: 1e30 for
        a = 1e-30, where their sum is O(1))."""
        t = np.asarray(t, dtype=np.float64)
        return np.asarray(self.logpdf_at(end, side, t), dtype=np.float64) + t

    def t_scale(self, end: float, side: float) -> float:
        """How far in t = log|x - end| the mass spreads toward ``end`` (1 for every family but a
        small-shape gamma or beta, whose density in t falls like e^(a·t): 1/a)."""
        return 1.0

    def log_ratios(self, rng: np.random.Generator, n: int, ps: Any) -> list[np.ndarray]:
        """n draws x ~ self and, for each p in ``ps``, L = log p(x) - log self(x) (common draws),
        through :meth:`log_ratio`. Families whose draws can fall where x is not representable
        (small-shape gamma and beta near 0 or 1) override this to draw t = log|x - end| and
        evaluate :meth:`log_ratio_at`."""
        x = self.sample(rng, n)
        return [np.asarray(self.log_ratio(p, x), dtype=np.float64) for p in ps]

    def enumerate_support(self, tol: float = 1e-17) -> np.ndarray:
        """Discrete families: integer points holding all but ``tol`` of the mass."""
        raise KlestError(f"{self.spec} is not discrete", argument="q")

    def __repr__(self) -> str:
        return self.spec

    def __str__(self) -> str:
        return self.spec


# ------------------------------------------------------------------------------ continuous
@dataclass(frozen=True, repr=False)
class Normal(Distribution):
    """N(loc, scale²)."""

    loc: float = 0.0
    scale: float = 1.0
    name = "normal"

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        x = rng.standard_normal(n)
        if self.scale != 1.0:
            x *= self.scale
        if self.loc != 0.0:
            x += self.loc
        return x

    def logpdf(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, dtype=np.float64) - self.loc) / self.scale
        return -0.5 * z * z - (math.log(self.scale) + 0.5 * _LOG_2PI)

    def logpdf_at(self, end: float, side: float, t: np.ndarray) -> np.ndarray:
        lz = _log_distance(end, side, t, self.loc) - math.log(self.scale)
        with np.errstate(over="ignore"):
            return -0.5 * np.exp(2.0 * lz) - (math.log(self.scale) + 0.5 * _LOG_2PI)

    def log_ratio(self, p: Distribution, x: np.ndarray) -> np.ndarray:
        """For a normal p: L = log(s_q/s_p) - (z_p - z_q)(z_p + z_q)/2 with z = (x - m)/s and
        z_p - z_q = (x(s_q - s_p) + m_q s_p - m_p s_q)/(s_p s_q), free of the O(z²) terms that
        cancel in the difference of the log densities (p = N(1e-9, 1) against q = N(0, 1):
        L = 1e-9·x - 5e-19, which that difference gets wrong by ~1e-16)."""
        if not isinstance(p, Normal):
            return super().log_ratio(p, x)
        x = np.asarray(x, dtype=np.float64)
        sq, sp, mq, mp = self.scale, p.scale, self.loc, p.loc
        with np.errstate(all="ignore"):
            d = (x * (sq - sp) + (mq * sp - mp * sq)) / (sp * sq)
            s = (x - mp) / sp + (x - mq) / sq
            out = math.log1p((sq - sp) / sp) - 0.5 * d * s
        bad = ~np.isfinite(out)
        if np.any(bad):  # x beyond float64's reach of the formula: the two log densities
            out = np.where(bad, super().log_ratio(p, x), out)
        return out

    def log_ratio_at(self, p: Distribution, end: float, side: float, t: np.ndarray) -> np.ndarray:
        """For a normal p, :meth:`log_ratio` at x = end + side·e^t where x is finite."""
        if not isinstance(p, Normal):
            return super().log_ratio_at(p, end, side, t)
        t = np.asarray(t, dtype=np.float64)
        with np.errstate(all="ignore"):
            x = end + side * np.exp(t)
            out = self.log_ratio(p, np.where(np.isfinite(x), x, 0.0))
        bad = ~np.isfinite(x) | ~np.isfinite(out)
        if np.any(bad):
            out = np.where(bad, super().log_ratio_at(p, end, side, t), out)
        return out

    @property
    def spec(self) -> str:
        return f"normal({_fmt(self.loc)}, {_fmt(self.scale)})"

    def scipy(self) -> Any:
        from scipy import stats

        return stats.norm(self.loc, self.scale)


@dataclass(frozen=True, repr=False)
class StudentT(Distribution):
    """Student's t with ``df`` degrees of freedom, location and scale."""

    df: float = 1.0
    loc: float = 0.0
    scale: float = 1.0
    name = "student_t"

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.loc + self.scale * rng.standard_t(self.df, n)

    def log_normaliser(self) -> float:
        """log Γ((ν+1)/2) - log Γ(ν/2) - ½ log(νπ) - log scale, accurate for any ν: for large ν
        as -½ log 2π + R(ν/2) - log scale with R(x) = log Γ(x+½) - log Γ(x) - ½ log x from its
        asymptotic series (two lgamma of size ν log ν would cancel to 1e-10 absolute at
        ν = 1e5)."""
        return -0.5 * _LOG_2PI + log_gamma_ratio_remainder(self.df / 2) - math.log(self.scale)

    def logpdf(self, x: np.ndarray) -> np.ndarray:
        nu = self.df
        z = (np.asarray(x, dtype=np.float64) - self.loc) / self.scale
        return self.log_normaliser() - (nu + 1) / 2 * np.log1p(z * z / nu)

    def logpdf_at(self, end: float, side: float, t: np.ndarray) -> np.ndarray:
        nu = self.df
        # log(z²/ν), then log1p(e^v) without overflow
        v = 2.0 * (_log_distance(end, side, t, self.loc) - math.log(self.scale)) - math.log(nu)
        with np.errstate(over="ignore"):
            l1p = np.where(v > 30.0, v + np.log1p(np.exp(-np.abs(v))), np.log1p(np.exp(v)))
        return self.log_normaliser() - (nu + 1) / 2 * l1p

    @property
    def spec(self) -> str:
        return f"student_t({_fmt(self.df)}, {_fmt(self.loc)}, {_fmt(self.scale)})"

    def scipy(self) -> Any:
        from scipy import stats

        return stats.t(self.df, self.loc, self.scale)


@dataclass(frozen=True, repr=False)
class Laplace(Distribution):
    """Laplace (double exponential) with location and scale."""

    loc: float = 0.0
    scale: float = 1.0
    name = "laplace"

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.laplace(self.loc, self.scale, n)

    def logpdf(self, x: np.ndarray) -> np.ndarray:
        z = np.abs(np.asarray(x, dtype=np.float64) - self.loc) / self.scale
        return -z - math.log(2 * self.scale)

    def logpdf_at(self, end: float, side: float, t: np.ndarray) -> np.ndarray:
        lz = _log_distance(end, side, t, self.loc) - math.log(self.scale)
        with np.errstate(over="ignore"):
            return -np.exp(lz) - math.log(2 * self.scale)

    @property
    def spec(self) -> str:
        return f"laplace({_fmt(self.loc)}, {_fmt(self.scale)})"

    def scipy(self) -> Any:
        from scipy import stats

        return stats.laplace(self.loc, self.scale)


@dataclass(frozen=True, repr=False)
class Logistic(Distribution):
    """Logistic with location and scale."""

    loc: float = 0.0
    scale: float = 1.0
    name = "logistic"

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.logistic(self.loc, self.scale, n)

    def logpdf(self, x: np.ndarray) -> np.ndarray:
        z = -np.abs(np.asarray(x, dtype=np.float64) - self.loc) / self.scale
        return z - 2 * np.log1p(np.exp(z)) - math.log(self.scale)

    def logpdf_at(self, end: float, side: float, t: np.ndarray) -> np.ndarray:
        lz = _log_distance(end, side, t, self.loc) - math.log(self.scale)
        with np.errstate(over="ignore", under="ignore"):
            z = np.exp(lz)
            return -z - 2 * np.log1p(np.exp(-z)) - math.log(self.scale)

    @property
    def spec(self) -> str:
        return f"logistic({_fmt(self.loc)}, {_fmt(self.scale)})"

    def scipy(self) -> Any:
        from scipy import stats

        return stats.logistic(self.loc, self.scale)


@dataclass(frozen=True, repr=False)
class Exponential(Distribution):
    """Exponential with ``rate`` (mean 1/rate), support [0, ∞)."""

    rate: float = 1.0
    name = "exponential"

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.exponential(1.0 / self.rate, n)

    def logpdf(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            return np.where(x >= 0, math.log(self.rate) - self.rate * x, -np.inf)

    def logpdf_at(self, end: float, side: float, t: np.ndarray) -> np.ndarray:
        if end != 0.0 or side < 0:
            return super().logpdf_at(end, side, t)
        with np.errstate(over="ignore"):
            return math.log(self.rate) - self.rate * np.exp(np.asarray(t, dtype=np.float64))

    def log_ratio_at(self, p: Distribution, end: float, side: float, t: np.ndarray) -> np.ndarray:
        pp = _gamma_params(p)
        if pp is None or end != 0.0 or side < 0:
            return super().log_ratio_at(p, end, side, t)
        return _gamma_log_ratio((1.0, self.rate), pp, t)

    @property
    def spec(self) -> str:
        return f"exponential({_fmt(self.rate)})"

    @property
    def support(self) -> tuple[float, float]:
        return (0.0, math.inf)

    def scipy(self) -> Any:
        from scipy import stats

        return stats.expon(scale=1.0 / self.rate)


@dataclass(frozen=True, repr=False)
class Gamma(Distribution):
    """Gamma with ``shape`` (concentration) and ``rate`` (mean shape/rate), support [0, ∞)."""

    shape: float = 1.0
    rate: float = 1.0
    name = "gamma"
    singular = True

    def log_sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """log x for n draws: for shape a < 1 as log G(a+1) + log(U)/a (G(a) = G(a+1)·U^(1/a)),
        whose small values (e^-1000 and less for a = 0.01) x itself cannot hold."""
        a = self.shape
        if a >= 1.0:
            return np.log(rng.gamma(a, 1.0, n)) - math.log(self.rate)
        g = rng.gamma(a + 1.0, 1.0, n)
        u = rng.random(n)
        with np.errstate(divide="ignore"):
            lu = np.log(u)
        lu = np.where(u > 0, lu, math.log(2.0**-53))  # u = 0 has probability 2^-53 per draw
        return np.log(g) + lu / a - math.log(self.rate)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        # x > 0 always: a draw below the smallest positive double is held at it (its log-ratio
        # is exact through log_ratios, which works with log x)
        return np.maximum(np.exp(self.log_sample(rng, n)), _TINY)

    def log_ratios(self, rng: np.random.Generator, n: int, ps: Any) -> list[np.ndarray]:
        t = self.log_sample(rng, n)
        return [np.asarray(self.log_ratio_at(p, 0.0, 1.0, t), dtype=np.float64) for p in ps]

    def log_ratio_at(self, p: Distribution, end: float, side: float, t: np.ndarray) -> np.ndarray:
        """For a gamma or exponential p, L from its own formula (:func:`_gamma_log_ratio`)."""
        pp = _gamma_params(p)
        if pp is None or end != 0.0 or side < 0:
            return super().log_ratio_at(p, end, side, t)
        return _gamma_log_ratio((self.shape, self.rate), pp, t)

    def log_density_t(self, end: float, side: float, t: np.ndarray) -> np.ndarray:
        """a·log b - log Γ(a) + a·t - b·e^t, the density of t = log x."""
        if end != 0.0 or side < 0:
            return super().log_density_t(end, side, t)
        a, b = self.shape, self.rate
        t = np.asarray(t, dtype=np.float64)
        with np.errstate(over="ignore"):
            return a * math.log(b) - math.lgamma(a) + a * t - b * np.exp(t)

    def t_scale(self, end: float, side: float) -> float:
        return max(1.0, 1.0 / self.shape) if end == 0.0 and side > 0 else 1.0

    def logpdf(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        a, b = self.shape, self.rate
        pos = x > 0
        xs = np.where(pos, x, 1.0)
        val = a * math.log(b) - math.lgamma(a) + (a - 1) * np.log(xs) - b * xs
        return np.where(pos, val, -np.inf)

    def logpdf_at(self, end: float, side: float, t: np.ndarray) -> np.ndarray:
        if end != 0.0 or side < 0:
            return super().logpdf_at(end, side, t)
        a, b = self.shape, self.rate
        t = np.asarray(t, dtype=np.float64)
        with np.errstate(over="ignore"):
            return a * math.log(b) - math.lgamma(a) + (a - 1) * t - b * np.exp(t)

    @property
    def spec(self) -> str:
        return f"gamma({_fmt(self.shape)}, {_fmt(self.rate)})"

    @property
    def support(self) -> tuple[float, float]:
        return (0.0, math.inf)

    def scipy(self) -> Any:
        from scipy import stats

        return stats.gamma(self.shape, scale=1.0 / self.rate)


@dataclass(frozen=True, repr=False)
class Beta(Distribution):
    """Beta(a, b) on [0, 1]."""

    a: float = 1.0
    b: float = 1.0
    name = "beta"
    singular = True

    def _log_draws(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(log x, log(1 - x)) for n draws, x = G_a/(G_a + G_b) with the gamma draws taken in
        log space (see :meth:`Gamma.log_sample`), so that neither end rounds to 0 or 1."""
        la = Gamma(self.a).log_sample(rng, n)
        lb = Gamma(self.b).log_sample(rng, n)
        ls = np.logaddexp(la, lb)
        return la - ls, lb - ls

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        lx, l1x = self._log_draws(rng, n)
        x = np.where(lx < -math.log(2.0), np.exp(lx), -np.expm1(l1x))
        return np.clip(x, _TINY, _BELOW_ONE)  # inside (0, 1) always

    def log_ratios(self, rng: np.random.Generator, n: int, ps: Any) -> list[np.ndarray]:
        lx, l1x = self._log_draws(rng, n)
        low = lx < -math.log(2.0)  # distance to 0 (t = log x) or to 1 (t = log(1 - x))
        t0, t1 = np.where(low, lx, -1.0), np.where(low, -1.0, l1x)
        return [
            np.where(
                low,
                np.asarray(self.log_ratio_at(p, 0.0, 1.0, t0), dtype=np.float64),
                np.asarray(self.log_ratio_at(p, 1.0, -1.0, t1), dtype=np.float64),
            )
            for p in ps
        ]

    def _near(self, end: float, side: float) -> tuple[float, float] | None:
        """(the parameter of the end x = end + side·e^t approaches, the other one), or None
        for a coordinate that is not the distance to 0 or to 1."""
        if (end, side) == (0.0, 1.0):
            return self.a, self.b
        if (end, side) == (1.0, -1.0):
            return self.b, self.a
        return None

    def log_ratio_at(self, p: Distribution, end: float, side: float, t: np.ndarray) -> np.ndarray:
        """For a beta p (or uniform(0, 1)): (n_p - n_q)·t + (o_p - o_q)·log(1 - e^t)
        + log B(q) - log B(p), n the parameter of the near end and o the other."""
        pb = _beta_params(p)
        mine = self._near(end, side)
        if pb is None or mine is None:
            return super().log_ratio_at(p, end, side, t)
        theirs = pb if (end, side) == (0.0, 1.0) else (pb[1], pb[0])
        t = np.asarray(t, dtype=np.float64)
        with np.errstate(all="ignore"):
            ts = np.minimum(t, -1e-300)
            out = (theirs[0] - mine[0]) * ts + _lbeta_diff((self.a, self.b), pb)
            if theirs[1] != mine[1]:
                out = out + (theirs[1] - mine[1]) * np.log1p(-np.exp(ts))
        return out

    def log_density_t(self, end: float, side: float, t: np.ndarray) -> np.ndarray:
        """n·t + (o - 1)·log(1 - e^t) - log B(a, b), the density of t = log(distance)."""
        near = self._near(end, side)
        if near is None:
            return super().log_density_t(end, side, t)
        t = np.asarray(t, dtype=np.float64)
        with np.errstate(all="ignore"):
            ts = np.minimum(t, -1e-300)
            val = near[0] * ts + (near[1] - 1) * np.log1p(-np.exp(ts)) - self._lbeta()
        return np.where(t < 0, val, -np.inf)

    def t_scale(self, end: float, side: float) -> float:
        near = self._near(end, side)
        return 1.0 if near is None else max(1.0, 1.0 / near[0])

    def _lbeta(self) -> float:
        a, b = self.a, self.b
        return _lgamma_diff(a, a + b) + math.lgamma(b)

    def logpdf(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        inside = (x > 0) & (x < 1)
        xs = np.where(inside, x, 0.5)
        val = (self.a - 1) * np.log(xs) + (self.b - 1) * np.log1p(-xs) - self._lbeta()
        return np.where(inside, val, -np.inf)

    def logpdf_at(self, end: float, side: float, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        if (end, side) == (0.0, 1.0):
            near, other = self.a, self.b
        elif (end, side) == (1.0, -1.0):
            near, other = self.b, self.a
        else:
            return super().logpdf_at(end, side, t)
        with np.errstate(all="ignore"):
            ts = np.minimum(t, -1e-300)
            val = (near - 1) * ts + (other - 1) * np.log1p(-np.exp(ts)) - self._lbeta()
        return np.where(t < 0, val, -np.inf)

    @property
    def spec(self) -> str:
        return f"beta({_fmt(self.a)}, {_fmt(self.b)})"

    @property
    def support(self) -> tuple[float, float]:
        return (0.0, 1.0)

    def scipy(self) -> Any:
        from scipy import stats

        return stats.beta(self.a, self.b)


@dataclass(frozen=True, repr=False)
class Uniform(Distribution):
    """Uniform on [low, high]."""

    low: float = 0.0
    high: float = 1.0
    name = "uniform"

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.uniform(self.low, self.high, n)

    def logpdf(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        inside = (x >= self.low) & (x <= self.high)
        return np.where(inside, -math.log(self.high - self.low), -np.inf)

    @property
    def spec(self) -> str:
        return f"uniform({_fmt(self.low)}, {_fmt(self.high)})"

    @property
    def support(self) -> tuple[float, float]:
        return (self.low, self.high)

    def scipy(self) -> Any:
        from scipy import stats

        return stats.uniform(self.low, self.high - self.low)


@dataclass(frozen=True, repr=False)
class MultivariateNormal(Distribution):
    """N(loc, cov) in d dimensions (cov symmetric positive definite)."""

    loc: tuple[float, ...] = (0.0,)
    cov: tuple[tuple[float, ...], ...] = ((1.0,),)
    name = "mvnormal"
    _chol: np.ndarray = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        cov = np.asarray(self.cov, dtype=np.float64)
        object.__setattr__(self, "_chol", np.linalg.cholesky(cov))

    @property
    def dim(self) -> int:  # type: ignore[override]
        return len(self.loc)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        z = rng.standard_normal((n, self.dim))
        x = z @ self._chol.T + np.asarray(self.loc)
        # one dimension: shape (n,) like the univariate families, so that the two mix
        return x[:, 0] if self.dim == 1 else x

    def logpdf(self, x: np.ndarray) -> np.ndarray:
        from numpy.linalg import solve

        x = np.asarray(x, dtype=np.float64)
        if self.dim == 1 and x.ndim == 1:
            x = x[:, None]
        d = x - np.asarray(self.loc)
        z = solve(self._chol, d.T)  # triangular system, small d
        logdet = 2.0 * float(np.sum(np.log(np.diag(self._chol))))
        return -0.5 * np.sum(z * z, axis=0) - 0.5 * (self.dim * _LOG_2PI + logdet)

    @property
    def spec(self) -> str:
        loc = ", ".join(_fmt(v) for v in self.loc)
        cov = ", ".join("[" + ", ".join(_fmt(v) for v in row) + "]" for row in self.cov)
        return f"mvnormal([{loc}], [{cov}])"


# -------------------------------------------------------------------------------- discrete
@dataclass(frozen=True, repr=False)
class Categorical(Distribution):
    """Categorical on {0, ..., K-1} with the given probabilities."""

    probs: tuple[float, ...] = (1.0,)
    name = "categorical"
    discrete = True

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.choice(len(self.probs), size=n, p=np.asarray(self.probs)).astype(np.float64)

    def logpdf(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        k = len(self.probs)
        inside = (x >= 0) & (x < k) & (x == np.floor(x))
        idx = np.where(inside, x, 0).astype(np.int64)
        with np.errstate(divide="ignore"):
            logp = np.log(np.asarray(self.probs, dtype=np.float64))
        return np.where(inside, logp[idx], -np.inf)

    @property
    def spec(self) -> str:
        return "categorical([" + ", ".join(_fmt(v) for v in self.probs) + "])"

    @property
    def support(self) -> tuple[float, float]:
        nz = [i for i, v in enumerate(self.probs) if v > 0]
        return (float(nz[0]), float(nz[-1]))

    def enumerate_support(self, tol: float = 1e-17) -> np.ndarray:
        return np.arange(len(self.probs), dtype=np.float64)


@dataclass(frozen=True, repr=False)
class Poisson(Distribution):
    """Poisson with mean ``rate`` on {0, 1, 2, ...}."""

    rate: float = 1.0
    name = "poisson"
    discrete = True

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.poisson(self.rate, n).astype(np.float64)

    def logpdf(self, x: np.ndarray) -> np.ndarray:
        from scipy.special import gammaln

        x = np.asarray(x, dtype=np.float64)
        inside = (x >= 0) & (x == np.floor(x))
        xs = np.where(inside, x, 0.0)
        val = xs * math.log(self.rate) - self.rate - gammaln(xs + 1)
        return np.where(inside, val, -np.inf)

    def log_ratio(self, p: Distribution, x: np.ndarray) -> np.ndarray:
        """For a Poisson p: x·log(λ_p/λ_q) - (λ_p - λ_q), without the log x! both carry."""
        if not isinstance(p, Poisson):
            return super().log_ratio(p, x)
        x = np.asarray(x, dtype=np.float64)
        inside = (x >= 0) & (x == np.floor(x))
        val = x * math.log(p.rate / self.rate) - (p.rate - self.rate)
        return np.where(inside, val, np.nan)

    @property
    def spec(self) -> str:
        return f"poisson({_fmt(self.rate)})"

    @property
    def support(self) -> tuple[float, float]:
        return (0.0, math.inf)

    def enumerate_support(self, tol: float = 1e-17) -> np.ndarray:
        # mean + 12 sd + 40 leaves far less than 1e-17 of the mass out
        hi = int(self.rate + 12.0 * math.sqrt(self.rate) + 40.0)
        return np.arange(hi + 1, dtype=np.float64)

    def scipy(self) -> Any:
        from scipy import stats

        return stats.poisson(self.rate)


# --------------------------------------------------------------------------------- mixtures
@dataclass(frozen=True, repr=False)
class Mixture(Distribution):
    """A finite mixture Σ w_i · component_i (components share dimension and kind)."""

    weights: tuple[float, ...] = ()
    components: tuple[Distribution, ...] = ()
    name = "mixture"

    @property
    def discrete(self) -> bool:  # type: ignore[override]
        return all(c.discrete for c in self.components)

    @property
    def dim(self) -> int:  # type: ignore[override]
        return self.components[0].dim

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        counts = rng.multinomial(n, np.asarray(self.weights))
        parts = [c.sample(rng, int(k)) for c, k in zip(self.components, counts, strict=True)]
        x = np.concatenate(parts, axis=0)
        return x[rng.permutation(n)]

    def logpdf(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):
            terms = np.stack(
                [
                    math.log(w) + c.logpdf(x) if w > 0 else np.full(len(x), -np.inf)
                    for w, c in zip(self.weights, self.components, strict=True)
                ]
            )
        m = np.max(terms, axis=0)
        ms = np.where(np.isfinite(m), m, 0.0)
        with np.errstate(divide="ignore"):
            return ms + np.log(np.sum(np.exp(terms - ms), axis=0))

    def logpdf_at(self, end: float, side: float, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        terms = [
            math.log(w) + np.asarray(c.logpdf_at(end, side, t), dtype=np.float64)
            for w, c in zip(self.weights, self.components, strict=True)
            if w > 0
        ]
        with np.errstate(all="ignore"):
            return np.logaddexp.reduce(np.stack(terms), axis=0)

    @property
    def singular(self) -> bool:  # type: ignore[override]
        return any(c.singular for c in self.components)

    def log_density_t(self, end: float, side: float, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        terms = [
            math.log(w) + np.asarray(c.log_density_t(end, side, t), dtype=np.float64)
            for w, c in zip(self.weights, self.components, strict=True)
            if w > 0
        ]
        with np.errstate(all="ignore"):
            return np.logaddexp.reduce(np.stack(terms), axis=0)

    def t_scale(self, end: float, side: float) -> float:
        return max(c.t_scale(end, side) for c in self.components)

    @property
    def spec(self) -> str:
        w = ", ".join(_fmt(v) for v in self.weights)
        c = ", ".join(comp.spec for comp in self.components)
        return f"mixture([{w}], [{c}])"

    @property
    def support(self) -> tuple[float, float]:
        sup = [c.support for w, c in zip(self.weights, self.components, strict=True) if w > 0]
        return (min(s[0] for s in sup), max(s[1] for s in sup))

    def support_intervals(self) -> list[tuple[float, float]]:
        """The union of the supports of the components with positive weight: disjoint closed
        intervals, so that a gap between components (no mass) is visible, unlike in the hull."""
        parts = sorted(
            iv
            for w, c in zip(self.weights, self.components, strict=True)
            if w > 0
            for iv in c.support_intervals()
        )
        merged: list[tuple[float, float]] = []
        for lo, hi in parts:
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        return merged

    def quantile_points(self) -> list[float]:
        """Break points for quadrature: each component's quartiles and far quantiles."""
        pts: list[float] = []
        for c in self.components:
            pts += _quantile_points(c)
        return sorted(set(pts))

    def enumerate_support(self, tol: float = 1e-17) -> np.ndarray:
        return np.unique(np.concatenate([c.enumerate_support(tol) for c in self.components]))


def _quantile_points(d: Distribution) -> list[float]:
    if isinstance(d, (Mixture, TorchDistribution)):
        return d.quantile_points()
    sp = d.scipy()
    if sp is None:
        return []
    probs = [1e-12, 1e-6, 0.01, 0.25, 0.5, 0.75, 0.99, 1 - 1e-6, 1 - 1e-12]
    return [float(v) for v in sp.ppf(probs) if math.isfinite(float(v))]


# ---------------------------------------------------------------------------- bring your own
class ScipyDistribution(Distribution):
    """A frozen ``scipy.stats`` distribution (``scipy.stats.norm(0, 1)``, ``poisson(3)``, ...)."""

    def __init__(self, frozen: Any) -> None:
        self.frozen = frozen
        self.discrete = hasattr(frozen.dist, "pmf")
        self.name = frozen.dist.name

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.asarray(self.frozen.rvs(size=n, random_state=rng), dtype=np.float64)

    def logpdf(self, x: np.ndarray) -> np.ndarray:
        f = self.frozen.logpmf if self.discrete else self.frozen.logpdf
        return np.asarray(f(x), dtype=np.float64)

    @property
    def spec(self) -> str:
        args = ", ".join(_fmt(float(a)) for a in self.frozen.args)
        kw = ", ".join(f"{k}={_fmt(float(v))}" for k, v in self.frozen.kwds.items())
        return f"scipy.{self.name}({', '.join(s for s in (args, kw) if s)})"

    @property
    def support(self) -> tuple[float, float]:
        lo, hi = self.frozen.support()
        return (float(lo), float(hi))

    def scipy(self) -> Any:
        return self.frozen

    def logpdf_at(self, end: float, side: float, t: np.ndarray) -> np.ndarray:
        # SciPy's logpdf is log(pdf) for many families, -inf wherever pdf underflows: where the
        # lab has the same family, its exact log-space formula serves the far tails
        twin = _scipy_twin(self.frozen)
        if twin is not None:
            return twin.logpdf_at(end, side, t)
        return super().logpdf_at(end, side, t)

    @property
    def singular(self) -> bool:  # type: ignore[override]
        twin = _scipy_twin(self.frozen)
        return twin is not None and twin.singular

    def log_density_t(self, end: float, side: float, t: np.ndarray) -> np.ndarray:
        twin = _scipy_twin(self.frozen)
        if twin is not None:
            return twin.log_density_t(end, side, t)
        return super().log_density_t(end, side, t)

    def log_ratio_at(self, p: Distribution, end: float, side: float, t: np.ndarray) -> np.ndarray:
        twin = _scipy_twin(self.frozen)
        if twin is not None:
            return twin.log_ratio_at(p, end, side, t)
        return super().log_ratio_at(p, end, side, t)

    def t_scale(self, end: float, side: float) -> float:
        twin = _scipy_twin(self.frozen)
        return twin.t_scale(end, side) if twin is not None else 1.0

    def enumerate_support(self, tol: float = 1e-17) -> np.ndarray:
        if not self.discrete:
            return super().enumerate_support(tol)
        lo, hi = self.support
        if math.isinf(lo) or math.isinf(hi):
            # the bulk; exact sums extend an unbounded upper tail until its terms vanish
            mean, sd = float(self.frozen.mean()), float(self.frozen.std())
            if math.isinf(lo):
                lo = math.floor(mean - 40 * sd - 40)
            if math.isinf(hi):
                hi = math.ceil(mean + 12 * sd + 40)
        return np.arange(int(lo), int(hi) + 1, dtype=np.float64)


class TorchDistribution(Distribution):
    """A ``torch.distributions.Distribution``: sampled with a per-block torch generator."""

    def __init__(self, dist: Any) -> None:
        import torch

        self.dist = dist
        self.torch = torch
        shape = tuple(dist.event_shape)
        if tuple(dist.batch_shape) != ():
            raise KlestError("torch distributions must have an empty batch_shape", argument="q")
        self.dim = int(shape[0]) if shape else 1
        self.discrete = bool(getattr(dist.support, "is_discrete", False))
        self.name = type(dist).__name__
        # densities are evaluated in float64 where the family can be rebuilt with float64
        # parameters (a float32 normal's log_prob is -inf beyond |x| ≈ 1e19); draws keep dist's
        self.dist64 = _float64_twin(dist)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        torch = self.torch
        gen_seed = int(rng.integers(0, 2**63 - 1))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(gen_seed)
            x = self.dist.sample((n,))
        return x.detach().to(torch.float64).numpy()

    def float_dtype(self) -> Any:
        """The floating dtype to evaluate log_prob in: the distribution's own (from its mean, or
        from a draw where it has no mean, as a TransformedDistribution), float64 if integer."""
        torch = self.torch
        try:
            dt = self.dist64.mean.dtype
        except NotImplementedError:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                dt = self.dist.sample().dtype
        return dt if dt.is_floating_point else torch.float64

    def _a_point(self, dtype: Any) -> Any:
        """Some point of the support (a draw), to stand in where log_prob is undefined."""
        torch = self.torch
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return self.dist.sample().to(dtype)

    def logpdf(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = np.asarray(x, dtype=np.float64)
        dtype = self.float_dtype()
        t = torch.as_tensor(x, dtype=dtype)
        with torch.no_grad():
            try:
                res = self.dist64.log_prob(t)
            except (ValueError, RuntimeError):  # outside the support with validate_args on
                try:
                    inside = self.dist.support.check(t)
                    wide = inside.reshape(inside.shape + (1,) * (t.dim() - inside.dim()))
                    safe = torch.where(wide, t, self._a_point(dtype))
                    res = torch.where(inside, self.dist64.log_prob(safe), -torch.inf)
                except (ValueError, RuntimeError) as err:
                    raise KlestError(
                        f"{self.spec} cannot evaluate log_prob at points of shape "
                        f"{tuple(x.shape)}: {str(err).splitlines()[0]}",
                        argument="p",
                    ) from None
        return res.detach().to(torch.float64).numpy()

    @property
    def support(self) -> tuple[float, float]:
        c = self.dist.support
        if c is self.torch.distributions.constraints.boolean:
            return (0.0, 1.0)
        lo = getattr(c, "lower_bound", -math.inf)
        hi = getattr(c, "upper_bound", math.inf)
        return (float(lo), float(hi))

    def enumerate_support(self, tol: float = 1e-17) -> np.ndarray:
        if not self.discrete:
            return super().enumerate_support(tol)
        if self.dist.has_enumerate_support:
            vals = self.dist.enumerate_support(expand=False)
            vals = vals.reshape(-1, self.dim) if self.dim > 1 else vals.reshape(-1)
            return vals.detach().to(self.torch.float64).numpy()
        lo, hi = self.support
        if self.dim > 1 or math.isinf(lo):
            raise KlestError(f"{self.spec}: cannot enumerate its support", argument="q")
        try:
            mean, sd = float(self.dist.mean), float(self.dist.stddev)
        except NotImplementedError:
            raise KlestError(
                f"{self.spec} has no mean: cannot bound its support", argument="q"
            ) from None
        top = hi if math.isfinite(hi) else math.ceil(mean + 12 * sd + 40)
        return np.arange(int(lo), int(top) + 1, dtype=np.float64)

    @property
    def spec(self) -> str:
        return f"torch.{self.name}"

    def quantile_points(self) -> list[float]:
        """Break points for quadrature (continuous, one dimension): quantiles from ``icdf`` where
        torch implements it, else a wide bracket around the mean from the standard deviation
        (or ``loc``/``scale`` where those are not finite, as for a Student-t with df <= 2)."""
        if self.discrete or self.dim != 1:
            return []
        torch = self.torch
        dist = self.dist64
        dtype = self.float_dtype()
        probs = [1e-12, 1e-6, 0.01, 0.25, 0.5, 0.75, 0.99, 1 - 1e-6, 1 - 1e-12]
        try:
            with torch.no_grad():
                qs = dist.icdf(torch.tensor(probs, dtype=dtype))
            pts = [float(v) for v in qs.detach().to(torch.float64).reshape(-1)]
        except (NotImplementedError, ValueError, RuntimeError):
            pts = []
        pts = [v for v in pts if math.isfinite(v)]
        if len(pts) >= 3:
            return sorted(set(pts))
        try:
            with torch.no_grad():
                mean, sd = float(dist.mean), float(dist.stddev)
        except NotImplementedError:  # no moments (a TransformedDistribution): no break points
            return []
        if not (math.isfinite(mean) and math.isfinite(sd) and sd > 0):
            mean = float(getattr(dist, "loc", 0.0))
            sd = float(getattr(dist, "scale", 1.0))
        lo, hi = self.support
        pts = [mean + k * sd for k in (-40, -10, -3, -1, 0, 1, 3, 10, 40)]
        return sorted({v for v in pts if lo < v < hi})


def _scipy_twin(frozen: Any) -> Distribution | None:
    """The lab's distribution with the same law as a frozen SciPy one, where the family is one
    the lab has (used for log densities only), else None."""
    try:
        shapes, loc, scale = frozen.dist._parse_args(*frozen.args, **frozen.kwds)
        name = frozen.dist.name
        loc, scale = float(loc), float(scale)
        if name == "norm":
            return Normal(loc, scale)
        if name == "t":
            return StudentT(float(shapes[0]), loc, scale)
        if name == "laplace":
            return Laplace(loc, scale)
        if name == "logistic":
            return Logistic(loc, scale)
        if name == "uniform":
            return Uniform(loc, loc + scale)
        if loc != 0.0:
            return None
        if name == "expon":
            return Exponential(1.0 / scale)
        if name == "gamma":
            return Gamma(float(shapes[0]), 1.0 / scale)
        if name == "beta" and scale == 1.0:
            return Beta(float(shapes[0]), float(shapes[1]))
    except (AttributeError, TypeError, ValueError, IndexError):
        return None
    return None


def _gamma_params(d: Distribution) -> tuple[float, float] | None:
    """(shape, rate) of a gamma law (a gamma, an exponential, or a SciPy twin of one)."""
    if isinstance(d, ScipyDistribution):
        twin = _scipy_twin(d.frozen)
        return None if twin is None else _gamma_params(twin)
    if isinstance(d, Gamma):
        return d.shape, d.rate
    if isinstance(d, Exponential):
        return 1.0, d.rate
    return None


def _beta_params(d: Distribution) -> tuple[float, float] | None:
    """(a, b) of a beta law (a beta, uniform(0, 1), or a SciPy twin of one)."""
    if isinstance(d, ScipyDistribution):
        twin = _scipy_twin(d.frozen)
        return None if twin is None else _beta_params(twin)
    if isinstance(d, Beta):
        return d.a, d.b
    if isinstance(d, Uniform) and (d.low, d.high) == (0.0, 1.0):
        return 1.0, 1.0
    return None


def _float64_twin(dist: Any) -> Any:
    """``dist`` rebuilt from its parameters in float64 (same type, same law), or ``dist``
    itself where it is float64 already or cannot be rebuilt so."""
    import torch

    try:
        if dist.mean.dtype == torch.float64 or not dist.mean.dtype.is_floating_point:
            return dist
    except NotImplementedError:
        return dist
    try:
        names = [k for k in dist.arg_constraints if k in vars(dist)]
        kwargs = {k: getattr(dist, k).detach().to(torch.float64) for k in names}
        twin = type(dist)(**kwargs, validate_args=False)
        return twin if twin.mean.dtype == torch.float64 else dist
    except Exception:  # families with other constructors keep their own dtype
        return dist


def wrap(obj: Any) -> Distribution:
    """A :class:`Distribution` for a Distribution (itself), a SciPy frozen distribution or a
    torch.distributions object; a spec string is the spec module's to read
    (:func:`klest.lab.specs.as_distribution`)."""
    if isinstance(obj, Distribution):
        return obj
    if hasattr(obj, "dist") and hasattr(obj, "rvs") and hasattr(obj, "args"):
        return ScipyDistribution(obj)
    module = type(obj).__module__
    if module.startswith("torch.distributions"):
        return TorchDistribution(obj)
    raise KlestError(
        "expected a spec string, a klest.lab Distribution, a frozen scipy.stats distribution "
        "or a torch.distributions object",
        argument="distribution",
        value=obj,
    )


def is_univariate_continuous(d: Distribution) -> bool:
    """True when quadrature applies: one dimension, continuous, with a density we can evaluate."""
    return d.dim == 1 and not d.discrete
