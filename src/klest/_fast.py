r"""Optional compiled kernels (numba, the ``klest[fast]`` extra): fused per-chunk moments.

``KERNELS[name](L)`` returns ``(mean, m2, vmin, vmax)`` of the per-sample values of an estimator on
a 1-D chunk of log-ratios L (float32 or float64), accumulated in float64: what NumPy gives for
``v = values(L.astype(float64)); v.mean(), ((v - v.mean())**2).sum(), v.min(), v.max()`` up to
rounding, non-finite cases included. :func:`quadratic_moments` does the same for the lab's normal
pairs, where L = a·x² + b·x + c is formed on the fly and never stored. :func:`kopt_comoments`
gives k_opt's co-moments of (L, k3, r - 1) over a chunk, with k3 from the same value loops.
Each kernel also has a column form, ``KERNELS[name].columns(X)``: per-column (mean, m2) of a
2-D X reduced over axis 0, read row by row in tiles (no transpose; ``estimate(axis=0)`` on a
C-ordered matrix). Importing this module never fails; without numba ``KERNELS`` is empty and
:func:`available` is False.

**How the values are computed.** The chunk is cut into sub-blocks of ``SUB`` elements that stay in
L1 cache; each is converted to float64, its values are written to a buffer, and the buffer's sum,
centred sum of squares, min and max are merged into running moments (Chan et al.).

* float64 input (and any sub-block holding a non-finite L or one beyond ``LIMIT``): the accurate
  scalar forms of :mod:`klest._numerics` — a Taylor series for |L| < 1, otherwise
  ``expm1(L) - L`` (k3) and ``e^L (L - 1) + 1`` / ``L e^L - expm1(L)`` (forward_k3), with the
  limits at L = ±inf. A few float64 ulp, like the NumPy path.
* float32 input (and the lab's quadratic L): a branch-free loop that the compiler vectorises. The
  sub-block's largest |L| fixes s with |y| = |L|/2^s ≤ 1; k3(y) = Σ_{k≥2} y^k/k! is summed to
  k = 18 (the first omitted term is below 2⁻⁵⁵ of the value) and then doubled s times with the
  exact identity

  .. math:: k_3(2y) = y^2 + k_3(y)\,(2 + 2y + k_3(y)),

  and e^y = 1 + y + k_3(y) by squaring. A step at most doubles a relative error (s ≤ 7 for
  |L| ≤ 128), so the values are within 2^8 eps = 5.7e-14 relative: far below half a float32 ulp
  (6e-8) and within the 1e-12 agreement asked of the means. forward_k3 = L² + k_3(L)(L - 1) for
  |L| < 1 (cancellation at most 4×) and e^L (L - 1) + 1 otherwise; forward_k1 = L e^L.

fastmath is off in every value loop except for ``contract`` (fused multiply-add: one rounding
where there were two, so no error bound above gets worse). The sums allow reassociation
(``reassoc``: split across SIMD lanes, a different but no less accurate rounding, like NumPy's
pairwise sum); they only see a sub-block whose values are then checked finite. min/max go through
integer keys that order like the values (integer reductions vectorise without fast-math).

Compilation happens on first use per input dtype and is cached on disk (``cache=True``: in
``__pycache__`` beside this file, or numba's per-user cache directory when that is not writable,
or ``$NUMBA_CACHE_DIR`` when set), so only the first run on a machine pays it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ._config import fast_wanted
from ._numerics import series_coefficients
from .errors import KlestError

__all__ = [
    "KERNELS",
    "KOPT_FIELDS",
    "LAB_PAIR_FIELDS",
    "LIMIT",
    "SUB",
    "available",
    "kopt_comoments",
    "lab_state",
    "quadratic_lab",
    "quadratic_moments",
    "values",
]

Moments = tuple[float, float, float, float]

SUB = 1024  # elements per sub-block: 8 KiB float64 buffers, in L1 cache (measured best)
TILE_ROWS, TILE_COLS = 8, 128  # column reductions: tiles of SUB elements (4-16 rows: alike)
LIMIT = 128.0  # largest |L| the doubling path takes: s <= 7, e^128 is finite in float64
RADIUS = 1.0  # |y| after range reduction
CODES = {"k1": 0, "k2": 1, "k3": 2, "forward_k1": 3, "forward_k3": 4}

# Taylor coefficients c_2, c_3, ... (index 0 is c_2), from the one place they are defined.
# Tuples, not arrays: numba compiles them in as constants (a global array would stop caching).
_K3_SERIES = series_coefficients("expm1mx", 64)  # c_2..c_19: |L| < 1, float64 precision
_FK3_SERIES = series_coefficients("lexpl_mexpm1", 64)
assert len(_K3_SERIES) == len(_FK3_SERIES) == 18  # the Horner loops below are written out
_C = _K3_SERIES[:17]  # c_2..c_18: |y| <= 1 to float64 precision

KERNELS: dict[str, Callable[[np.ndarray], Moments]] = {}

_nb: Any
try:
    import numba as _nb
except ImportError:  # the extra is not installed: KERNELS stays empty
    _nb = None


def available() -> bool:
    """Whether the compiled kernels are used: numba is importable, ``klest.options(fast=...)`` is
    true (the default) and the environment variable ``KLEST_FAST`` is not ``0``."""
    return _nb is not None and fast_wanted()


def values(name: str, L: np.ndarray, *, fast: bool | None = None) -> np.ndarray:
    """The per-sample float64 values the kernel of ``name`` reduces (for tests and inspection).

    ``fast``: use the vectorised doubling path where it applies (default: for float32 input, as
    the kernels do); False forces the accurate scalar forms.
    """
    _need_numba()
    L = _as_chunk(L)
    use_fast = L.dtype == np.float32 if fast is None else fast
    out = np.empty(L.size)
    _values_1d(L, CODES[name], use_fast, out)
    return out


def quadratic_moments(x: np.ndarray, coeffs: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """Moments of estimators on L_p = a_p·x² + b_p·x + c_p, for each target p, in one pass over x.

    ``x``: 1-D float64 draws; ``coeffs``: float64 [P, 3] rows (a, b, c); ``names``: estimator
    names from ``KERNELS``. Returns float64 [P, len(names), 4]: (mean, m2, vmin, vmax) per
    (p, name), each as ``KERNELS[name]`` would give on the materialised L_p. L is formed as
    (a·x + b)·x + c in float64 and its values take the vectorised path.
    """
    _need_numba()
    x = np.ascontiguousarray(x, dtype=np.float64).reshape(-1)
    coeffs = np.ascontiguousarray(coeffs, dtype=np.float64).reshape(-1, 3)
    codes = np.array([CODES[n] for n in names], dtype=np.int64)
    out = np.empty((coeffs.shape[0], codes.size, 4))
    _quadratic(x, coeffs, codes, out)
    return out


#: What :func:`kopt_comoments` returns, in order.
KOPT_FIELDS = (
    "n", "mean_L", "mean_k3", "mean_e",
    "S_LL", "S_kk", "S_ee", "S_Lk", "S_Le", "S_ke",
    "n_inf", "bad",
)  # fmt: skip


def kopt_comoments(L: np.ndarray) -> np.ndarray:
    r"""The co-moments k_opt needs of a 1-D chunk of L, in one pass (float64 [12], see
    :data:`KOPT_FIELDS`): over the samples with L > -inf, their count, the means of (L, k3, e)
    with k3 the kernel's value of k3 and e = r - 1 = L + k3, and the centred co-moments
    S_ab = Σ (a - ā)(b - b̄); the count of samples with L = -inf; and ``bad`` = 1 when a value
    or co-moment is not finite (a NaN L, or values too large for float64 moments), in which case
    the rest is meaningless and the caller takes the NumPy path. Merged across sub-blocks with
    Chan et al.'s update S_ab += S_ab' + δ_a δ_b n n'/(n + n')."""
    _need_numba()
    L = _as_chunk(L)
    out = np.zeros(len(KOPT_FIELDS))
    _kopt_1d(L, L.dtype == np.float32, out)
    return out


def _need_numba() -> None:
    if _nb is None:
        raise KlestError("the compiled kernels need numba: pip install 'klest[fast]'")


def _as_chunk(L: np.ndarray) -> np.ndarray:
    """1-D contiguous float32 or float64 (other dtypes are widened to float64 exactly)."""
    L = np.ascontiguousarray(L).reshape(-1)
    return L if L.dtype in (np.float32, np.float64) else L.astype(np.float64)


def _kernel(code: int) -> Callable[[np.ndarray], Moments]:
    def moments(L: np.ndarray, extremes: bool) -> Moments:
        L = _as_chunk(L)
        if L.dtype == np.float32:
            return _moments_f32(L, code, extremes)
        return _moments_1d(L, code, False, extremes)

    def kernel(L: np.ndarray) -> Moments:
        mean, m2, lo, hi = moments(L, True)
        return float(mean), float(m2), float(lo), float(hi)

    def mean_m2(L: np.ndarray) -> tuple[float, float]:
        """``kernel(L)[:2]`` without tracking the extremes (less work)."""
        mean, m2, _, _ = moments(L, False)
        return float(mean), float(m2)

    def columns(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, m2)`` per column of a 2-D float32/float64 X reduced over axis 0, as the 1-D
        kernel gives on each column (up to rounding), without transposing X."""
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError("columns() takes a 2-D array")
        R, C = X.shape
        if R == 0 or C == 0:
            return np.full(C, np.nan), np.full(C, np.nan)
        if (
            X.dtype not in (np.float32, np.float64)
            or X.strides[1] != X.itemsize
            or X.strides[0] % X.itemsize
            or X.strides[0] < 0
        ):
            X = np.ascontiguousarray(X, dtype=np.float64)
        rs = X.strides[0] // X.itemsize
        span = np.lib.stride_tricks.as_strided(X, ((R - 1) * rs + C,), (X.itemsize,))
        out = np.empty((C, 3))
        _columns(span, R, C, rs, code, X.dtype == np.float32, out)
        mean, m2 = out[:, 0].copy(), out[:, 1].copy()
        for j in np.flatnonzero(out[:, 2]):  # a non-finite tile sum: the 1-D kernel's rules
            mean[j], m2[j], _, _ = kernel(X[:, j])
        return mean, m2

    kernel.columns = columns  # type: ignore[attr-defined]
    kernel.mean_m2 = mean_m2  # type: ignore[attr-defined]
    return kernel


