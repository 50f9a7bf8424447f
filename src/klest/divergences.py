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

from . import _names
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
#: (v'(L), v(L) - v'(L), (their limits at L = -inf)) for v = f(e^L) - f'(1)·expm1(L): closed
#: forms on finite L of v' = r·(f'(r) - f'(1)) and v - v' = f(r) - r·f'(r) + f'(1), r = e^L.
DerivativeForms = tuple[LogForm, LogForm, tuple[float, float]]


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
    ``derivative_forms``: optional closed forms of the corrected value's slope v'(L) and of
    v(L) - v'(L) on finite L, and their limits at L = -inf (see :data:`DerivativeForms`): what
    :mod:`klest.rl`'s gradients use. Autograd of the value gives NaN where e^L overflows
    (inf - inf, 0·inf), and v - v' computed as a difference cancels two terms of size ~r; without
    the forms :mod:`klest.rl` falls back to automatic differentiation of the value.
    """

    name: str
    f: Callable[[Any], Any]
    f_prime_at_1: float
    log_form: LogForm | None = None
    f_array: Callable[[Any], Any] | None = None
    plain_form: LogForm | None = None
    description: str = ""
    params: tuple[tuple[str, float], ...] = field(default=())
    derivative_forms: DerivativeForms | None = None

    def slope(self, xp: Any, L: Array) -> Array | None:
        """v'(L) from ``derivative_forms`` (its limit at L = -inf); None without them."""
        if self.derivative_forms is None:
            return None
        fn, _, (at_minus_inf, _) = self.derivative_forms
        return _at_finite(xp, fn, L, at_minus_inf)

    def value_minus_slope(self, xp: Any, L: Array) -> Array | None:
        """v(L) - v'(L) from ``derivative_forms`` (its limit at L = -inf); None without them."""
        if self.derivative_forms is None:
            return None
        _, fn, (_, at_minus_inf) = self.derivative_forms
        return _at_finite(xp, fn, L, at_minus_inf)

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
    e = nm.expm1(xp, L)
    return e * e


def _hellinger(xp: Any, L: Array) -> Array:
    e = nm.expm1(xp, L / 2)
    return e * e


def _total_variation(xp: Any, L: Array) -> Array:
    # above L = 1: (e^L - 1)/2 = e^{L - log 2} - 1/2, finite (value and slope) until e^L/2 overflows
    big = L > 1
    Lb = xp.where(big, L, xp.full_like(L, 2.0))
    Ls = xp.where(big, xp.zeros_like(L), L)
    return xp.where(
        big, nm.exp_or_inf(xp, Lb - math.log(2), Lb) - 0.5, xp.abs(nm.expm1(xp, Ls)) / 2
    )


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
    # rewritten r·k3(a) = (1 - r)/2 - r·a, since k3(a) ~ 1/(2r) would overflow; for L > 3 it is
    # exp(L + log k3(a)), so that an overflowing r gives +inf in the value *and* the gradient
    # (e^L · k3(a) would give inf · 0 = NaN in the gradient once k3(a)'s slope underflows).
    finite = L > -xp.inf
    Lf = xp.where(finite, L, xp.zeros_like(L))
    very_negative = Lf < -3
    very_positive = Lf > 3
    Lv = xp.where(very_negative, Lf, xp.full_like(Lf, -4.0))
    Lp = xp.where(very_positive, Lf, xp.full_like(Lf, 4.0))
    Lo = xp.where(very_negative | very_positive, xp.zeros_like(Lf), Lf)
    first = xp.where(
        very_negative,
        -nm.expm1(xp, Lv) / 2 - xp.exp(Lv) * _log_mean_with_one(xp, -Lv),
        xp.where(
            very_positive,
            nm.exp_or_inf(xp, Lp + xp.log(nm.expm1mx(xp, _log_mean_with_one(xp, -Lp))), Lp),
            xp.exp(Lo) * nm.expm1mx(xp, _log_mean_with_one(xp, -Lo)),
        ),
    )
    value = (first + nm.expm1mx(xp, _log_mean_with_one(xp, Lf))) / 2
    return xp.where(finite, value, xp.full_like(L, math.log(2) / 2))


