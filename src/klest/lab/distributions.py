r"""Distributions the lab can sample from and evaluate: a small NumPy implementation of each family.

Every distribution offers ``sample(rng, n)`` (a NumPy ``Generator``; shape ``(n,)`` or ``(n, d)``),
``logpdf(x)`` (log density, or log mass for discrete ones; ``-inf`` outside the support) and
``spec`` (the canonical spec string, e.g. ``normal(0.1, 1)``). One-dimensional continuous families
also give their ``support`` and a frozen SciPy twin (``scipy()``, imported lazily) for quantiles
used by quadrature. Discrete families give ``enumerate_support(tol)``: the points that carry all
but ``tol`` of the mass, for exact sums.

Users can bring their own: :func:`as_distribution` wraps a SciPy frozen distribution or a
``torch.distributions.Distribution`` (torch is imported only when such an object is passed).
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
    "as_distribution",
]

_LOG_2PI = math.log(2 * math.pi)


def _fmt(v: float) -> str:
    return f"{v:g}"


class Distribution:
    """Base class. Subclasses set ``name`` and implement ``sample`` and ``logpdf``."""

    name: str = "distribution"
    discrete: bool = False
    dim: int = 1  # 1 for univariate; d for a d-variate distribution

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

    def logpdf(self, x: np.ndarray) -> np.ndarray:
        nu = self.df
        z = (np.asarray(x, dtype=np.float64) - self.loc) / self.scale
        const = (
            math.lgamma((nu + 1) / 2)
            - math.lgamma(nu / 2)
            - 0.5 * math.log(nu * math.pi)
            - math.log(self.scale)
        )
        return const - (nu + 1) / 2 * np.log1p(z * z / nu)

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

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.gamma(self.shape, 1.0 / self.rate, n)

    def logpdf(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        a, b = self.shape, self.rate
        pos = x > 0
        xs = np.where(pos, x, 1.0)
        val = a * math.log(b) - math.lgamma(a) + (a - 1) * np.log(xs) - b * xs
        return np.where(pos, val, -np.inf)

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

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.beta(self.a, self.b, n)

    def logpdf(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        inside = (x > 0) & (x < 1)
        xs = np.where(inside, x, 0.5)
        lbeta = math.lgamma(self.a) + math.lgamma(self.b) - math.lgamma(self.a + self.b)
        val = (self.a - 1) * np.log(xs) + (self.b - 1) * np.log1p(-xs) - lbeta
        return np.where(inside, val, -np.inf)

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

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        torch = self.torch
        gen_seed = int(rng.integers(0, 2**63 - 1))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(gen_seed)
            x = self.dist.sample((n,))
        return x.detach().to(torch.float64).numpy()

    def logpdf(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = np.asarray(x, dtype=np.float64)
        dtype = self.dist.mean.dtype if self.dist.mean.dtype.is_floating_point else torch.float64
        if self.discrete:  # -inf off the integer support; log_prob only where it is defined
            lo, hi = self.support
            ok = (x >= lo) & (x <= hi) & (x == np.floor(x))
            out = np.full(x.shape, -np.inf)
            if np.any(ok):
                with torch.no_grad():
                    vals = self.dist.log_prob(torch.as_tensor(x[ok], dtype=dtype))
                out[ok] = vals.detach().to(torch.float64).numpy()
            return out
        t = torch.as_tensor(x, dtype=dtype)
        with torch.no_grad():
            try:
                res = self.dist.log_prob(t)
            except ValueError:  # outside the support with validate_args on
                inside = self.dist.support.check(t)
                safe = torch.where(inside, t, self.dist.mean.to(dtype))
                res = torch.where(inside, self.dist.log_prob(safe), -torch.inf)
        return res.detach().to(torch.float64).numpy()

    @property
    def support(self) -> tuple[float, float]:
        c = self.dist.support
        lo = getattr(c, "lower_bound", -math.inf)
        hi = getattr(c, "upper_bound", math.inf)
        return (float(lo), float(hi))

    def enumerate_support(self, tol: float = 1e-17) -> np.ndarray:
        if not self.discrete:
            return super().enumerate_support(tol)
        if self.dist.has_enumerate_support:
            vals = self.dist.enumerate_support(expand=False).reshape(-1)
            return vals.detach().to(self.torch.float64).numpy()
        lo, hi = self.support
        mean, sd = float(self.dist.mean), float(self.dist.stddev)
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
        dist = self.dist
        dtype = dist.mean.dtype if dist.mean.dtype.is_floating_point else torch.float64
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
        with torch.no_grad():
            mean, sd = float(dist.mean), float(dist.stddev)
        if not (math.isfinite(mean) and math.isfinite(sd) and sd > 0):
            mean = float(getattr(dist, "loc", 0.0))
            sd = float(getattr(dist, "scale", 1.0))
        lo, hi = self.support
        pts = [mean + k * sd for k in (-40, -10, -3, -1, 0, 1, 3, 10, 40)]
        return sorted({v for v in pts if lo < v < hi})


def as_distribution(obj: Any, *, variables: dict[str, float] | None = None) -> Distribution:
    """A :class:`Distribution` from a spec string, a Distribution, a SciPy frozen distribution
    or a torch.distributions object.

    >>> as_distribution("normal(0.1, 1)")
    normal(0.1, 1)
    """
    if isinstance(obj, Distribution):
        return obj
    if isinstance(obj, str):
        from .specs import parse

        return parse(obj, variables=variables)
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