# ------------------------------------------------------------------------- compiled part
# Few, large compiled functions: numba's compile time grows with the number of functions, and a
# cold first run pays it once (then the on-disk cache serves every later process).
if _nb is not None:
    _jit = _nb.njit(cache=True, nogil=True)
    _jit_sum = _nb.njit(cache=True, nogil=True, fastmath={"reassoc"})
    _jit_fma = _nb.njit(cache=True, nogil=True, fastmath={"contract"})
    _ABS = np.int64(0x7FFF_FFFF_FFFF_FFFF)
    _INF_BITS = np.int64(0x7FF0_0000_0000_0000)
    _LIMIT_BITS = np.array([LIMIT]).view(np.int64)[0]
    _RADIUS_BITS = np.array([RADIUS]).view(np.int64)[0]
    _LIMIT_BITS32 = np.int32(np.array([LIMIT], dtype=np.float32).view(np.int32)[0])
    _RADIUS_BITS32 = np.int32(np.array([RADIUS], dtype=np.float32).view(np.int32)[0])

    @_jit
    def _exact(code: int, L: np.ndarray, out: np.ndarray) -> None:
        """The accurate scalar forms of klest._numerics, with the limits at L = ±inf (k3: +inf at
        both ends; forward_k1: 0 and +inf; forward_k3: 1 and +inf). k3 and forward_k3 take two
        loops: the series on every element (at 0 where |L| >= 1: branch-free, it vectorises),
        then the closed forms where |L| >= 1 (or NaN)."""
        if code == 0:
            for i in range(L.size):
                out[i] = -L[i]
            return
        if code == 1:
            for i in range(L.size):
                out[i] = 0.5 * (L[i] * L[i])
            return
        if code == 3:
            for i in range(L.size):
                x = L[i]
                out[i] = 0.0 if x == -math.inf else x * math.exp(x)
            return
        c = _K3_SERIES if code == 2 else _FK3_SERIES
        for i in range(L.size):  # x² (c_2 + c_3 x + ... + c_19 x^17), Horner written out
            x = L[i] if abs(L[i]) < 1.0 else 0.0
            p = c[17] * x + c[16]
            p = p * x + c[15]
            p = p * x + c[14]
            p = p * x + c[13]
            p = p * x + c[12]
            p = p * x + c[11]
            p = p * x + c[10]
            p = p * x + c[9]
            p = p * x + c[8]
            p = p * x + c[7]
            p = p * x + c[6]
            p = p * x + c[5]
            p = p * x + c[4]
            p = p * x + c[3]
            p = p * x + c[2]
            p = p * x + c[1]
            p = p * x + c[0]
            out[i] = p * (x * x)
        for i in range(L.size):
            x = L[i]
            if abs(x) < 1.0:
                continue
            if code == 2:
                out[i] = math.inf if math.isinf(x) else math.expm1(x) - x
            elif x == -math.inf:
                out[i] = 1.0
            elif x >= 1.0:
                out[i] = math.exp(x) * (x - 1.0) + 1.0  # non-negative terms: no inf - inf
            else:
                out[i] = x * math.exp(x) - math.expm1(x)

    @_jit_fma
    def _k3_scaled(L: np.ndarray, s: int, out: np.ndarray) -> None:
        """k3(y) = Σ_{k=2}^{18} y^k/k! at y = L/2^s by Horner (c_2..c_18), for |y| <= RADIUS."""
        c = _C
        scale = 2.0**-s
        for i in range(L.size):  # k3(y) by Horner, c_2..c_18
            y = L[i] * scale
            p = c[16] * y + c[15]
            p = p * y + c[14]
            p = p * y + c[13]
            p = p * y + c[12]
            p = p * y + c[11]
            p = p * y + c[10]
            p = p * y + c[9]
            p = p * y + c[8]
            p = p * y + c[7]
            p = p * y + c[6]
            p = p * y + c[5]
            p = p * y + c[4]
            p = p * y + c[3]
            p = p * y + c[2]
            p = p * y + c[1]
            p = p * y + c[0]
            out[i] = p * (y * y)

    @_jit_fma
    def _k3_and_exp(L: np.ndarray, s: int, k: np.ndarray, e: np.ndarray) -> None:
        """k3(L) into k and e^L into e for finite L with |L| <= RADIUS·2^s: the steps of
        the doubling of k3(y) at y = L/2^s (:func:`_k3_scaled`) with e^y = 1 + y + k3(y)
        squared alongside (same error bound)."""
        _k3_scaled(L, s, k)
        scale = 2.0**-s
        for i in range(L.size):
            e[i] = 1.0 + L[i] * scale + k[i]
        for j in range(s):
            scale = 2.0 ** (j - s)
            for i in range(L.size):
                y = L[i] * scale
                k[i] = y * y + k[i] * (2.0 + 2.0 * y + k[i])
                e[i] = e[i] * e[i]

    @_jit_fma
    def _fk3_from(L: np.ndarray, k: np.ndarray, e: np.ndarray, out: np.ndarray) -> None:
        """forward_k3 from k3 and e^L into an array apart from k and e (the lab's fused pass)."""
        for i in range(L.size):
            x = L[i]
            if abs(x) < 1.0:
                out[i] = x * x + k[i] * (x - 1.0)
            else:
                out[i] = e[i] * (x - 1.0) + 1.0

    @_jit_fma
    def _doubling(code: int, L: np.ndarray, s: int, out: np.ndarray, e: np.ndarray) -> None:
        """k3 (code 2), forward_k1 (3) or forward_k3 (4) of finite L with |L| <= RADIUS·2^s:
        k3(y) and e^y at y = L/2^s, then s doublings (e: scratch of L's size)."""
        if code == 2:
            _k3_scaled(L, s, out)
            for j in range(s):  # steps outside, elements inside: the inner loop vectorises
                scale = 2.0 ** (j - s)
                for i in range(L.size):
                    y = L[i] * scale
                    out[i] = y * y + out[i] * (2.0 + 2.0 * y + out[i])
            return
        _k3_and_exp(L, s, out, e)
        for i in range(L.size):  # in place, not _fk3_from(L, out, e, out): LLVM's runtime
            x = L[i]  # overlap check would fail on out = k and leave the loop scalar (3× slower)
            if code == 3:
                out[i] = x * e[i]
            elif abs(x) < 1.0:
                out[i] = x * x + out[i] * (x - 1.0)  # = x e^x - (e^x - 1) from k3
            else:
                out[i] = e[i] * (x - 1.0) + 1.0

    @_jit
    def _halvings(L: np.ndarray) -> int:
        """The s with max |L| <= RADIUS·2^s for :func:`_doubling`, or -1 where an inf, NaN or
        |L| > LIMIT is there (the scalar forms): from the max over L of |L|'s IEEE bits, which is
        >= the bits of +inf iff an inf or NaN is there, else the bits of max|L| (bits of
        non-negative doubles order like their values; an integer reduction vectorises, a float
        one would need fast-math)."""
        bits = L.view(np.int64)
        m = 0
        for i in range(bits.size):
            m = max(m, bits[i] & _ABS)
        if m > _LIMIT_BITS:
            return -1
        s = 0
        while m > _RADIUS_BITS + (s << 52):  # adding s to the exponent field multiplies by 2^s
            s += 1
        return s

    @_jit
    def _fill(code: int, L: np.ndarray, fast: bool, out: np.ndarray, work: np.ndarray) -> None:
        """Per-sample values of one sub-block (L already float64; work: scratch, same size)."""
        if code <= 1 or not fast:
            _exact(code, L, out)
            return
        s = _halvings(L)
        if s < 0:  # inf, NaN or |L| > LIMIT: the scalar forms
            _exact(code, L, out)
        else:
            _doubling(code, L, s, out, work)

    @_jit
    def _values_1d(L: Any, code: int, fast: bool, out: np.ndarray) -> None:
        buf = np.empty(SUB)
        work = np.empty(SUB)
        for a in range(0, L.size, SUB):
            m = min(SUB, L.size - a)
            src = L[a : a + m]  # index by the loop variable only: the copy vectorises
            for i in range(m):
                buf[i] = src[i]
            _fill(code, buf[:m], fast, out[a : a + m], work[:m])

    # ------------------------------------------------------------------------ moments
    # state: [n, mean, m2, min, max of the finite values, NaN seen, +inf seen, -inf seen,
    #         a finite sub-block whose sum overflowed (+1 or -1)]
    _STATE = 9

    @_jit
    def _unkey(lo: int, hi: int, keys: np.ndarray) -> tuple[float, float]:
        """The float64 values of two order keys (see :func:`_sums`; keys: int64 scratch of 2)."""
        keys[0] = lo ^ ((lo >> 63) & _ABS)
        keys[1] = hi ^ ((hi >> 63) & _ABS)
        vals = keys.view(np.float64)
        return vals[0], vals[1]

    @_jit_sum
    def _sums(v: np.ndarray) -> tuple[float, float, int, int]:
        """(Σ v, Σ (v - mean)², min key, max key); the second only when the first is finite.
        Keys: v's bits mapped so that integer order is value order (for non-NaN values); the
        integer min/max vectorise where a float one would need fast-math."""
        bits = v.view(np.int64)
        t = 0.0
        lo = bits[0] ^ ((bits[0] >> 63) & _ABS)
        hi = lo
        for i in range(v.size):
            t += v[i]
            key = bits[i] ^ ((bits[i] >> 63) & _ABS)
            lo = min(lo, key)
            hi = max(hi, key)
        if not math.isfinite(t):
            return t, math.nan, lo, hi
        mean = t / v.size
        q = 0.0
        for i in range(v.size):
            d = v[i] - mean
            q += d * d
        return t, q, lo, hi

    @_jit_sum
    def _sums_only(v: np.ndarray) -> tuple[float, float]:
        """(Σ v, Σ (v - mean)²) as :func:`_sums`, without the extremes."""
        t = 0.0
        for i in range(v.size):
            t += v[i]
        if not math.isfinite(t):
            return t, math.nan
        mean = t / v.size
        q = 0.0
        for i in range(v.size):
            d = v[i] - mean
            q += d * d
        return t, q

    @_jit
    def _accumulate(v: np.ndarray, st: np.ndarray, keys: np.ndarray, extremes: bool) -> None:
        """Merge one sub-block's values into the running state (Chan et al. for finite ones).
        keys: int64 scratch of size 2; ``extremes``: track the finite min and max too."""
        k = float(v.size)
        if extremes:
            total, m2, lo, hi = _sums(v)
        else:
            total, m2 = _sums_only(v)
            lo = hi = 0
        if not math.isfinite(total):  # a non-finite value, or finite values whose sum overflows
            special = False
            for i in range(v.size):
                x = v[i]
                if math.isnan(x):
                    st[5] = 1.0
                    special = True
                elif x == math.inf:
                    st[6] = 1.0
                    special = True
                elif x == -math.inf:
                    st[7] = 1.0
                    special = True
                else:
                    st[3] = min(st[3], x)
                    st[4] = max(st[4], x)
            if not special:
                st[8] = 1.0 if total > 0.0 else -1.0
            st[0] += k  # the mean is moot from here on: only n and the flags matter
            return
        if extremes:
            vlo, vhi = _unkey(lo, hi, keys)
            st[3] = min(st[3], vlo)
            st[4] = max(st[4], vhi)
        mean = total / k
        n = st[0]
        tot = n + k
        if n == 0.0:  # the first block: no cross term (δ² may overflow, and inf · 0 is NaN)
            st[1], st[2], st[0] = mean, m2, tot
            return
        delta = mean - st[1]
        st[1] += delta * (k / tot)
        st[2] += m2 + delta * delta * (n * k / tot)
        st[0] = tot

    @_jit
    def _finish(st: np.ndarray, out: np.ndarray) -> None:
        """(mean, m2, vmin, vmax) from a state, with NumPy's conventions for non-finite values:
        NaN anywhere or +inf with -inf: NaN mean; ±inf values: ±inf mean and NaN m2 (inf - inf);
        an overflowing sum of finite values: ±inf mean and +inf m2; empty: (nan, nan, inf, -inf).
        """
        nan_, pos, neg, ovf = st[5] != 0.0, st[6] != 0.0, st[7] != 0.0, st[8]
        if st[0] == 0.0:
            out[0], out[1], out[2], out[3] = math.nan, math.nan, math.inf, -math.inf
            return
        if nan_ or (pos and neg) or (pos and ovf < 0) or (neg and ovf > 0):
            out[0], out[1] = math.nan, math.nan
        elif pos or neg:
            out[0], out[1] = (math.inf if pos else -math.inf), math.nan
        elif ovf != 0.0:
            out[0], out[1] = math.copysign(math.inf, ovf), math.inf
        else:
            out[0], out[1] = st[1], st[2]
        if nan_:
            out[2], out[3] = math.nan, math.nan
        else:
            out[2] = -math.inf if neg else st[3]
            out[3] = math.inf if pos else st[4]

    @_jit
    def _scratch() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """A sub-block's float64 buffers (L, values, work) and two int64 keys."""
        return np.empty(SUB), np.empty(SUB), np.empty(SUB), np.empty(2, dtype=np.int64)

    @_jit
    def _state() -> np.ndarray:
        """An empty running state (see _STATE): no values, extremes at ±inf."""
        st = np.zeros(_STATE)
        st[3], st[4] = math.inf, -math.inf
        return st

    @_jit
    def _result(st: np.ndarray) -> tuple[float, float, float, float]:
        out = np.empty(4)
        _finish(st, out)
        return out[0], out[1], out[2], out[3]

    @_jit
    def _moments_1d(
        L: Any, code: int, fast: bool, extremes: bool
    ) -> tuple[float, float, float, float]:
        buf, vals, work, keys = _scratch()
        st = _state()
        for a in range(0, L.size, SUB):
            m = min(SUB, L.size - a)
            src = L[a : a + m]
            for i in range(m):
                buf[i] = src[i]
            _fill(code, buf[:m], fast, vals[:m], work[:m])
            _accumulate(vals[:m], st, keys, extremes)
        return _result(st)

    @_jit
    def _moments_f32(L: Any, code: int, extremes: bool) -> tuple[float, float, float, float]:
        """:func:`_moments_1d` for float32 input, the path every value takes (the same numbers):
        the largest |L|'s bits are taken from the float32 bits in the widening copy itself,
        which saves the separate pass of :func:`_fill` over the float64 buffer."""
        buf, vals, work, keys = _scratch()
        st = _state()
        bits = L.view(np.int32)
        for a in range(0, L.size, SUB):
            m = min(SUB, L.size - a)
            src = L[a : a + m]
            sb = bits[a : a + m]
            mx = 0
            for i in range(m):
                buf[i] = src[i]
                mx = max(mx, sb[i] & 0x7FFF_FFFF)
            if code <= 1 or mx > _LIMIT_BITS32:  # inf, NaN or |L| > LIMIT: the scalar forms
                _exact(code, buf[:m], vals[:m])
            else:
                s = 0
                while mx > _RADIUS_BITS32 + (s << 23):  # the exponent field of a float32
                    s += 1
                _doubling(code, buf[:m], s, vals[:m], work[:m])
            _accumulate(vals[:m], st, keys, extremes)
        return _result(st)

    @_jit
    def _quadratic(x: np.ndarray, coeffs: np.ndarray, codes: np.ndarray, out: np.ndarray) -> None:
        P = coeffs.shape[0]
        K = codes.size
        states = np.zeros((P, K, _STATE))
        states[:, :, 3] = math.inf
        states[:, :, 4] = -math.inf
        buf, vals, work, keys = _scratch()
        for a in range(0, x.size, SUB):
            m = min(SUB, x.size - a)
            src = x[a : a + m]
            Lb = buf[:m]
            for p in range(P):
                A, B, C = coeffs[p, 0], coeffs[p, 1], coeffs[p, 2]
                for i in range(m):  # the lab engine's form of L for a normal pair
                    Lb[i] = (src[i] * A + B) * src[i] + C
                for j in range(K):
                    _fill(codes[j], Lb, True, vals[:m], work[:m])
                    _accumulate(vals[:m], states[p, j], keys, True)
        for p in range(P):
            for j in range(K):
                _finish(states[p, j], out[p, j])

    @_jit_sum
    def _cosums(x: np.ndarray, k: np.ndarray, ms: np.ndarray) -> None:
        """ms[0:3] = Σ of (x, k, e = x + k); ms[3:9] = Σ of the centred products
        (LL, kk, ee, Lk, Le, ke) about those means (the second pass only if the first is finite)."""
        sx = 0.0
        sk = 0.0
        for i in range(x.size):
            sx += x[i]
            sk += k[i]
        c = float(x.size)
        ml = sx / c
        mk = sk / c
        me = (sx + sk) / c
        ms[0], ms[1], ms[2] = sx, sk, sx + sk
        if not (math.isfinite(sx) and math.isfinite(sk)):
            return
        a = 0.0
        b = 0.0
        d = 0.0
        f = 0.0
        g = 0.0
        h = 0.0
        for i in range(x.size):
            dl = x[i] - ml
            dk = k[i] - mk
            de = (x[i] + k[i]) - me
            a += dl * dl
            b += dk * dk
            d += de * de
            f += dl * dk
            g += dl * de
            h += dk * de
        ms[3], ms[4], ms[5], ms[6], ms[7], ms[8] = a, b, d, f, g, h

    @_jit
    def _co_merge(st: np.ndarray, ms: np.ndarray, cnt: int) -> bool:
        """Merge one sub-block's sums ``ms`` (see :func:`_cosums`) of ``cnt`` samples into a
        co-moment state st = [n, mean_L, mean_k, mean_e, S_LL, S_kk, S_ee, S_Lk, S_Le, S_ke];
        False if a sum or co-moment is not finite."""
        for j in range(9):
            if not math.isfinite(ms[j]):
                return False
        c = float(cnt)
        n = st[0]
        if n == 0.0:  # the first block: no cross terms (δ² may overflow, inf · 0 is NaN)
            for j in range(3):
                st[1 + j] = ms[j] / c
            for j in range(6):
                st[4 + j] = ms[3 + j]
            st[0] = c
            return True
        tot = n + c
        w = n * c / tot
        d0 = ms[0] / c - st[1]
        d1 = ms[1] / c - st[2]
        d2 = ms[2] / c - st[3]
        st[4] += ms[3] + d0 * d0 * w
        st[5] += ms[4] + d1 * d1 * w
        st[6] += ms[5] + d2 * d2 * w
        st[7] += ms[6] + d0 * d1 * w
        st[8] += ms[7] + d0 * d2 * w
        st[9] += ms[8] + d1 * d2 * w
        st[1] += d0 * (c / tot)
        st[2] += d1 * (c / tot)
        st[3] += d2 * (c / tot)
        st[0] = tot
        for j in range(4, 10):
            if not math.isfinite(st[j]):
                return False
        return True

    @_jit
    def _kopt_1d(L: Any, fast: bool, out: np.ndarray) -> None:
        buf = np.empty(SUB)
        kv = np.empty(SUB)
        work = np.empty(SUB)
        ms = np.zeros(9)
        st = np.zeros(10)  # n, means of (L, k3, e), co-moments: see _co_merge
        n_inf = 0.0
        for a in range(0, L.size, SUB):
            m = min(SUB, L.size - a)
            src = L[a : a + m]
            ninf = 0
            for i in range(m):
                buf[i] = src[i]
                ninf += buf[i] == -math.inf
            cnt = m
            if ninf > 0:  # keep the finite ones (and NaN: flagged below)
                cnt = 0
                for i in range(m):
                    if buf[i] != -math.inf:
                        buf[cnt] = buf[i]
                        cnt += 1
                n_inf += ninf
            if cnt == 0:
                continue
            x = buf[:cnt]
            _fill(2, x, fast, kv[:cnt], work[:cnt])
            _cosums(x, kv[:cnt], ms)
            if not _co_merge(st, ms, cnt):
                out[11] = 1.0
                return
        for j in range(10):
            out[j] = st[j]
        out[10] = n_inf
        out[11] = 0.0

    @_jit
    def _columns(X: Any, R: int, C: int, rs: int, code: int, fast: bool, out: np.ndarray) -> None:
        """Per-column (mean, m2, bad) of the values of a 2-D array [R, C] with contiguous rows,
        reduced over its rows (axis 0) without transposing it (X: the 1-D span of its memory,
        row i starting at i·rs). Row bands of TILE_ROWS rows are
        read row by row (sequential streams the prefetcher follows) in tiles of TILE_COLS
        columns, converted into a contiguous float64 buffer, their values computed as in
        :func:`_fill`, summed per column (loops over columns inside: they vectorise) and merged
        into the columns' running moments (Chan et al.; every column has seen the same rows).
        ``bad`` is 1 for a column in which a tile's sum was not finite: the caller recomputes
        those columns with the 1-D kernel (NumPy's rules for non-finite values)."""
        TR, TC = TILE_ROWS, TILE_COLS
        buf = np.empty(TR * TC)
        vals = np.empty(TR * TC)
        work = np.empty(TR * TC)
        tmean = np.empty(TC)
        tm2 = np.empty(TC)
        mean = np.zeros(C)
        m2 = np.zeros(C)
        bad = np.zeros(C)
        n = 0.0
        for r0 in range(0, R, TR):
            h = min(TR, R - r0)
            k = float(h)
            tot = n + k
            for c0 in range(0, C, TC):
                w = min(TC, C - c0)
                for i in range(h):  # slices indexed by the loop variable: the copies vectorise
                    o = (r0 + i) * rs + c0
                    src = X[o : o + w]
                    dst = buf[i * w : i * w + w]
                    for j in range(w):
                        dst[j] = src[j]
                _fill(code, buf[: h * w], fast, vals[: h * w], work[: h * w])
                for j in range(w):
                    tmean[j] = 0.0
                    tm2[j] = 0.0
                for i in range(h):
                    v = vals[i * w : i * w + w]
                    for j in range(w):
                        tmean[j] += v[j]
                for j in range(w):
                    tmean[j] /= k
                    if not math.isfinite(tmean[j]):
                        bad[c0 + j] = 1.0
                        tmean[j] = 0.0
                for i in range(h):
                    v = vals[i * w : i * w + w]
                    for j in range(w):
                        d = v[j] - tmean[j]
                        tm2[j] += d * d
                cm = mean[c0 : c0 + w]
                cq = m2[c0 : c0 + w]
                if n == 0.0:  # the first band: no cross term (δ² may overflow, and inf·0 is NaN)
                    for j in range(w):
                        cm[j] = tmean[j]
                        cq[j] = tm2[j]
                    continue
                for j in range(w):
                    delta = tmean[j] - cm[j]
                    cm[j] += delta * (k / tot)
                    cq[j] += tm2[j] + delta * delta * (n * k / tot)
            n = tot
        for j in range(C):
            out[j, 0] = mean[j]
            out[j, 1] = m2[j]
            out[j, 2] = bad[j]

    KERNELS.update({name: _kernel(code) for name, code in CODES.items()})