# ------------------------------------------------- slopes v'(L) and v(L) - v'(L), closed forms
def _at_finite(xp: Any, fn: LogForm, L: Array, at_minus_inf: float) -> Array:
    """fn(L) where L > -inf, the limit where L = -inf; no NaN either way."""
    finite = L > -xp.inf
    Lf = xp.where(finite, L, xp.zeros_like(L))
    return xp.where(finite, fn(xp, Lf), xp.full_like(L, at_minus_inf))


_REVERSE_KL_D: DerivativeForms = (lambda xp, L: xp.expm1(L), lambda xp, L: -L, (-1.0, math.inf))
_FORWARD_KL_D: DerivativeForms = (
    lambda xp, L: L * xp.exp(L),
    lambda xp, L: -xp.expm1(L),
    (0.0, 1.0),
)
_CHI2_D: DerivativeForms = (
    lambda xp, L: xp.exp(L + math.log(2)) * xp.expm1(L),  # 2r(r - 1), no overflow before r²
    lambda xp, L: -xp.expm1(2 * L),
    (0.0, 1.0),
)
_HELLINGER_D: DerivativeForms = (
    lambda xp, L: xp.exp(L / 2) * xp.expm1(L / 2),
    lambda xp, L: -xp.expm1(L / 2),
    (0.0, 1.0),
)
_JS_D: DerivativeForms = (
    lambda xp, L: -xp.exp(L - math.log(2)) * _log_mean_with_one(xp, -L),
    lambda xp, L: -0.5 * _log_mean_with_one(xp, L),
    (0.0, 0.5 * math.log(2)),
)
_TV_D: DerivativeForms = (
    lambda xp, L: xp.exp(L - math.log(2)) * xp.sign(L),
    lambda xp, L: -0.5 * xp.sign(L),
    (0.0, 0.5),
)
_LOG_SQUARED_D: DerivativeForms = (
    lambda xp, L: L,
    lambda xp, L: L * L * 0.5 - L,
    (-math.inf, math.inf),
)


def _alpha_derivatives(a: float) -> DerivativeForms:
    """v' = (r^α - r)/(α - 1) and v - v' = -expm1(αL)/α for the α-divergence (α ≠ 0, 1)."""
    sign = 1.0 if a > 1 else -1.0
    c = math.log(abs(a - 1))  # 1/(α - 1) folded into the exponents: results near the overflow
    # bound that fit stay finite

    def slope(xp: Any, L: Array) -> Array:
        # e^L·expm1((α-1)L)/(α-1) (no cancellation near 0 or near α = 1; inf·finite, not
        # inf - inf, for L > 0) and (e^{αL} - e^L)/(α-1) below L = -1 where |(α-1)L| >= 1 (no
        # 0·inf when e^{(α-1)L} overflows; no cancellation there either)
        lo = (L < -1) & (xp.abs((a - 1) * L) >= 1)
        Lh = xp.where(lo, xp.zeros_like(L), L)
        Ll = xp.where(lo, L, xp.full_like(L, -2.0))
        hi_form = xp.exp(Lh - c) * xp.expm1((a - 1) * Lh) * sign
        lo_form = (xp.exp(a * Ll - c) - xp.exp(Ll - c)) * sign
        return xp.where(lo, lo_form, hi_form)

    # r -> 0: v' -> 0 (α > 0) or -inf (α < 0); v - v' -> 1/α (α > 0) or +inf (α < 0)
    limits = (0.0, 1.0 / a) if a > 0 else (-math.inf, math.inf)
    return slope, lambda xp, L: -xp.expm1(a * L) / a, limits


