r"""Streamed moments that do not overflow: sums of squares carried with a power-of-two scale.

The lab's per-sample values can be as large as float64 allows (k1 = -L is about 5e159·z² for
q = N(0, 1), p = N(0, 1e-80)), but their squares cannot: Σ (v - v̄)² overflows from |v| ≈ 1e154,
and a stdev of 1e160 would read as +inf. Here a centred sum of squares is held as a pair (m, e)
standing for m·4^e, and the co-moments of k_opt's columns (L, k3, e = r - 1) as S_ab = s_ab·2^(e_a +
e_b) with one exponent per column. A chunk whose values exceed :data:`SCALE_FROM` in magnitude is
divided by 2^s, s the exponent of its largest |value|, before its moments are taken: multiplying by
a power of two is exact (only values below 2^-1022·2^s lose bits, and they weigh less than
2^-900 of the sum of squares). Chan et al.'s merge is done on the scaled numbers:

.. math:: M_2 = M_{2,a} + M_{2,b} + \delta^2 n_a n_b / n
          = 4^E\left(m_a 4^{e_a - E} + m_b 4^{e_b - E} + (\delta 2^{-s})^2 \tfrac{n_a n_b}{n}
          4^{s - E}\right), \quad E = \max(e_a, e_b, s),

with s chosen so that |δ·2^-s| ≤ 2^400. Where every exponent is 0 (sums of squares below
:data:`BIG`, the usual case) these are the plain formulas, to the bit. A result is +inf only where
the quantity itself exceeds float64 (a stdev above 1.8e308), never because an intermediate square
did.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from klest import _stream

__all__ = ["BIG", "SCALE_FROM", "Comoments", "ScaledMoments", "chunk", "co_chunk", "kopt_values"]

BIG = 2.0**960  # a sum of squares above this is carried as m·4^e with e > 0
SCALE_FROM = 2.0**480  # a chunk with a |value| above this is divided by a power of two first
_DELTA = 400  # |δ·2^-s| <= 2^400 in a merge: its square times n_a·n_b/n stays far below BIG
_DELTA_MAX = 2.0**_DELTA

_PAIRS = _stream.PAIRS  # S_LL, S_kk, S_ee, S_Lk, S_Le, S_ke


def ldexp(x: float, k: int) -> float:
    """x·2^k, ±inf on overflow (math.ldexp raises instead)."""
    try:
        return math.ldexp(x, k)
    except OverflowError:
        return math.copysign(math.inf, x)


def _canonical(m2: float, e: int) -> tuple[float, int]:
    """(m2, e) for m2·4^e with the smallest e >= 0 that keeps m2 <= BIG (exact: powers of two)."""
    if e == 0 and 0.0 <= m2 <= BIG:
        return m2, 0
    if not (math.isfinite(m2) and m2 > 0.0):
        return (m2, 0) if m2 != 0.0 else (0.0, 0)
    top = math.frexp(m2)[1] + 2 * e  # m2·4^e < 2^top
    want = max(0, -(-(top - 960) // 2))
    return (math.ldexp(m2, 2 * (e - want)), want) if want != e else (m2, e)


def _delta_scale(d: float) -> int:
    """The s >= 0 with |d·2^-s| <= 2^_DELTA."""
    return max(0, math.frexp(d)[1] - _DELTA) if math.isfinite(d) and d != 0.0 else 0


@dataclass(frozen=True)
class ScaledMoments:
    """Count, mean, centred sum of squares M2 = m2·4^e, and extremes of a stream of values.

    The non-finite rules are those of :class:`klest._stream.Partial`: a NaN mean where a NaN or
    both infinities were seen, an infinite mean with an infinite spread for one infinite sign."""

    n: float = 0.0
    mean: float = 0.0
    m2: float = 0.0
    e: int = 0
    vmin: float = math.inf
    vmax: float = -math.inf

    @classmethod
    def make(
        cls, n: float, mean: float, m2: float, vmin: float, vmax: float, e: int = 0
    ) -> ScaledMoments:
        if math.isinf(mean):
            m2, e = math.inf, 0
        elif math.isnan(mean):
            m2, e = math.nan, 0
        m2, e = _canonical(m2, e)
        return cls(n, mean, m2, e, vmin, vmax)

    @property
    def total_m2(self) -> float:
        """M2 as a float (+inf where it exceeds float64)."""
        return ldexp(self.m2, 2 * self.e)

    def std(self, ddof: int = 1) -> float:
        """sqrt(M2/(n - ddof)), NaN where n <= ddof."""
        if self.n - ddof <= 0:
            return math.nan
        return ldexp(math.sqrt(self.m2 / (self.n - ddof)), self.e)

    def share(self, dev: float) -> float:
        """dev²/M2 (1 where M2 is not finite, 0 where it is 0), without forming dev² or M2."""
        if not math.isfinite(self.m2) or not math.isfinite(dev):
            return 1.0
        if self.m2 <= 0.0:
            return 0.0
        d = ldexp(dev, -self.e)
        return min(1.0, d * d / self.m2)

    def merge(self, o: ScaledMoments) -> ScaledMoments:
        """Chan et al.'s update on the scaled numbers (see the module notes)."""
        if o.n == 0:
            return self
        if self.n == 0:
            return o
        lo, hi = min(self.vmin, o.vmin), max(self.vmax, o.vmax)
        a, b = self.mean, o.mean
        delta = b - a
        unscaled = self.e == 0 and o.e == 0 and abs(delta) <= _DELTA_MAX
        if unscaled or not (math.isfinite(a) and math.isfinite(b)):
            # Chan's formula, or the rule for non-finite means (mean NaN or ±inf)
            n, mean, m2 = _stream.merge_moments(self.n, a, self.m2, o.n, b, o.m2)
            if m2 <= BIG or not math.isfinite(mean):  # (False for a NaN m2 of finite means)
                return ScaledMoments(n, mean, m2, 0, lo, hi)
        n = self.n + o.n
        if math.isfinite(delta):
            mean = a + delta * (o.n / n)
            s = _delta_scale(delta)
            d = math.ldexp(delta, -s)
        else:  # means of opposite signs near the float64 limit
            mean = a * (self.n / n) + b * (o.n / n)
            half = b * 0.5 - a * 0.5
            s = _delta_scale(half)
            d = math.ldexp(half, 1 - s) if s else 2.0 * half
            s, d = (s, d) if math.isfinite(d) else (s + 1, math.ldexp(half, -s))
        if not (math.isfinite(self.m2) and math.isfinite(o.m2)):
            return ScaledMoments(n, mean, math.inf, 0, lo, hi)
        cross = d * d * (self.n * o.n / n)
        big = max(self.e, o.e, s)
        m2 = (
            math.ldexp(self.m2, 2 * (self.e - big))
            + math.ldexp(o.m2, 2 * (o.e - big))
            + math.ldexp(cross, 2 * (s - big))
        )
        m2, e = _canonical(m2, big)
        return ScaledMoments(n, mean, m2, e, lo, hi)


