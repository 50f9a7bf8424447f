"""Stable primitives on log-ratios ``L = log p - log q`` (generic over the array namespace).

Each primitive evaluates a function that vanishes to second order at ``L = 0``; the naive formulas
cancel catastrophically there. Near 0 (|L| < 1) a Taylor series is summed by Horner's rule with
enough terms for the dtype; elsewhere the closed form is used, whose rounding error is then a few
ulp. The series branch sees a "safe" argument (0 outside its region) so that neither branch can
produce inf/NaN in the value or the gradient of the other (the double-``where`` trick).
"""

from __future__ import annotations

import math
from typing import Any

from ._backend import Array

__all__ = [
    "expm1mx",
    "lexpl_mexpm1",
    "series_coefficients",
    "xlogx",
]

# Beyond this |L| the closed forms are accurate to a few ulp; below it the series is used.
SERIES_RADIUS = 1.0


def series_coefficients(kind: str, dtype_bits: int) -> tuple[float, ...]:
    """Coefficients c_2..c_N (index 0 is c_2) of the Taylor series of the primitive ``kind``.

    ``expm1mx``: e^L - 1 - L = Σ_{k>=2} L^k / k!
    ``lexpl_mexpm1``: L e^L - (e^L - 1) = Σ_{k>=2} (k - 1) L^k / k!
    N is the smallest order whose first omitted term is below half an ulp of the smallest value
    the function takes on |L| <= 1 (about 0.26), for the dtype's precision.
    """
    last = 12 if dtype_bits == 32 else 19
    if kind == "expm1mx":
        return tuple(1.0 / math.factorial(k) for k in range(2, last + 1))
    if kind == "lexpl_mexpm1":
        return tuple((k - 1) / math.factorial(k) for k in range(2, last + 1))
    raise ValueError(kind)


def _bits(xp: Any, x: Array) -> int:
    return 64 if x.dtype == xp.float64 else 32


def _series(xp: Any, L: Array, coeffs: tuple[float, ...]) -> Array:
    """L² · (c_2 + c_3 L + ... + c_N L^(N-2)) by Horner's rule."""
    p = xp.full_like(L, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        p = p * L + c
    return p * (L * L)


def _split(xp: Any, L: Array) -> tuple[Array, Array, Array]:
    """(small, L_small, L_big): mask of the series region and the two safe arguments."""
    small = xp.abs(L) < SERIES_RADIUS
    zero = xp.zeros_like(L)
    return small, xp.where(small, L, zero), xp.where(small, zero + 2 * SERIES_RADIUS, L)


def expm1mx(xp: Any, L: Array) -> Array:
    """e^L - 1 - L, accurate to a few ulp for every finite L; +inf at L = -inf.

    This is k3 (and the per-sample reverse-KL control-variate term).
    """
    small, Ls, Lb = _split(xp, L)
    near = _series(xp, Ls, series_coefficients("expm1mx", _bits(xp, L)))
    far = xp.expm1(Lb) - Lb
    return xp.where(small, near, far)


def lexpl_mexpm1(xp: Any, L: Array) -> Array:
    """L·e^L - (e^L - 1) = r log r - (r - 1), accurate to a few ulp; 1 at L = -inf (r = 0).

    This is the forward-KL control-variate estimator.
    """
    small, Ls, Lb = _split(xp, L)
    near = _series(xp, Ls, series_coefficients("lexpl_mexpm1", _bits(xp, L)))
    finite = Lb > -xp.inf
    Lf = xp.where(finite, Lb, xp.zeros_like(Lb))  # avoid (-inf)·0 in value and gradient
    # L >= 1: e^L (L - 1) + 1, a sum of non-negative terms that overflows to +inf, never inf - inf;
    # L <= -1: L e^L - expm1(L), both terms bounded.
    pos = Lf > 0
    Lp = xp.where(pos, Lf, xp.ones_like(Lf))
    Ln = xp.where(pos, -xp.ones_like(Lf), Lf)
    far_pos = xp.exp(Lp) * (Lp - 1) + 1
    far_neg = Ln * xp.exp(Ln) - xp.expm1(Ln)
    far = xp.where(finite, xp.where(pos, far_pos, far_neg), xp.ones_like(Lb))
    return xp.where(small, near, far)


def xlogx(xp: Any, L: Array) -> Array:
    """r·log r = L·e^L from L, with the limit 0 at L = -inf (r = 0)."""
    finite = L > -xp.inf
    Lf = xp.where(finite, L, xp.zeros_like(L))
    return xp.where(finite, Lf * xp.exp(Lf), xp.zeros_like(L))


def overflow_threshold(xp: Any, L: Array) -> float:
    """A bound below log(largest finite value) of L's dtype: exp of anything under it is finite."""
    return float(math.log(xp.finfo(L.dtype).max)) - 2.0


def softplus(xp: Any, x: Array) -> Array:
    """log(1 + e^x) without overflow."""
    return xp.logaddexp(xp.zeros_like(x), x)