def _js_scalar(t: float) -> float:
    if t == 0:
        return math.log(2) / 2
    return 0.5 * (t * math.log(t) - (1 + t) * math.log((1 + t) / 2))


def alpha_divergence(alpha: float) -> FDivergence:
    r"""The α-divergence, f(t) = (t^α - α t - (1 - α)) / (α(α - 1)) (tangent-corrected already).

    α → 1 is the forward KL, α → 0 the reverse KL (returned exactly for α = 1 and α = 0);
    α = 2 is χ²/2 and α = ½ is 2·(squared Hellinger). With k3(x) = e^x - 1 - x and
    ε = α - 1, the numerator is k3(αL) - α·k3(L) = e^L·k3(εL) + ε·(L e^L - e^L + 1), so

        f = (k3(αL) - α·k3(L)) / (α(α - 1))                      (no cancellation near α = 0)
          = (e^L·k3(εL)/ε + (L e^L - e^L + 1)) / α               (no cancellation near α = 1)

    the second used for α >= ½ where |εL| < 1 (so it tends continuously to forward KL as
    ε -> 0, and the first to reverse KL as α -> 0).
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
            derivative_forms=_FORWARD_KL_D,
        )
    if a == 0.0:
        return FDivergence(
            "alpha:0",
            lambda t: _neglog_scalar(t) + (t - 1.0),
            0.0,
            _reverse_kl,
            description="α = 0: reverse KL",
            params=(("alpha", 0.0),),
            derivative_forms=_REVERSE_KL_D,
        )
    denom = a * (a - 1.0)
    at_zero = 1.0 / a if a > 0 else math.inf
    log_denom = math.log(abs(denom))
    sign = 1.0 if denom > 0 else -1.0

    def form(xp: Any, L: Array) -> Array:
        if a < 0.5:
            return general(xp, L)
        # |εL| < 1, ε = α - 1: f = (e^L·k3(εL)/ε + (L e^L - e^L + 1)) / α, terms that do not
        # cancel (opposite signs only for α < 1, where near L = 0 they lose at most 1/α ≤ 2).
        # For L >= 1 as e^L·h/α, h = L - 1 + e^{-L} + k3(εL)/ε > 0, and where that overflows as
        # exp(L + log h - log α) by exp_or_inf: +inf with an infinite slope, never inf - inf.
        eps = a - 1.0
        finite = L > -xp.inf
        Lf = xp.where(finite, L, xp.zeros_like(L))
        near = xp.abs(eps * Lf) < 1
        Ln = xp.where(near, Lf, xp.zeros_like(Lf))
        k3e = nm.expm1mx(xp, eps * Ln) / eps
        low = Ln < 1
        Ll = xp.where(low, Ln, xp.zeros_like(Ln))
        Lh = xp.where(low, xp.ones_like(Ln), Ln)
        k3l = xp.where(low, k3e, xp.zeros_like(k3e))
        k3h = xp.where(low, xp.zeros_like(k3e), k3e)
        below = (xp.exp(Ll) * k3l + nm.lexpl_mexpm1(xp, Ll)) / a
        h = Lh - 1 + xp.exp(-Lh) + k3h
        # e^L·h/α directly where it fits (exp of the sum would amplify its rounding by L)
        log_above = Lh + xp.log(h) - math.log(a)
        big = log_above > nm.overflow_threshold(xp, L)
        Ls = xp.where(big, xp.ones_like(Lh), Lh)
        hs = xp.where(big, xp.ones_like(h), h)
        Lx = xp.where(big, log_above, xp.zeros_like(Lh))
        above = xp.where(big, nm.exp_or_inf(xp, Lx, Lh), xp.exp(Ls) * hs / a)
        near_value = xp.where(low, below, above)
        Lo = xp.where(near & finite, xp.zeros_like(L), L)
        return xp.where(near & finite, near_value, general(xp, Lo))

    def general(xp: Any, L: Array) -> Array:
        # |αL| and |L| below the overflow bound: (k3(αL) - α k3(L)) / (α(α - 1)), stable near 0.
        # Beyond it: with M = max(αL, L, 0), numerator = e^M (e^{αL-M} - α e^{L-M} - (1-α) e^{-M}),
        # every exponent <= 0, and the division and the (positive) bracket folded into the
        # exponent: a value that fits in the dtype is not lost to an overflow of e^M, and an
        # overflowing one gives +inf with a ±inf gradient, never inf · 0 = NaN.
        finite = L > -xp.inf
        Lf = xp.where(finite, L, xp.zeros_like(L))
        bound = nm.overflow_threshold(xp, L)
        ok = (xp.abs(a * Lf) < bound) & (xp.abs(Lf) < bound)
        if a > 0:  # L <= 0 with α > 0: no exponent is positive, nothing overflows; the scaled
            # bracket below would cancel to 0 (NaN) for small α, e.g. α = 1e-12, L = -100
            ok = ok | (Lf <= 0)
        # Both exponents below -4 (α > 0, L < 0): the constant dominates, the direct form has no
        # cancellation, and its slope α(e^{αL} - e^L)/(α(α-1)) keeps its digits (expm1's slope,
        # expm1(x) + 1, has lost them once e^x is below the dtype's epsilon).
        far_neg = ok & (a * Lf < -4) & (Lf < -4)
        Ln = xp.where(far_neg, Lf, xp.full_like(Lf, -5.0))
        direct = (xp.exp(a * Ln) - a * xp.exp(Ln) - (1 - a)) / denom
        Lk = xp.where(ok & ~far_neg, Lf, xp.zeros_like(Lf))
        k3_form = xp.where(
            far_neg, direct, (nm.expm1mx(xp, a * Lk) - a * nm.expm1mx(xp, Lk)) / denom
        )
        Lb = xp.where(ok, xp.ones_like(Lf), Lf)

        def bracket(M: Array) -> Array:  # sign·numerator·e^{-M}, > 0 where used
            b = sign * (xp.exp(a * Lb - M) - a * xp.exp(Lb - M) - (1 - a) * xp.exp(-M))
            return xp.where(ok, xp.ones_like(b), b)

        M = xp.maximum(xp.maximum(a * Lb, Lb), xp.zeros_like(Lb))
        # The scale S = ⌊log numerator⌋ has zero gradient (floor), so the gradient is not split
        # into huge cancelling parts, and bracket(S) >= 1 keeps value/bracket within the dtype.
        S = xp.floor(M + xp.log(bracket(M)))
        big_form = nm.exp_or_inf(xp, S - log_denom + xp.log(bracket(S)), Lb)
        value = xp.where(ok, k3_form, big_form)
        if a > 0:
            return xp.where(finite, value, xp.full_like(L, at_zero))
        # α < 0: +inf at L = -inf, with the slope's limit -inf (as for every L -> -inf)
        x_inf = xp.where(finite, xp.zeros_like(L), xp.full_like(L, math.inf))
        return xp.where(finite, value, nm.exp_or_inf(xp, x_inf, L))

    def f(t: float) -> float:
        if t == 0:
            return at_zero
        return (t**a - a * t - (1 - a)) / denom

    return FDivergence(
        f"alpha:{a:g}",
        f,
        0.0,
        form,
        description=f"α-divergence, α = {a:g}",
        params=(("alpha", a),),
        derivative_forms=_alpha_derivatives(a),
    )


def _xlogx_scalar(t: float) -> float:
    return 0.0 if t == 0 else t * math.log(t)


def _neglog_scalar(t: float) -> float:
    return math.inf if t == 0 else -math.log(t)


_REGISTRY: dict[str, FDivergence] = {}


def register_divergence(div: FDivergence, *, overwrite: bool = False) -> FDivergence:
    """Add ``div`` to the registry under ``div.name`` (usable as ``estimator=div.name``).

    Refused with :class:`KlestError`: a name that is not a non-empty string, that starts with
    ``alpha:`` or ``fdiv:``, or that is an estimator's name (k1, k3, k_opt, ...); an f with
    f(1) != 0 (to 1e-9), an f that is not convex, or an ``f_prime_at_1`` that is not a
    subgradient at 1 (checked on a grid of t from 1e-6 to 1e6), and a ``log_form`` that does not
    equal f(e^L) - f'(1)·(e^L - 1) on L in [-5, 5] (to 1e-6).
    """
    if not isinstance(div, FDivergence):
        raise KlestError("expected an FDivergence", argument="div", value=div)
    name = _names.check_divergence_name(div.name)  # format, reserved, not an estimator's name
    if name in _REGISTRY and not overwrite:
        raise KlestError(f"a divergence named {name!r} exists; pass overwrite=True", argument="div")
    _check_f(div)
    _REGISTRY[name] = div
    _names.add_divergence(name)
    return div


def _check_f(div: FDivergence) -> None:
    """Numerical checks of f: f(1) = 0, convexity, f'(1) a subgradient, log_form = f."""
    import numpy as np

    def f(t: float) -> float:
        try:
            v = float(div.f(t))
        except Exception as e:  # a user's f: whatever it raises is reported as bad input
            raise KlestError(f"f({t!r}) raised {type(e).__name__}: {e}", argument="div") from None
        if math.isnan(v):
            raise KlestError(f"f({t!r}) is NaN", argument="div")
        return v

    f1 = f(1.0)
    if abs(f1) > 1e-9:
        raise KlestError(f"f(1) must be 0, got {f1!r}", argument="div")
    ts = np.concatenate([np.geomspace(1e-6, 1e6, 241), [1.0]])
    ts = np.unique(ts)
    fs = np.array([f(float(t)) for t in ts])
    finite = np.isfinite(fs)
    t, v = ts[finite], fs[finite]
    scale = 1e-9 * (1.0 + np.abs(v))
    # convex: each point at or below the chord of its neighbours
    w = (t[1:-1] - t[:-2]) / (t[2:] - t[:-2])
    chord = (1 - w) * v[:-2] + w * v[2:]
    bad = np.flatnonzero(v[1:-1] > chord + scale[1:-1] + 1e-9 * (np.abs(v[:-2]) + np.abs(v[2:])))
    if bad.size:
        i = int(bad[0]) + 1
        raise KlestError(
            f"f must be convex: f({t[i]:.6g}) = {v[i]:.6g} lies above the chord from "
            f"t = {t[i - 1]:.6g} to t = {t[i + 1]:.6g}",
            argument="div",
        )
    below = np.flatnonzero(v < div.f_prime_at_1 * (t - 1) - scale)
    if below.size:
        i = int(below[0])
        raise KlestError(
            f"f_prime_at_1 = {div.f_prime_at_1!r} is not a slope of f at 1: "
            f"f({t[i]:.6g}) = {v[i]:.6g} lies below the tangent",
            argument="div",
        )
    if div.derivative_forms is not None:
        _check_derivative_forms(div)
    if div.log_form is not None:
        import array_api_compat.numpy as npx

        L = np.linspace(-5.0, 5.0, 11)
        got = np.asarray(div.log_form(npx, L), dtype=np.float64)
        want = np.array([f(math.exp(x)) - div.f_prime_at_1 * math.expm1(x) for x in L])
        if not np.allclose(got, want, rtol=1e-6, atol=1e-12):
            i = int(np.argmax(~np.isclose(got, want, rtol=1e-6, atol=1e-12)))
            raise KlestError(
                f"log_form disagrees with f at L = {L[i]:g}: {got[i]!r} against "
                f"f(e^L) - f'(1)·(e^L - 1) = {want[i]!r}",
                argument="div",
            )


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