def chunk(v: np.ndarray) -> ScaledMoments:
    """Moments of a 1-D float64 chunk (a work buffer: overwritten), scaled by a power of two
    first where a |value| exceeds :data:`SCALE_FROM`."""
    if v.size == 0:
        return ScaledMoments()
    lo, hi = float(np.minimum.reduce(v)), float(np.maximum.reduce(v))
    top = max(abs(lo), abs(hi))
    if math.isfinite(top) and top > SCALE_FROM:
        s = math.frexp(top)[1]  # |v|·2^-s < 1
        np.multiply(v, math.ldexp(1.0, -s), out=v)
        p = _stream.chunk_moments(v, extremes=False)
        return ScaledMoments.make(p.n, math.ldexp(p.mean, s), p.m2, lo, hi, s)
    p = _stream.chunk_moments(v, extremes=False)
    return ScaledMoments.make(p.n, p.mean, p.m2, lo, hi)


@dataclass(frozen=True)
class Comoments:
    r"""What k_opt needs of its samples with L > -inf, in one pass: their count, the means of
    (L, k3, e) with e = r - 1, and the centred co-moments S_ab = Σ (a - ā)(b - b̄) =
    s_ab·2^(e_a + e_b) in the order S_LL, S_kk, S_ee, S_Lk, S_Le, S_ke, with one exponent per
    column (``e``); and the number of samples with L = -inf (k_opt is +inf there)."""

    n: float = 0.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    s: tuple[float, ...] = (0.0,) * 6
    e: tuple[int, int, int] = (0, 0, 0)
    n_inf: float = 0.0

    @classmethod
    def make(
        cls,
        n: float,
        mean: tuple[float, float, float],
        s: tuple[float, ...],
        e: tuple[int, int, int] = (0, 0, 0),
        n_inf: float = 0.0,
    ) -> Comoments:
        """The co-moments with every diagonal S_aa brought to at most BIG (column exponents
        raised: exact)."""
        sl, ex = list(s), list(e)
        for col in range(3):
            d = sl[col]
            if not (math.isfinite(d) and d > BIG):
                continue
            k = -(-(math.frexp(d)[1] - 960) // 2)
            ex[col] += k
            for i, (a, b) in enumerate(_PAIRS):
                sl[i] = math.ldexp(sl[i], -k * ((a == col) + (b == col)))
        return cls(n, mean, tuple(sl), (ex[0], ex[1], ex[2]), n_inf)

    @property
    def lam(self) -> float:
        """λ̂ = S_Le/S_ee = Cov(L, r)/Var(r); 1 where Var(r) = 0, 0 where it is infinite."""
        return _stream.kopt_lambda(self.s[2], self.s[4], self.e[0] - self.e[2])

    def merge(self, o: Comoments) -> Comoments:
        """Chan et al.'s update for co-moments, S_ab gaining δ_a·δ_b·n_a·n_b/n, on the scaled
        numbers (each column's exponent the largest of the two and of what its δ needs)."""
        n_inf = self.n_inf + o.n_inf
        if o.n == 0 or self.n == 0:
            base = self if o.n == 0 else o
            return Comoments(base.n, base.mean, base.s, base.e, n_inf)
        n, mean, s0 = _stream.co_merge(self.n, self.mean, self.s, o.n, o.mean, o.s)  # unscaled
        d = [b - a for a, b in zip(self.mean, o.mean, strict=True)]
        f = self.n * o.n / n
        if self.e == o.e == (0, 0, 0) and all(abs(di) <= _DELTA_MAX for di in d):
            if max(s0[:3]) <= BIG and all(math.isfinite(x) for x in s0):
                return Comoments(n, mean, s0, (0, 0, 0), n_inf)
        ex = [max(x, y, _delta_scale(di)) for x, y, di in zip(self.e, o.e, d, strict=True)]
        dd = [math.ldexp(di, -x) if math.isfinite(di) else di for di, x in zip(d, ex, strict=True)]
        s = tuple(
            math.ldexp(x, self.e[i] + self.e[j] - ex[i] - ex[j])
            + math.ldexp(y, o.e[i] + o.e[j] - ex[i] - ex[j])
            + dd[i] * dd[j] * f
            for x, y, (i, j) in zip(self.s, o.s, _PAIRS, strict=True)
        )
        return Comoments.make(n, mean, s, (ex[0], ex[1], ex[2]), n_inf)


def co_chunk(L: np.ndarray, k3: Callable[[np.ndarray], np.ndarray]) -> Comoments:
    """:class:`Comoments` of a 1-D float64 chunk of L (NumPy; not modified). Where a column's
    sum or a co-moment is not finite, or a diagonal exceeds :data:`BIG`, the columns are formed
    again and each divided by a power of two first (the exponent of its largest |value|)."""
    neg = L == -np.inf
    n_inf = int(np.count_nonzero(neg))
    if n_inf:
        L = L[~neg]
    if L.size == 0:
        return Comoments(n_inf=float(n_inf))
    plain = _co_sums(L, k3, False, n_inf)
    return plain if plain is not None else _co_sums(L, k3, True, n_inf)  # type: ignore[return-value]


def _co_sums(
    L: np.ndarray, k3: Callable[[np.ndarray], np.ndarray], scale: bool, n_inf: int = 0
) -> Comoments | None:
    """The co-moments of (L, k3(L), expm1(L)) in two passes; None (unscaled) where they would
    need a scale."""
    with np.errstate(all="ignore"):
        cols = [L, np.asarray(k3(L), dtype=np.float64), np.expm1(L)]
    means, ex = [], []
    for i, c in enumerate(cols):
        s = 0
        if scale:
            top = max(-float(np.minimum.reduce(c)), float(np.maximum.reduce(c)))
            s = math.frexp(top)[1] if math.isfinite(top) and top > SCALE_FROM else 0
        if s:  # L itself is never written: a scaled copy of it
            c = cols[i] = np.multiply(c, math.ldexp(1.0, -s), out=None if i == 0 else c)
        m = float(np.einsum("i->", c)) / c.size
        if not scale and not math.isfinite(m) and bool(np.all(np.isfinite(c))):
            return None  # a sum that overflowed on finite values
        with np.errstate(all="ignore"):
            cols[i] = np.subtract(c, m, out=None if c is L else c)
        means.append(ldexp(m, s) if s else m)
        ex.append(s)
    with np.errstate(all="ignore"):
        # einsum, not BLAS: OpenBLAS threads a dot of this size, and its spinning helpers
        # would compete with the engine's own threads
        s_ab = tuple(float(np.einsum("i,i->", cols[i], cols[j])) for i, j in _PAIRS)
    if not scale and all(math.isfinite(m) for m in means):
        if not all(math.isfinite(x) for x in s_ab) or max(s_ab[:3]) > BIG:
            return None
    return Comoments.make(
        float(L.size), (means[0], means[1], means[2]), s_ab, (ex[0], ex[1], ex[2]), float(n_inf)
    )


def _factors(*xs: float, shift: int = 0) -> tuple[float, int]:
    """The product of xs times 2^shift as (mantissa, exponent), without overflow."""
    m, x = 1.0, shift
    for v in xs:
        fm, fx = math.frexp(v)
        m *= fm
        x += fx
    return m, x


def _total(terms: list[tuple[float, int]]) -> tuple[float, int]:
    """Σ m·2^x over the terms, as (total, X) with the sum taken at the largest exponent X."""
    live = [t for t in terms if t[0] != 0.0]
    if not live:
        return 0.0, 0
    top = max(x for _, x in live)
    return sum(math.ldexp(m, x - top) for m, x in live), top


def kopt_values(co: Comoments, lam: float) -> ScaledMoments:
    r"""Moments of v = -L + λ(r - 1) = λ·k3 + (λ - 1)·L over the samples of ``co``, exactly
    from its co-moments. Two equal expressions are available,

    .. math:: \bar v = \lambda \bar e - \bar L = \lambda \bar k_3 + (\lambda - 1)\bar L, \quad
              M_2 = S_{LL} - 2\lambda S_{Le} + \lambda^2 S_{ee}
                  = \lambda^2 S_{kk} + 2\lambda(\lambda - 1) S_{Lk} + (\lambda - 1)^2 S_{LL},

    and the one whose terms are smaller (less cancellation) is used: the (L, e) form when L is
    far from 0, the (L, k3) form near 0 where e ≈ L. Each term is formed as a mantissa and a
    power of two (no overflow); samples with L = -inf make the mean +inf."""
    n = co.n + co.n_inf
    if co.n_inf:
        return ScaledMoments(n, math.inf, math.inf)
    if co.n == 0:
        return ScaledMoments()
    m_l, m_k, m_e = co.mean
    s_ll, s_kk, s_ee, s_lk, s_le, _ = co.s
    el, ek, ee = co.e
    if not (math.isfinite(lam) and all(math.isfinite(x) for x in (*co.s, *co.mean))):
        return ScaledMoments(n, math.nan, math.nan)
    if lam == 0.0:
        return ScaledMoments.make(n, -m_l, s_ll, math.inf, -math.inf, el)
    mean_a, scale_a = lam * m_e - m_l, abs(lam * m_e) + abs(m_l)
    mean_b, scale_b = lam * m_k + (lam - 1) * m_l, abs(lam * m_k) + abs((lam - 1) * m_l)
    mean = mean_a if scale_a <= scale_b else mean_b
    mu = lam - 1.0
    form_a = [  # S_LL - 2λ S_Le + λ² S_ee
        _factors(s_ll, shift=2 * el),
        _factors(-2.0, lam, s_le, shift=el + ee),
        _factors(lam, lam, s_ee, shift=2 * ee),
    ]
    form_b = [  # λ² S_kk + 2λ(λ - 1) S_Lk + (λ - 1)² S_LL
        _factors(lam, lam, s_kk, shift=2 * ek),
        _factors(2.0, lam, mu, s_lk, shift=el + ek),
        _factors(mu, mu, s_ll, shift=2 * el),
    ]
    sc_a, sc_b = (_total([(abs(m), x) for m, x in f]) for f in (form_a, form_b))
    use_a = sc_a[0] == 0.0 or (sc_b[0] != 0.0 and ldexp(sc_a[0], sc_a[1] - sc_b[1]) <= sc_b[0])
    m2, x = _total(form_a if use_a else form_b)
    if not math.isfinite(mean):
        return ScaledMoments(n, math.nan, math.nan)
    m2 = max(m2, 0.0)
    if x % 2:  # to a power of 4
        m2, x = m2 * 2.0, x - 1
    return ScaledMoments.make(n, mean, m2, math.inf, -math.inf, x // 2)
