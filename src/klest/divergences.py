r"""The f-divergence family as data: D_f(p, q) = E_{x~q}[f(r)], r = p(x)/q(x).

Every member carries the scalar ``f`` (for ground truth by quadrature or exact sums), ``f'(1)``
(the slope of the tangent control variate), and a stable evaluator of the per-sample,
tangent-corrected value f(r) - f'(1)(r - 1) from the log-ratio L = log r. Since E_q[r - 1] = 0 the
corrected value is unbiased for D_f; for convex f it is >= 0 sample by sample.

Users add their own with :func:`register_divergence` or by passing an :class:`FDivergence`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import _numerics as nm
from ._backend import Array
from .errors import KlestError

__all__ = [
    "FDivergence",
    "alpha_divergence",
    "divergence_names",
    "get_divergence",
    "register_divergence",
]

LogForm = Callable[[Any, Array], Array]  # (xp, L) -> f(e^L) - f'(1)·(e^L - 1)


@dataclass(frozen=True)
class FDivergence:
    r"""An f-divergence D_f(p, q) = E_q[f(p/q)] with f convex and f(1) = 0.

    ``f``: scalar function of t = p/q (used for ground truth).
    ``f_prime_at_1``: f'(1), the slope of the tangent control variate (any subgradient for a
    non-smooth f keeps the estimator unbiased).
    ``log_form``: optional ``(xp, L) -> f(e^L) - f'(1)·expm1(L)`` evaluated stably; if omitted the
    value is computed as ``f_array(e^L) - f'(1)·expm1(L)`` with ``f_array`` (or ``f``) applied to
    the array, which is fine away from L = 0 but not accurate near it.
    ``f_array``: optional array version of f (defaults to ``f``, which must then accept arrays).
    ``plain_form``: optional ``(xp, L) -> f(e^L)`` evaluated stably (used by ``plain``).
    """

    name: str
    f: Callable[[Any], Any]
    f_prime_at_1: float
    log_form: LogForm | None = None
    f_array: Callable[[Any], Any] | None = None
    plain_form: LogForm | None = None
    description: str = ""
    params: tuple[tuple[str, float], ...] = field(default=())

    def corrected(self, xp: Any, L: Array) -> Array:
        """Per-sample f(r) - f'(1)(r - 1) from L = log r."""
        if self.log_form is not None:
            return self.log_form(xp, L)
        fa = self.f_array or self.f
        return fa(xp.exp(L)) - self.f_prime_at_1 * xp.expm1(L)

    def plain(self, xp: Any, L: Array) -> Array:
        """Per-sample f(r) without the control variate (unbiased too, usually noisier)."""
        if self.plain_form is not None:
            return self.plain_form(xp, L)
        if self.f_prime_at_1 == 0:
            return self.corrected(xp, L)
        if self.log_form is None:
            fa = self.f_array or self.f
            return fa(xp.exp(L))
        return self.corrected(xp, L) + self.f_prime_at_1 * xp.expm1(L)


# ---------------------------------------------------------------- stable log-space forms
def _reverse_kl(xp: Any, L: Array) -> Array:
    return nm.expm1mx(xp, L)


def _forward_kl(xp: Any, L: Array) -> Array:
    return nm.lexpl_mexpm1(xp, L)


def _chi2(xp: Any, L: Array) -> Array:
    e = xp.expm1(L)
    return e * e


def _hellinger(xp: Any, L: Array) -> Array:
    e = xp.expm1(L / 2)
    return e * e


def _total_variation(xp: Any, L: Array) -> Array:
    return xp.abs(xp.expm1(L)) / 2


def _log_squared(xp: Any, L: Array) -> Array:
    return L * L / 2


def _log_mean_with_one(xp: Any, x: Array) -> Array:
    """log((1 + e^x)/2): log1p(expm1(x)/2) near 0 (accurate), softplus(x) - log 2 elsewhere."""
    near = xp.abs(x) < 1
    xn = xp.where(near, x, xp.zeros_like(x))
    xf = xp.where(near, xp.ones_like(x), x)
    return xp.where(near, xp.log1p(xp.expm1(xn) / 2), nm.softplus(xp, xf) - math.log(2))