def _check_derivative_forms(div: FDivergence) -> None:
    """The forms agree with the value: v' with its central difference (1e-5 relative) and
    v - v' with the value minus that slope (1e-7 relative to |v| + |v'|), on L in [-3, 3] away
    from 0 (where a non-smooth f has a kink)."""
    import array_api_compat.numpy as npx
    import numpy as np

    L = np.array([-3.0, -1.7, -0.6, -0.2, 0.25, 0.7, 1.4, 3.0])
    h = 1e-6
    with np.errstate(all="ignore"):
        v = np.asarray(div.corrected(npx, L), dtype=np.float64)
        diff = (
            np.asarray(div.corrected(npx, L + h), dtype=np.float64)
            - np.asarray(div.corrected(npx, L - h), dtype=np.float64)
        ) / (2 * h)
        slope = np.asarray(div.slope(npx, L), dtype=np.float64)
        gap = np.asarray(div.value_minus_slope(npx, L), dtype=np.float64)
        size = np.abs(v) + np.abs(slope)  # v - v' as a difference loses digits against these
        pairs = (("v'(L)", slope, diff, 1e-5), ("v(L) - v'(L)", gap, v - slope, 1e-7))
    for what, got, want, tol in pairs:
        with np.errstate(invalid="ignore"):
            close = np.abs(got - want) <= tol * np.abs(want) + 1e-9 + 1e-7 * size
        close |= ~np.isfinite(want)  # the value overflows there: nothing to compare with
        if not close.all():
            i = int(np.argmax(~close))
            raise KlestError(
                f"derivative_forms: {what} at L = {L[i]:g} is {got[i]!r}, the value gives "
                f"{want[i]!r}",
                argument="div",
            )


