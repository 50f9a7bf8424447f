"""Stable primitives on log-ratios ``L = log p - log q`` (generic over the array namespace).

Each primitive evaluates a function that vanishes to second order at ``L = 0``; the naive formulas
cancel catastrophically there. Near 0 (|L| < 1) a Taylor series is summed by Horner's rule with
enough terms for the dtype; elsewhere the closed form is used, whose rounding error is then a few
ulp. The series branch sees a "safe" argument (0 outside its region) so that neither branch can
produce inf/NaN in the value or the gradient of the other (the double-``where`` trick).
"""

from __future__ import annotations

import functools
import math
from typing import Any

from ._backend import Array

__all__ = [
    "exp_or_inf",
    "expm1",
    "expm1mx",
    "expm1mx_closed",
    "lexpl_mexpm1",
    "lexpl_mexpm1_closed",
    "numpy_values",
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


def _is_numpy(xp: Any) -> bool:
    import array_api_compat

    return bool(array_api_compat.is_numpy_namespace(xp))


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
    if _is_numpy(xp):
        return _numpy_kernel("expm1mx", L)
    small, Ls, Lb = _split(xp, L)
    near = _series(xp, Ls, series_coefficients("expm1mx", _bits(xp, L)))
    return xp.where(small, near, expm1mx_closed(xp, Lb))


def expm1mx_closed(xp: Any, L: Array) -> Array:
    """e^L - 1 - L by its closed form expm1(L) - L, without the series: relative error about
    eps/|L| near 0 (the few-ulp forms add the series there). In float64 for float32-origin L it
    is float32-accurate for |L| > 2^-25 and within 1e-24 absolutely below. +inf at L = -inf."""
    return xp.expm1(L) - L


def lexpl_mexpm1(xp: Any, L: Array) -> Array:
    """L·e^L - (e^L - 1) = r log r - (r - 1), accurate to a few ulp; 1 at L = -inf (r = 0).

    This is the forward-KL control-variate estimator.
    """
    if _is_numpy(xp):
        return _numpy_kernel("lexpl_mexpm1", L)
    small, Ls, Lb = _split(xp, L)
    near = _series(xp, Ls, series_coefficients("lexpl_mexpm1", _bits(xp, L)))
    return xp.where(small, near, lexpl_mexpm1_closed(xp, Lb, keep_slope=True))


def lexpl_mexpm1_closed(xp: Any, L: Array, keep_slope: bool = False) -> Array:
    """L·e^L - expm1(L) by its closed forms, without the series (relative error about 3·eps/|L|
    near 0; see :func:`expm1mx_closed` for float32-origin L in float64); 1 at L = -inf.

    L > 1: e^L (L - 1) + 1, a sum of non-negative terms that overflows to +inf, never inf - inf;
    L <= 1: L e^L - expm1(L), both terms bounded. ``keep_slope``: expm1 by :func:`expm1`, whose
    gradient keeps its digits for very negative L (for differentiable callers)."""
    finite = L > -xp.inf
    Lf = xp.where(finite, L, xp.zeros_like(L))  # avoid (-inf)·0 in value and gradient
    pos = Lf > 1
    Lp = xp.where(pos, Lf, xp.full_like(Lf, 2.0))
    Ln = xp.where(pos, xp.zeros_like(Lf), Lf)
    far_pos = xp.exp(Lp) * (Lp - 1) + 1
    far_neg = Ln * xp.exp(Ln) - (expm1(xp, Ln) if keep_slope else xp.expm1(Ln))
    return xp.where(finite, xp.where(pos, far_pos, far_neg), xp.ones_like(L))


def xlogx(xp: Any, L: Array) -> Array:
    """r·log r = L·e^L from L, with the limit 0 at L = -inf (r = 0)."""
    finite = L > -xp.inf
    Lf = xp.where(finite, L, xp.zeros_like(L))
    return xp.where(finite, Lf * xp.exp(Lf), xp.zeros_like(L))


def overflow_threshold(xp: Any, L: Array) -> float:
    """A bound below log(largest finite value) of L's dtype: exp of anything under it is finite."""
    return float(math.log(xp.finfo(L.dtype).max)) - 2.0


@functools.lru_cache(maxsize=4)
def _exp_limit(bits: int) -> float:
    """The largest x (one ulp of margin) whose e^x is finite in a float of ``bits`` bits."""
    import numpy as np

    dt = np.float32 if bits == 32 else np.float64
    y = dt(math.log(np.finfo(dt).max))
    with np.errstate(over="ignore"):
        while not np.isfinite(np.exp(y)):
            y = np.nextafter(y, dt(0))
    return float(np.nextafter(y, dt(0)))


def exp_or_inf(xp: Any, x: Array, L: Array) -> Array:
    r"""e^x, where ``x`` is an expression of ``L`` that grows with |L| where e^x overflows.

    Where e^x fits the dtype this is ``exp(x)`` with its exact gradient. Where it overflows the
    value is +inf and the gradient ±inf (the sign of L, the sign of dx/dL there), reaching L
    directly: back-propagating an infinite upstream gradient through x's own graph would meet
    slopes that underflowed to 0 (e.g. of e^{-L}) and give inf · 0 = NaN. Double ``where``: the
    overflow branch sees L = 0 where it is not taken, the other branch sees x = 0 where it is.
    """
    if _is_numpy(xp):  # no gradients to protect
        return xp.exp(x)
    over = x > _exp_limit(_bits(xp, x))
    x_safe = xp.where(over, xp.zeros_like(x), x)
    L_over = xp.where(over, L, xp.zeros_like(L))
    # exp(K·|L|) with K the dtype's largest value: +inf for any L != 0, slope ±inf; 1 at L = 0.
    inf_branch = xp.exp(xp.abs(L_over) * float(xp.finfo(L.dtype).max))
    return xp.where(over, inf_branch, xp.exp(x_safe))


def expm1(xp: Any, x: Array) -> Array:
    """e^x - 1 whose gradient keeps its digits for very negative x.

    Backends differentiate ``expm1`` as expm1(x) + 1, which loses the relative precision of the
    slope e^x as x falls (all of it once e^x is below the dtype's epsilon). Below x = -4, e^x - 1
    has no cancellation (within an ulp of expm1) and its slope e^x is exact; above, expm1's slope
    is off by at most e^4 ulp. -1 at x = -inf.
    """
    cut = -4.0
    low = x < cut
    x_lo = xp.where(low, x, xp.full_like(x, cut - 1))
    x_hi = xp.where(low, xp.zeros_like(x), x)
    return xp.where(low, xp.exp(x_lo) - 1, xp.expm1(x_hi))


def softplus(xp: Any, x: Array) -> Array:
    """log(1 + e^x) without overflow."""
    return xp.logaddexp(xp.zeros_like(x), x)


# ------------------------------------------------------------------------- NumPy kernels
# For NumPy the same functions are evaluated in float64, with the series summed only on the
# elements that need it (a series over the whole array, kept by np.where, would cost ~20 passes).
# float32-origin values: the float64 closed form is already exact to float32 precision down to
# |L| ~ 2^-25 (its absolute error ~2^-52·|L| is under half a float32 ulp of L²/2 there), so only
# |L| < 2^-20 takes a 2-term series, and only when the values show such an L exists: the
# closed forms give less than 2^-40 exactly there (the functions are ≈ L²/2 ≥ 0 near 0), so one
# min-reduction over the values rules them out. float64 values: |L| < 1 takes the full series,
# as in the generic code.
#
# The lab's Monte Carlo values (float64 L formed from draws) take ``radius=LAB_SERIES_RADIUS``:
# the closed forms' relative error is at most about c·eps/|L| near 0 (c = 1 for expm1mx, 3 for
# lexpl_mexpm1, measured against mpmath), so with the series on |L| < 2^-4 only, every value is
# within LAB_RTOL = 2^-44 (5.7e-14) relative, with a margin of 5 for expm1 kernels a few ulp
# worse than NumPy's: the bound the compiled kernels' vectorised path promises (klest._fast).
# Far below any Monte Carlo error, and the series over most of the chunk (~20 passes) is avoided.
_NP_CHUNK = 1 << 14
F32_SERIES_RADIUS = 2.0**-20
_F32_CANDIDATE = 2.0**-40  # above every computed value at |L| < F32_SERIES_RADIUS
LAB_SERIES_RADIUS = 2.0**-4
LAB_RTOL = 2.0**-44


def numpy_values(
    kind: str, x: Any, out: Any, single: bool = False, radius: float = SERIES_RADIUS
) -> Any:
    """``out[:] = kind(x)`` in float64 for a 1-D float32 or float64 NumPy ``x`` (``kind``:
    "expm1mx" or "lexpl_mexpm1"); ``single``: x holds values of float32 origin, which need float32
    accuracy only; ``radius``: the series is summed where |x| < radius (float64 ``x``): the
    default gives a few ulp, ``LAB_SERIES_RADIUS`` gives ``LAB_RTOL`` relative."""
    import numpy as np

    if x.size == 0:
        return out
    with np.errstate(invalid="ignore", over="ignore"):
        if single:
            _closed_form(kind, x, out)
            if np.minimum.reduce(out) < _F32_CANDIDATE:
                idx = np.flatnonzero(np.abs(x) < F32_SERIES_RADIUS)
                if idx.size:
                    coeffs = series_coefficients(kind, 64)[:2]
                    out[idx] = _horner(x[idx], coeffs, np.empty(idx.size))
            return out
        w = np.abs(x)
        near = w < radius
        n_near = int(np.count_nonzero(near))
        if radius < SERIES_RADIUS:  # few terms at any |L| below a small radius: no masked max
            coeffs = _enough_terms(kind, radius)
        else:
            coeffs = _enough_terms(kind, float(np.max(w, where=near, initial=0.0)) if n_near else 0)
        if 2 * n_near > x.size:  # mostly near 0: the series in place, the closed form on the rest
            _horner(x, coeffs, out)
            far = np.flatnonzero(~near)
            if far.size:
                out[far] = _closed_form(kind, x[far], np.empty(far.size))
        else:  # mostly far: the closed form in place, the series on the rest
            _closed_form(kind, x, out)
            if n_near:
                idx = np.flatnonzero(near)
                out[idx] = _horner(x[idx], coeffs, np.empty(idx.size))
    return out


def _enough_terms(kind: str, m: float) -> tuple[float, ...]:
    """The fewest leading series coefficients that give float64 accuracy for |L| <= m <= 1.

    Both functions are at least 0.26·L² on |L| <= 1 (their values at L = -1 are e^-1 and
    1 - 2/e), and the ratio ρ_k = m·c_(k+1)/c_k of their successive terms falls with k, so
    stopping before c_k leaves a relative error below c_k·m^(k-2) / ((1 - ρ_k)·0.26); k is the
    first order that makes this 2^-54 (about the full series of the generic code at m near 1).
    """
    full = series_coefficients(kind, 64)
    for j in range(1, len(full) - 1):  # keep c_2..c_(j+1); c_(j+2) = full[j] is the first omitted
        rho = m * full[j + 1] / full[j]
        if full[j] * m**j <= (1.0 - rho) * 0.26 * 2.0**-54:
            return full[:j]
    return full


def _numpy_kernel(kind: str, L: Any) -> Any:
    import numpy as np

    L = np.asarray(L)
    out = np.empty(L.shape, dtype=L.dtype)
    src = L.reshape(-1)
    dst = out.reshape(-1)
    single = L.dtype == np.float32
    size = min(_NP_CHUNK, src.size)
    X = np.empty(size)
    V = np.empty(size)
    for a in range(0, src.size, _NP_CHUNK):
        b = min(a + _NP_CHUNK, src.size)
        x, v = X[: b - a], V[: b - a]
        np.copyto(x, src[a:b])
        numpy_values(kind, x, v, single)
        np.copyto(dst[a:b], v, casting="same_kind")
    return out


def _horner(x: Any, coeffs: tuple[float, ...], out: Any) -> Any:
    """out = x² · (c_2 + c_3 x + ...), in place (float64 NumPy arrays)."""
    import numpy as np

    out.fill(coeffs[-1])
    for c in reversed(coeffs[:-1]):
        np.multiply(out, x, out=out)
        out += c
    np.multiply(out, x, out=out)
    np.multiply(out, x, out=out)
    return out


def _closed_form(kind: str, x: Any, out: Any) -> Any:
    """:func:`expm1mx_closed` and :func:`lexpl_mexpm1_closed` written in place for NumPy
    (float64, into ``out``): the NumPy chunk kernels' form of them, with no temporaries."""
    import numpy as np

    with np.errstate(invalid="ignore", over="ignore"):
        # dtype=float64: x may hold float32 values, computed in float64 all the same
        if kind == "expm1mx":
            if x.dtype == np.float64:
                np.expm1(x, out=out)
            else:  # widened once, so that expm1 runs without casting buffers (~10 % faster)
                np.copyto(out, x)
                np.expm1(out, out=out)
            np.subtract(out, x, out=out, dtype=np.float64)
            return out
        e = np.exp(x, dtype=np.float64)
        np.multiply(x, e, out=out, dtype=np.float64)
        out -= np.expm1(x, dtype=np.float64)  # below 1
        big = x >= 1
        if big.any():
            out[big] = e[big] * (x[big] - 1) + 1  # above 1: no inf - inf
        out[x == -np.inf] = 1.0
        return out