def _jensen_shannon(xp: Any, L: Array) -> Array:
    # With m = (1 + r)/2:  2 f(r) = r·[log(r/m) - (1 - m/r)] + [log(1/m) - (1 - m)]
    #                            = r·k3(a) + k3(b),   a = log(m/r), b = log m,
    # a sum of two non-negative terms (no cancellation near r = 1). For L < -3 the first term is
    # rewritten r·k3(a) = (1 - r)/2 - r·a, since k3(a) ~ 1/(2r) would overflow.
    finite = L > -xp.inf
    Lf = xp.where(finite, L, xp.zeros_like(L))
    very_negative = Lf < -3
    Lv = xp.where(very_negative, Lf, xp.full_like(Lf, -4.0))
    Lo = xp.where(very_negative, xp.zeros_like(Lf), Lf)
    first = xp.where(
        very_negative,
        -xp.expm1(Lv) / 2 - xp.exp(Lv) * _log_mean_with_one(xp, -Lv),
        xp.exp(Lo) * nm.expm1mx(xp, _log_mean_with_one(xp, -Lo)),
    )
    value = (first + nm.expm1mx(xp, _log_mean_with_one(xp, Lf))) / 2
    return xp.where(finite, value, xp.full_like(L, math.log(2) / 2))


def _js_scalar(t: float) -> float:
    if t == 0:
        return math.log(2) / 2
    return 0.5 * (t * math.log(t) - (1 + t) * math.log((1 + t) / 2))


def alpha_divergence(alpha: float) -> FDivergence:
    r"""The α-divergence, f(t) = (t^α - α t - (1 - α)) / (α(α - 1)) (tangent-corrected already).

    α → 1 is the forward KL, α → 0 the reverse KL (returned exactly for α = 1 and α = 0);
    α = 2 is χ²/2 and α = ½ is 2·(squared Hellinger). Computed as
    (k3(αL) - α·k3(L)) / (α(α - 1)), whose relative error grows like 1/|α(α - 1)| as α nears 0 or 1.
    """
    a = float(alpha)
    if not math.isfinite(a):
        raise KlestError(f"alpha must be finite, got {alpha}", argument="alpha")
    if a == 1.0:
        return FDivergence(
            "alpha:1",
            lambda t: _xlogx_scalar(t) - (t - 1.0),
            0.0,
            _forward_kl,
            description="α = 1: forward KL",
            params=(("alpha", 1.0),),
        )
    if a == 0.0:
        return FDivergence(
            "alpha:0",
            lambda t: _neglog_scalar(t) + (t - 1.0),
            0.0,
            _reverse_kl,
            description="α = 0: reverse KL",
            params=(("alpha", 0.0),),
        )
    denom = a * (a - 1.0)
    at_zero = 1.0 / a if a > 0 else math.inf
    log_denom = math.log(abs(denom))
    sign = 1.0 if denom > 0 else -1.0

    def form(xp: Any, L: Array) -> Array:
        # |αL| and |L| below the overflow bound: (k3(αL) - α k3(L)) / (α(α - 1)), stable near 0.
        # Beyond it: with M = max(αL, L, 0), numerator = e^M (e^{αL-M} - α e^{L-M} - (1-α) e^{-M}),
        # every exponent <= 0, and the division folded into the exponent so that a value that
        # fits in the dtype is not lost to an overflow of e^M.
        finite = L > -xp.inf
        Lf = xp.where(finite, L, xp.zeros_like(L))
        bound = nm.overflow_threshold(xp, L)
        ok = (xp.abs(a * Lf) < bound) & (xp.abs(Lf) < bound)
        Lk = xp.where(ok, Lf, xp.zeros_like(Lf))
        k3_form = (nm.expm1mx(xp, a * Lk) - a * nm.expm1mx(xp, Lk)) / denom
        Lb = xp.where(ok, xp.ones_like(Lf), Lf)
        M = xp.maximum(xp.maximum(a * Lb, Lb), xp.zeros_like(Lb))
        bracket = xp.exp(a * Lb - M) - a * xp.exp(Lb - M) - (1 - a) * xp.exp(-M)
        big_form = xp.exp(M - log_denom) * (sign * bracket)
        value = xp.where(ok, k3_form, big_form)
        return xp.where(finite, value, xp.full_like(L, at_zero))

    def f(t: float) -> float:
        if t == 0:
            return at_zero
        return (t**a - a * t - (1 - a)) / denom

    return FDivergence(
        f"alpha:{a:g}", f, 0.0, form, description=f"α-divergence, α = {a:g}", params=(("alpha", a),)
    )