for _d in (
    FDivergence(
        "reverse_kl",
        _neglog_scalar,
        -1.0,
        _reverse_kl,
        plain_form=lambda xp, L: -L,
        description="KL(q‖p): f(t) = -log t; the corrected estimator is k3",
        derivative_forms=_REVERSE_KL_D,
    ),
    FDivergence(
        "forward_kl",
        _xlogx_scalar,
        1.0,
        _forward_kl,
        plain_form=nm.xlogx,
        description="KL(p‖q): f(t) = t log t; corrected: r log r - (r - 1)",
        derivative_forms=_FORWARD_KL_D,
    ),
    FDivergence(
        "chi2",
        lambda t: (t - 1.0) ** 2,
        0.0,
        _chi2,
        description="χ²(p‖q): f(t) = (t - 1)²",
        derivative_forms=_CHI2_D,
    ),
    FDivergence(
        "squared_hellinger",
        lambda t: (math.sqrt(t) - 1.0) ** 2,
        0.0,
        _hellinger,
        description="squared Hellinger: f(t) = (√t - 1)² (no ½ factor)",
        derivative_forms=_HELLINGER_D,
    ),
    FDivergence(
        "jensen_shannon",
        _js_scalar,
        0.0,
        _jensen_shannon,
        description="Jensen-Shannon: f(t) = ½[t log t - (1 + t) log((1 + t)/2)]",
        derivative_forms=_JS_D,
    ),
    FDivergence(
        "total_variation",
        lambda t: abs(t - 1.0) / 2,
        0.0,
        _total_variation,
        description="total variation: f(t) = ½|t - 1| (subgradient 0 at t = 1)",
        derivative_forms=_TV_D,
    ),
    FDivergence(
        "log_squared",
        lambda t: math.inf if t == 0 else 0.5 * math.log(t) ** 2,
        0.0,
        _log_squared,
        description="the f of k2: f(t) = ½(log t)²; k2 is unbiased for it",
        derivative_forms=_LOG_SQUARED_D,
    ),
):
    _REGISTRY[_d.name] = _d  # the built-ins are checked by the tests, not at every import
    _names.add_divergence(_d.name)