# ------------------------------------------------------------- the lab's fused normal pass
#: What :func:`quadratic_lab` gives per target in its second array, in order: k_opt's
#: co-moments (as :data:`KOPT_FIELDS`) and the extremes of L.
LAB_PAIR_FIELDS = (*KOPT_FIELDS, "L_min", "L_max")
_LAB_EXTRA = 13  # per target after the estimators' states: 10 co-moment fields, bad, L min, max


def lab_state(n_targets: int, n_names: int) -> np.ndarray:
    """An empty running state for :func:`quadratic_lab`: float64 [n_targets, 9·n_names + 13],
    per name the 9-field state of the moment loops, then co-moments, a flag and L's extremes."""
    st = np.zeros((n_targets, 9 * n_names + _LAB_EXTRA))
    for j in range(n_names):
        st[:, 9 * j + 3], st[:, 9 * j + 4] = math.inf, -math.inf
    st[:, -2], st[:, -1] = math.inf, -math.inf
    return st


def quadratic_lab(
    x: np.ndarray,
    coeffs: np.ndarray,
    names: tuple[str, ...],
    pair: bool,
    state: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    r""":func:`quadratic_moments` and, with ``pair``, k_opt's co-moments, in one pass over x.

    For each target p, L_p = (a_p·x + b_p)·x + c_p is formed once per sub-block of ``SUB``
    draws; k3(L) (and e^L, when forward_k3 is asked for) is computed once and serves k3,
    forward_k3 = L² + k3·(L - 1) (|L| < 1) or e^L (L - 1) + 1, and the co-moments, which are
    those of :func:`kopt_comoments` on L_p: over the sub-blocks, the means of (L, k3, e = L + k3)
    and their centred co-moments S_ab = Σ (a - ā)(b - b̄), merged with Chan et al.'s update.

    ``state`` (from :func:`lab_state`): a running state, updated in place, so that several calls
    on consecutive pieces of a stream give what one call on all of it gives when every piece but
    the last is a multiple of ``SUB`` long (the sub-blocks, and so the sums, are the same).

    Returns ``(moments, pairs)`` over everything the state has seen: float64 [P, len(names), 4]
    of (mean, m2, vmin, vmax), the values of :func:`quadratic_moments` (up to the rounding of a
    fused multiply-add), and float64 [P, 14] of :data:`LAB_PAIR_FIELDS` (zeros without
    ``pair``). ``bad`` is 1 where L or a co-moment was not finite (coefficients or values beyond
    float64 moments): the caller then computes that target's co-moments another way."""
    _need_numba()
    x = np.ascontiguousarray(x, dtype=np.float64).reshape(-1)
    coeffs = np.ascontiguousarray(coeffs, dtype=np.float64).reshape(-1, 3)
    codes = np.array([CODES[n] for n in names], dtype=np.int64)
    if state is None:
        state = lab_state(coeffs.shape[0], codes.size)
    if state.shape != (coeffs.shape[0], 9 * codes.size + _LAB_EXTRA):
        raise ValueError("state does not match the targets and names")
    out = np.empty((coeffs.shape[0], codes.size, 4))
    pairs = np.zeros((coeffs.shape[0], len(LAB_PAIR_FIELDS)))
    _quadratic_lab(x, coeffs, codes, bool(pair), state, out, pairs)
    return out, pairs


if _nb is not None:

    @_jit_sum
    def _key_extremes(v: np.ndarray, keys: np.ndarray) -> tuple[float, float]:
        """(min, max) of non-NaN float64 values through order-preserving integer keys (keys:
        int64 scratch of size 2)."""
        bits = v.view(np.int64)
        lo = bits[0] ^ ((bits[0] >> 63) & _ABS)
        hi = lo
        for i in range(v.size):
            key = bits[i] ^ ((bits[i] >> 63) & _ABS)
            lo = min(lo, key)
            hi = max(hi, key)
        return _unkey(lo, hi, keys)

    @_jit
    def _quadratic_lab(
        x: np.ndarray,
        coeffs: np.ndarray,
        codes: np.ndarray,
        pair: bool,
        state: np.ndarray,
        out: np.ndarray,
        pairs: np.ndarray,
    ) -> None:
        P = coeffs.shape[0]
        K = codes.size
        base = 9 * K  # state[p]: K estimator states (see _STATE), then co-moments, bad, extremes
        buf, vals, work, keys = _scratch()
        kv = np.empty(SUB)
        ev = np.empty(SUB)
        fv = np.empty(SUB)
        ms = np.zeros(9)
        has_k3 = False
        has_fk3 = False
        for j in range(K):
            has_k3 = has_k3 or codes[j] == 2
            has_fk3 = has_fk3 or codes[j] == 4
        for a in range(0, x.size, SUB):
            m = min(SUB, x.size - a)
            src = x[a : a + m]
            Lb = buf[:m]
            k = kv[:m]
            f = fv[:m]
            for p in range(P):
                st = state[p]
                A, B, C = coeffs[p, 0], coeffs[p, 1], coeffs[p, 2]
                for i in range(m):  # the lab engine's form of L for a normal pair
                    Lb[i] = (src[i] * A + B) * src[i] + C
                if has_k3 or has_fk3 or pair:
                    s = _halvings(Lb)
                    if s < 0:  # inf, NaN or |L| > LIMIT: the scalar forms
                        _exact(2, Lb, k)
                        if has_fk3:
                            _exact(4, Lb, f)
                    else:
                        _k3_and_exp(Lb, s, k, ev[:m])
                        if has_fk3:
                            _fk3_from(Lb, k, ev[:m], f)
                for j in range(K):
                    code = codes[j]
                    sj = st[9 * j : 9 * j + 9]
                    if code == 2:
                        _accumulate(k, sj, keys, True)
                    elif code == 4:
                        _accumulate(f, sj, keys, True)
                    else:
                        _fill(code, Lb, True, vals[:m], work[:m])
                        _accumulate(vals[:m], sj, keys, True)
                if pair and st[base + 10] == 0.0:
                    lo, hi = _key_extremes(Lb, keys)
                    st[base + 11] = min(st[base + 11], lo)
                    st[base + 12] = max(st[base + 12], hi)
                    _cosums(Lb, k, ms)
                    if not _co_merge(st[base : base + 10], ms, m):
                        st[base + 10] = 1.0
        for p in range(P):
            st = state[p]
            for j in range(K):
                _finish(st[9 * j : 9 * j + 9], out[p, j])
            if pair:
                for j in range(10):
                    pairs[p, j] = st[base + j]
                pairs[p, 10] = 0.0
                pairs[p, 11] = st[base + 10]
                pairs[p, 12] = st[base + 11]
                pairs[p, 13] = st[base + 12]