def _xlogx_scalar(t: float) -> float:
    return 0.0 if t == 0 else t * math.log(t)


def _neglog_scalar(t: float) -> float:
    return math.inf if t == 0 else -math.log(t)


_REGISTRY: dict[str, FDivergence] = {}


def register_divergence(div: FDivergence, *, overwrite: bool = False) -> FDivergence:
    """Add ``div`` to the registry under ``div.name`` (usable as ``estimator=div.name``)."""
    if not isinstance(div, FDivergence):
        raise KlestError("expected an FDivergence", argument="div", value=div)
    if div.name in _REGISTRY and not overwrite:
        raise KlestError(
            f"a divergence named {div.name!r} exists; pass overwrite=True", argument="div"
        )
    _REGISTRY[div.name] = div
    return div


def get_divergence(name: str | FDivergence) -> FDivergence:
    """Look up a divergence by name; ``"alpha:0.5"`` builds an α-divergence."""
    if isinstance(name, FDivergence):
        return name
    if not isinstance(name, str):
        raise KlestError(
            "expected a divergence name or an FDivergence", argument="divergence", value=name
        )
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("alpha:"):
        try:
            alpha = float(name.split(":", 1)[1])
        except ValueError:
            raise KlestError(f"cannot read α from {name!r}", argument="divergence") from None
        return alpha_divergence(alpha)
    raise KlestError(
        f"unknown divergence {name!r}; known: {', '.join(divergence_names())} or 'alpha:<value>'",
        argument="divergence",
    )


def divergence_names() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


for _d in (
    FDivergence(
        "reverse_kl",
        _neglog_scalar,
        -1.0,
        _reverse_kl,
        plain_form=lambda xp, L: -L,
        description="KL(q‖p): f(t) = -log t; the corrected estimator is k3",
    ),
    FDivergence(
        "forward_kl",
        _xlogx_scalar,
        1.0,
        _forward_kl,
        plain_form=nm.xlogx,
        description="KL(p‖q): f(t) = t log t; corrected: r log r - (r - 1)",
    ),
    FDivergence(
        "chi2", lambda t: (t - 1.0) ** 2, 0.0, _chi2, description="χ²(p‖q): f(t) = (t - 1)²"
    ),
    FDivergence(
        "squared_hellinger",
        lambda t: (math.sqrt(t) - 1.0) ** 2,
        0.0,
        _hellinger,
        description="squared Hellinger: f(t) = (√t - 1)² (no ½ factor)",
    ),
    FDivergence(
        "jensen_shannon",
        _js_scalar,
        0.0,
        _jensen_shannon,
        description="Jensen-Shannon: f(t) = ½[t log t - (1 + t) log((1 + t)/2)]",
    ),
    FDivergence(
        "total_variation",
        lambda t: abs(t - 1.0) / 2,
        0.0,
        _total_variation,
        description="total variation: f(t) = ½|t - 1| (subgradient 0 at t = 1)",
    ),
    FDivergence(
        "log_squared",
        lambda t: math.inf if t == 0 else 0.5 * math.log(t) ** 2,
        0.0,
        _log_squared,
        description="the f of k2: f(t) = ½(log t)²; k2 is unbiased for it",
    ),
):
    register_divergence(_d)
