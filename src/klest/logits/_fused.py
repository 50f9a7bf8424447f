r"""Compiled form of the full-vocabulary KL's chunk pass (``klest[fast]``, CPU, float32).

:func:`klest.logits._kl.chunk_pass` computes, per row, the maxima, log-normalisers and
KL(softmax x ‖ softmax y) with a dozen torch ops, each a pass over a chunk of rows. Here the same
quantities come from three passes over each row (which stays in L2) in one compiled loop:

1. the maxima m_x, m_y (and a finite check: a row holding NaN or ±inf, or whose scaled logits
   x/T − m_x overflow, is left to the torch path, whose rules for −inf logits and errors for
   NaN/+inf apply unchanged);
2. e_v = e^{t_v}, t = x − m_x, and u = y − m_y: S_x = Σ e_v, S_y = Σ e^{u_v} and
   A = Σ e_v (t_v − u_v), summed in float64; then KL = A/S_x − log S_x + log S_y (the formula of
   :mod:`klest.logits._kl`; the normalisers are returned as c_x = log S_x, relative to m_x);
3. when the gradient is wanted: ∂KL/∂x = (e_v/S_x)·((t_v − u_v) − (log S_x − log S_y) − KL)
   (e_v kept from pass 2 in the gradient's own row), or ∂KL/∂y = e^{u_v}/S_y − e_v/S_x.

exp is evaluated in float32 by range reduction (t = k ln 2 + r, |r| ≤ ln 2 / 2, e^r by a degree-7
polynomial, 2^k written into the exponent bits): within one float32 ulp for t ≥ −87 (0.64 ulp
measured; the loops vectorise, numba's own exp is a scalar call); below −87 it is 0 (e^t <
2^−125 there), so entries masked with a large finite negative logit such as finfo.min contribute
exactly nothing, as they do in float64.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._config import fast_wanted

__all__ = ["available", "kl_rows"]

_nb: Any
try:
    import numba as _nb
except ImportError:  # the extra is not installed: the torch path is used
    _nb = None

BLOCK = 2048  # elements per block of the exp loops (8 KiB float32 buffers, in L1)


def available() -> bool:
    """numba is importable and compiled kernels are wanted (``klest.options(fast=...)``)."""
    return _nb is not None and fast_wanted()


def kl_rows(
    x: np.ndarray,
    y: np.ndarray,
    rows: np.ndarray,
    inv_t: float,
    grad: np.ndarray | None,
    swap: bool,
    stats: np.ndarray,
) -> None:
    """Per-row statistics of KL(softmax(x·inv_t) ‖ softmax(y·inv_t)) for the listed rows.

    ``x``, ``y``: float32 [N, V] with unit stride along V; ``rows``: int64 row indices;
    ``grad``: float32 [N, V] (unit stride) to receive ∂KL/∂x (∂KL/∂y when ``swap``), or None;
    ``stats``: float64 [N, 6] receiving (m_x, m_y, c_x, c_y, KL, bad) per listed row, bad = 1
    for a row holding a non-finite value (nothing else of that row is written)."""
    g = grad if grad is not None else np.empty((1, 1), dtype=np.float32)
    _rows(
        _span(x),
        x.strides[0] // 4,
        _span(y),
        y.strides[0] // 4,
        _span(g),
        g.strides[0] // 4,
        x.shape[1],
        rows,
        float(inv_t),
        grad is not None,
        bool(swap),
        stats,
    )


def _span(a: np.ndarray) -> np.ndarray:
    """The 1-D float32 view covering a 2-D array's rows (row i starts at i·stride)."""
    n, v = a.shape
    return np.lib.stride_tricks.as_strided(a, ((n - 1) * (a.strides[0] // 4) + v,), (4,))


if _nb is not None:
    _LOG2E = np.float32(1.4426950408889634)
    _LN2_HI = np.float32(0.693359375)  # ln 2 = _LN2_HI + _LN2_LO, the first exact in float32
    _LN2_LO = np.float32(-2.12194440e-4)
    _LOW = np.float32(-87.0)  # e^t is taken as 0 below (the smallest normal float32 is e^-87.3)
    _ROUND = np.float32(1.5 * 2.0**23)  # adding it rounds a float32 below 2^22 to an integer
    _P = tuple(np.float32(1.0 / math.factorial(k)) for k in range(8))  # e^r, |r| <= 0.347

    @_nb.njit(cache=True, nogil=True, fastmath={"contract"})
    def _exp_block(t: np.ndarray, out: np.ndarray, bits: np.ndarray) -> None:
        """out[i] = e^{t[i]} for t <= 0 (float32; see the module notes)."""
        p = _P
        for i in range(t.size):
            z = t[i] if t[i] > _LOW else _LOW  # a select (max() would not vectorise)
            k = (z * _LOG2E + _ROUND) - _ROUND  # nearest integer, by float32 rounding
            r = (z - k * _LN2_HI) - k * _LN2_LO
            q = p[7] * r + p[6]
            q = q * r + p[5]
            q = q * r + p[4]
            q = q * r + p[3]
            q = q * r + p[2]
            q = q * r + p[1]
            q = q * r + p[0]
            out[i] = q if t[i] >= _LOW else np.float32(0.0)  # e^t < 2^-125: 0
            bits[i] = (np.int32(k) + 127) << 23
        scale = bits.view(np.float32)
        for i in range(t.size):
            out[i] *= scale[i]

    @_nb.njit(cache=True, nogil=True, fastmath={"reassoc"})
    def _check(a: np.ndarray) -> float:
        """Σ a in float64: not finite iff a holds NaN or ±inf (or float64 overflow, impossible
        for float32 inputs of a vocabulary below 2^100 entries)."""
        s = 0.0
        for i in range(a.size):
            s += a[i]
        return s

    @_nb.njit(cache=True, nogil=True)
    def _extremes(a: np.ndarray) -> tuple[float, float]:
        """(min, max) of a finite float32 a (checked by :func:`_check` first), through integer
        keys that order like the values (an integer min/max vectorises; a float one needs
        fast-math)."""
        bits = a.view(np.int32)
        lo = bits[0] ^ ((bits[0] >> 31) & 0x7FFF_FFFF)
        hi = lo
        for i in range(bits.size):
            key = bits[i] ^ ((bits[i] >> 31) & 0x7FFF_FFFF)
            lo = min(lo, key)
            hi = max(hi, key)
        keys = np.empty(2, dtype=np.int32)
        keys[0] = lo ^ ((lo >> 31) & 0x7FFF_FFFF)
        keys[1] = hi ^ ((hi >> 31) & 0x7FFF_FFFF)
        vals = keys.view(np.float32)
        return vals[0], vals[1]

    @_nb.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def _sums(
        ex: np.ndarray, ey: np.ndarray, tx: np.ndarray, ty: np.ndarray
    ) -> tuple[float, float, float]:
        """(Σ ex, Σ ey, Σ ex·(tx − ty)) in float64 (split across SIMD lanes: reassociated)."""
        sx = 0.0
        sy = 0.0
        sa = 0.0
        for i in range(ex.size):
            sx += ex[i]
            sy += ey[i]
            sa += np.float64(ex[i]) * (np.float64(tx[i]) - np.float64(ty[i]))  # no overflow
        return sx, sy, sa

    @_nb.njit(cache=True, nogil=True, fastmath={"contract"})
    def _rows(
        X: np.ndarray,
        xs: int,
        Y: np.ndarray,
        ys: int,
        G: np.ndarray,
        gs: int,
        V: int,
        rows: np.ndarray,
        inv_t: float,
        want_grad: bool,
        swap: bool,
        stats: np.ndarray,
    ) -> None:
        s = np.float32(inv_t)
        tx = np.empty(BLOCK, dtype=np.float32)
        ty = np.empty(BLOCK, dtype=np.float32)
        ex = np.empty(BLOCK, dtype=np.float32)
        ey = np.empty(BLOCK, dtype=np.float32)
        bits = np.empty(BLOCK, dtype=np.int32)
        for row in rows:
            x = X[row * xs : row * xs + V]
            y = Y[row * ys : row * ys + V]
            if not (math.isfinite(_check(x)) and math.isfinite(_check(y))):
                stats[row, 5] = 1.0
                continue
            xlo, xhi = _extremes(x)
            ylo, yhi = _extremes(y)
            mx = xhi * s
            my = yhi * s
            # the scaled, shifted logits must be finite too (x·s overflows for s > 1 at logits
            # near the float32 limit, e.g. a mask written as finfo.min): else the torch ops
            if not (math.isfinite(xlo * s - mx) and math.isfinite(ylo * s - my)):
                stats[row, 5] = 1.0
                continue
            g = G[row * gs : row * gs + V] if want_grad else G[0:0]
            Sx = 0.0
            Sy = 0.0
            A = 0.0
            for a in range(0, V, BLOCK):
                n = min(BLOCK, V - a)
                xa = x[a : a + n]
                ya = y[a : a + n]
                for i in range(n):
                    tx[i] = xa[i] * s - mx
                    ty[i] = ya[i] * s - my
                _exp_block(tx[:n], ex[:n], bits[:n])
                _exp_block(ty[:n], ey[:n], bits[:n])
                sx, sy, sa = _sums(ex[:n], ey[:n], tx[:n], ty[:n])
                Sx += sx
                Sy += sy
                A += sa
                if want_grad:
                    ga = g[a : a + n]
                    src = ey if swap else ex
                    for i in range(n):
                        ga[i] = src[i]
            lsx = math.log(Sx)
            lsy = math.log(Sy)
            kl = max(A / Sx - lsx + lsy, 0.0)
            stats[row, 0] = mx
            stats[row, 1] = my
            stats[row, 2] = lsx
            stats[row, 3] = lsy
            stats[row, 4] = kl
            stats[row, 5] = 0.0
            if not want_grad:
                continue
            if swap:  # ∂KL/∂y = e^u/S_y − e^t/S_x
                iy = np.float32(1.0 / Sy)
                ix = np.float32(1.0 / Sx)
                for a in range(0, V, BLOCK):
                    n = min(BLOCK, V - a)
                    xa = x[a : a + n]
                    for i in range(n):
                        tx[i] = xa[i] * s - mx
                    _exp_block(tx[:n], ex[:n], bits[:n])
                    ga = g[a : a + n]
                    for i in range(n):
                        ga[i] = ga[i] * iy - ex[i] * ix
                continue
            ix = np.float32(1.0 / Sx)
            c = np.float32(lsx - lsy + kl)
            for a in range(0, V, BLOCK):  # ∂KL/∂x = (e^t/S_x)·((t − u) − c)
                n = min(BLOCK, V - a)
                xa = x[a : a + n]
                ya = y[a : a + n]
                ga = g[a : a + n]
                for i in range(n):
                    d = (xa[i] * s - mx) - (ya[i] * s - my)
                    ga[i] = ga[i] * ix * (d - c)
