r"""The streaming engine: chunks, float64 moments merged with Chan's formula, fixed blocks.

Both :func:`klest.estimate` (slices of an array) and the lab (blocks drawn from a sampler) reduce
through here. A chunk of per-sample values v is reduced to ``(n, mean, m2, min, max)`` in float64,
with ``m2 = Σ (v - mean)²`` taken exactly (two passes over a chunk that is in cache), and partial
results are merged with Chan et al.'s pairwise formula

.. math:: \bar v = \bar v_a + \delta\,n_b/n, \quad
          M_2 = M_{2,a} + M_{2,b} + \delta^2 n_a n_b / n, \quad \delta = \bar v_b - \bar v_a.

Non-finite values follow one rule: a NaN anywhere, or both +inf and -inf, gives a NaN mean; values
of one infinite sign give that infinite mean and an infinite spread; a finite mean whose spread
overflows gives ``m2 = inf``. The work is cut into fixed chunks and fixed blocks of chunks whose
results are merged in order, so the result is bit-identical whatever the number of threads
(``klest.options(threads=...)``). Memory is a few chunk buffers per thread, whatever n.

For an array, the reduced axes are moved last (a view, never a copy) and the array is walked in
pieces of at most :data:`CHUNK` elements: groups of whole output rows when a row is short, or
pieces of one row (merged along the row) when it is long. Each piece is converted to float64 into
a work buffer, validated, clamped and masked there, so the input is never copied as a whole.

Chunk kernels read unmasked, unclamped float input as it is. Which one computes a record of the
estimator table is decided here, by :func:`kernel_for`, never stored in the table: the compiled
kernel of :mod:`klest._fast` of a built-in record's name (in pieces of :data:`KERNEL_CHUNK`), one a
user registered for an estimator's name (:func:`register_kernel`), or, without them, the NumPy
kernel of :func:`numpy_kernel` for records whose value function is a :mod:`klest._numerics`
primitive (k3, forward_k3; float32 input needs float32 accuracy only, which spares the series
almost everywhere). k_opt's co-moments of (L, k3, r - 1) come from
:func:`klest._fast.kopt_comoments` when it applies (not cross-fitted), else from NumPy.

A record's own value function is checked on every chunk for its shape and dtype
(:meth:`klest.table.Estimator.values`), and, where a chunk's mean comes out NaN, for NaN values
at log-ratios that are not NaN (:func:`klest.table.check_values`): the check costs a pass only
where the result would otherwise be NaN.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import array_api_compat.numpy as npx
import numpy as np

from ._backend import check_log_ratio_values
from ._config import fast_wanted, options
from ._numerics import expm1mx, lexpl_mexpm1, numpy_values
from .errors import KlestError
from .table import BUILTIN_NAMES, FDIV_PREFIX, Estimator, check_values, get_estimator, is_builtin

__all__ = [
    "CHUNK",
    "NUMPY_KERNELS",
    "PAIRS",
    "Kernel",
    "Partial",
    "chunk_moments",
    "co_merge",
    "combine",
    "finish",
    "kernel_for",
    "kopt_lambda",
    "kopt_moments",
    "kopt_values",
    "merge_moments",
    "numpy_kernel",
    "numpy_kind",
    "ordered_map",
    "register_kernel",
]

#: A chunk kernel: a non-empty 1-D float32/float64 array of L, read as it is (not clamped, no
#: masked entries) -> (mean, m2, min, max) of the record's per-sample values on it, accumulated
#: in float64 (``m2`` = Σ (v - mean)²). Optional attributes: ``mean_m2(L)`` -> (mean, m2)
#: without the extremes; ``columns(X)`` -> per-column (mean, m2) of a 2-D X reduced over axis 0.
Kernel = Callable[[np.ndarray], tuple[float, float, float, float]]

CHUNK = 1 << 15  # elements per chunk: float64 work buffers of 256 KiB stay in cache
BLOCK_CHUNKS = 64  # chunks per unit of parallel work (fixed, so results ignore thread count)
# A compiled kernel reads the input directly (in L1-sized sub-blocks of its own), so rows of at
# least 1024 elements (whole or cut) go to it in larger pieces: the Python cost per piece
# (~10 µs) is then under 5 %, and a gather of strided rows uses more of each cache line.
KERNEL_CHUNK = 1 << 17
# Contiguous input under a compiled kernel needs no buffer at all: pieces of 2^21 elements, so
# that the Python work per piece, serialised by the GIL, is ~1 % of the kernel's (at 2^17 it
# measured 25 % of the wall time with two threads).
KERNEL_CHUNK_CONTIGUOUS = 1 << 21
# A NumPy chunk kernel on a full reduction: pieces of 2^17 (one float64 work buffer of 1 MiB,
# within L2): the per-piece Python cost, held under the GIL, then no longer serialises the two
# threads (2^16: 0.27-0.32 s for 10^8 float32 with two threads; 2^17: 0.17 s; 2^18: the same).
NUMPY_KERNEL_CHUNK = 1 << 17
_ROW = 8192  # BLAS dots below OpenBLAS's threading threshold: no helper threads left spinning

T = TypeVar("T")
R = TypeVar("R")


# ------------------------------------------------------------------------------ partials
@dataclass(frozen=True)
class Partial:
    """Moments of a stream of values: count, mean, centred sum of squares, extremes.

    An empty stream is ``Partial()``: n = 0 (its mean 0 is neutral in a merge).
    """

    n: float = 0.0
    mean: float = 0.0
    m2: float = 0.0
    vmin: float = math.inf
    vmax: float = -math.inf

    def merge(self, other: Partial) -> Partial:
        """Chan's pairwise update, with the module's rule for non-finite means."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n, mean, m2 = merge_moments(self.n, self.mean, self.m2, other.n, other.mean, other.m2)
        return Partial(n, mean, m2, min(self.vmin, other.vmin), max(self.vmax, other.vmax))


def merge_moments(
    n_a: float, a: float, m2_a: float, n_b: float, b: float, m2_b: float
) -> tuple[float, float, float]:
    r"""(n, mean, M2) of two non-empty streams' (count, mean, M2) merged by Chan et al.'s update,

    .. math:: n = n_a + n_b, \quad \bar v = a + \delta n_b / n, \quad
              M_2 = M_{2,a} + M_{2,b} + \delta^2 n_a n_b / n, \quad \delta = b - a,

    with the module's rule for non-finite means: NaN (and NaN M2) where a mean is NaN or the two
    are infinite of opposite signs, else the infinite mean with M2 = +inf."""
    n = n_a + n_b
    if math.isnan(a) or math.isnan(b) or (math.isinf(a) and math.isinf(b) and a != b):
        return n, math.nan, math.nan
    if math.isinf(a) or math.isinf(b):
        return n, a if math.isinf(a) else b, math.inf
    delta = b - a
    return n, a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


def combine(ns: np.ndarray, means: np.ndarray, m2s: np.ndarray) -> tuple[float, float, float]:
    """Merge many finite partial moments at once: ``(n, mean, m2)`` (the vectorised merge)."""
    ns = np.asarray(ns, dtype=np.float64)
    keep = ns > 0
    ns, means, m2s = ns[keep], np.asarray(means, np.float64)[keep], np.asarray(m2s)[keep]
    if ns.size == 0:
        return 0.0, 0.0, 0.0
    n = float(ns.sum())
    mean = float(np.dot(ns, means) / n)
    d = means - mean
    return n, mean, float(m2s.sum() + np.dot(ns, d * d))


def finish(parts: Sequence[Partial]) -> Partial:
    """Merge partials in order (finite ones by :func:`combine`, non-finite by the rule)."""
    live = [p for p in parts if p.n > 0]
    if not live:
        return Partial()
    means = np.array([p.mean for p in live])
    lo = min(p.vmin for p in live)
    hi = max(p.vmax for p in live)
    n = float(sum(p.n for p in live))
    if not np.all(np.isfinite(means)):
        pos, neg = bool(np.any(means == np.inf)), bool(np.any(means == -np.inf))
        if np.any(np.isnan(means)) or (pos and neg):
            return Partial(n, math.nan, math.nan, lo, hi)
        return Partial(n, math.inf if pos else -math.inf, math.inf, lo, hi)
    with np.errstate(over="ignore", invalid="ignore"):
        n, mean, m2 = combine(np.array([p.n for p in live]), means, np.array([p.m2 for p in live]))
    return Partial(n, mean, m2 if not math.isnan(m2) else math.inf, lo, hi)


# ----------------------------------------------------------------------- chunk reductions
def _sum_of_squares(v: np.ndarray) -> float:
    """Σ v², by single-threaded BLAS dots over rows (our own threads do the parallel work)."""
    rows = v.size // _ROW
    head = rows * _ROW
    total = 0.0
    if rows:
        block = v[:head].reshape(rows, _ROW)
        total = float(np.vecdot(block, block).sum())
    if head < v.size:
        tail = v[head:]
        total += float(np.einsum("i,i->", tail, tail))
    return total


def _nonfinite_mean(vals: np.ndarray) -> float:
    """The mean of values whose plain sum is not finite, by the module's rule."""
    if np.any(np.isnan(vals)):
        return math.nan
    pos, neg = bool(np.any(vals == np.inf)), bool(np.any(vals == -np.inf))
    if pos and neg:
        return math.nan
    if pos or neg:
        return math.inf if pos else -math.inf
    return float(np.sum(vals / vals.size))  # finite values whose sum overflowed


def chunk_moments(v: np.ndarray, extremes: bool = True) -> Partial:
    """Moments of a 1-D float64 chunk; ``v`` is a work buffer and is overwritten."""
    k = v.size
    if k == 0:
        return Partial()
    lo = float(np.minimum.reduce(v)) if extremes else math.inf
    hi = float(np.maximum.reduce(v)) if extremes else -math.inf
    mean = float(np.einsum("i->", v)) / k
    if not math.isfinite(mean):
        mean = _nonfinite_mean(v)
        if not math.isfinite(mean):
            return Partial(float(k), mean, math.nan if math.isnan(mean) else math.inf, lo, hi)
    if abs(mean) > _HUGE:  # about a sample value: the mean's own rounding (an ulp of a huge
        v0 = float(v[0])  # number) would otherwise give squares that overflow where m2 is 0
        np.subtract(v, v0, out=v)
        shift = float(np.einsum("i->", v)) / k
        mean = v0 + shift
        np.subtract(v, shift, out=v)
    else:
        np.subtract(v, mean, out=v)
    m2 = _sum_of_squares(v)
    return Partial(float(k), mean, m2 if not math.isnan(m2) else math.inf, lo, hi)


_HUGE = 2.0**500  # |mean| above which an ulp of it, squared, can overflow float64


def row_moments(
    v: np.ndarray, keep: np.ndarray | None, extremes: bool = False
) -> tuple[np.ndarray, ...]:
    """Per-row ``(n, mean, m2, min, max)`` of a [rows, k] float64 work buffer (overwritten),
    counting only the entries where ``keep`` is true. Empty rows get n = 0, mean 0, m2 0."""
    rows = v.shape[0]
    if rows == 1:
        vals = v[0] if keep is None else v[0][keep[0]]
        p = chunk_moments(np.ascontiguousarray(vals), extremes)
        return tuple(np.array([x]) for x in (p.n, p.mean, p.m2, p.vmin, p.vmax))
    if keep is None:
        n = np.full(rows, float(v.shape[1]))
    else:
        n = np.count_nonzero(keep, axis=1).astype(np.float64)
    if extremes:
        vmin = np.min(v, axis=1, where=True if keep is None else keep, initial=np.inf)
        vmax = np.max(v, axis=1, where=True if keep is None else keep, initial=-np.inf)
    else:
        vmin, vmax = np.full(rows, np.inf), np.full(rows, -np.inf)
    if keep is not None:
        np.copyto(v, 0.0, where=~keep)
    mean = np.add.reduce(v, axis=1) / np.maximum(n, 1.0)
    bad = np.flatnonzero(~np.isfinite(mean))
    for i in bad:
        mean[i] = _nonfinite_mean(v[i] if keep is None else v[i][keep[i]])
    finite = np.isfinite(mean)
    np.subtract(v, np.where(finite, mean, 0.0)[:, None], out=v)
    if keep is not None:
        np.copyto(v, 0.0, where=~keep)
    m2 = np.einsum("ij,ij->i", v, v)
    m2 = np.where(
        finite, np.where(np.isnan(m2), np.inf, m2), np.where(np.isnan(mean), np.nan, np.inf)
    )
    return n, mean, m2, vmin, vmax


#: The order of the co-moments S_ab of (L, k3, e): S_LL, S_kk, S_ee, S_Lk, S_Le, S_ke.
PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


def co_merge(
    n_a: float,
    mean_a: tuple[float, float, float],
    s_a: tuple[float, ...],
    n_b: float,
    mean_b: tuple[float, float, float],
    s_b: tuple[float, ...],
) -> tuple[float, tuple[float, float, float], tuple[float, ...]]:
    r"""(n, means, S) of two non-empty streams' co-moments (in :data:`PAIRS` order) merged by
    Chan et al.'s update: with δ = mean_b - mean_a per column,

    .. math:: \bar x = \bar x_a + \delta_x n_b / n, \quad
              S_{xy} = S_{xy,a} + S_{xy,b} + \delta_x \delta_y n_a n_b / n."""
    n = n_a + n_b
    d = [b - a for a, b in zip(mean_a, mean_b, strict=True)]
    f = n_a * n_b / n
    mean = (
        mean_a[0] + d[0] * (n_b / n),
        mean_a[1] + d[1] * (n_b / n),
        mean_a[2] + d[2] * (n_b / n),
    )
    s = tuple(x + y + d[i] * d[j] * f for x, y, (i, j) in zip(s_a, s_b, PAIRS, strict=True))
    return n, mean, s


@dataclass(frozen=True)
class KoptPartial:
    r"""What the optimal-λ estimator needs, in one pass: over the samples with L > -inf, the count,
    the means and the centred co-moments S_ab = Σ (a - ā)(b - b̄) of (L, k3, e) with
    k3 the table's value of k3 and e = r - 1 = expm1(L); and the number of samples with
    L = -inf (log p = -inf: the estimate is +inf there whatever λ̂)."""

    n: float = 0.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    s: tuple[float, ...] = (0.0,) * 6  # S_LL, S_kk, S_ee, S_Lk, S_Le, S_ke
    n_inf: float = 0.0

    def merge(self, o: KoptPartial) -> KoptPartial:
        """Chan's update for co-moments: S_ab gains δ_a·δ_b·n_a·n_b/n."""
        n_inf = self.n_inf + o.n_inf
        if o.n == 0 or self.n == 0:
            base = self if o.n == 0 else o
            return KoptPartial(base.n, base.mean, base.s, n_inf)
        n, mean, s = co_merge(self.n, self.mean, self.s, o.n, o.mean, o.s)
        return KoptPartial(n, mean, s, n_inf)

    @property
    def lam(self) -> float:
        """λ̂ = S_Le/S_ee = Cov(L, r)/Var(r); 1 where Var(r) = 0, 0 where it overflows."""
        return kopt_lambda(self.s[2], self.s[4])


def kopt_lambda(s_ee: float, s_le: float, shift: int = 0) -> float:
    """λ̂ = (S_Le/S_ee)·2^shift = Cov(L, r)/Var(r) (``shift``: the co-moments' scale exponents,
    e_L - e_e); 1 where S_ee = 0 (or S_Le is not finite), 0 where S_ee = +inf; ±inf where the
    ratio exceeds float64."""
    if s_ee == math.inf:
        return 0.0
    if not (s_ee > 0 and math.isfinite(s_le)):
        return 1.0
    r = s_le / s_ee
    try:
        return math.ldexp(r, shift)
    except OverflowError:
        return math.copysign(math.inf, r)


def kopt_moments(
    L: np.ndarray, keep: np.ndarray | None, k3: Callable[[np.ndarray], Any]
) -> list[KoptPartial]:
    """Per-row :class:`KoptPartial` of a [rows, k] float64 work buffer of L (overwritten)."""
    rows = L.shape[0]
    neg = L == -np.inf
    n_inf = np.count_nonzero(neg if keep is None else neg & keep, axis=1)
    if n_inf.any():
        keep = ~neg if keep is None else keep & ~neg
        np.copyto(L, 0.0, where=neg)
    with np.errstate(all="ignore"):
        cols = [np.asarray(k3(L), dtype=np.float64), np.expm1(L)]
    cols.insert(0, L)
    if keep is None:
        n = np.full(rows, float(L.shape[1]))
    else:
        n = np.count_nonzero(keep, axis=1).astype(np.float64)
    means = []
    for c in cols:
        if keep is not None:
            np.copyto(c, 0.0, where=~keep)
        m = np.add.reduce(c, axis=1) / np.maximum(n, 1.0)
        np.subtract(c, m[:, None], out=c)
        if keep is not None:
            np.copyto(c, 0.0, where=~keep)
        means.append(m)
    with np.errstate(all="ignore"):
        s = [np.einsum("ij,ij->i", cols[i], cols[j]) for i, j in PAIRS]
    return [
        KoptPartial(
            float(n[r]),
            (float(means[0][r]), float(means[1][r]), float(means[2][r])),
            tuple(float(x[r]) for x in s),
            float(n_inf[r]),
        )
        if n[r]
        else KoptPartial(n_inf=float(n_inf[r]))
        for r in range(rows)
    ]


def kopt_values(p: KoptPartial, lam: float) -> Partial:
    r"""Moments of v = -L + λ(r - 1) = λ·k3 + (λ - 1)·L over the samples of ``p``, exactly from
    its co-moments. Two equal expressions are available,

    .. math:: \bar v = \lambda \bar e - \bar L = \lambda \bar k_3 + (\lambda - 1)\bar L, \quad
              M_2 = S_{LL} - 2\lambda S_{Le} + \lambda^2 S_{ee}
                  = \lambda^2 S_{kk} + 2\lambda(\lambda - 1) S_{Lk} + (\lambda - 1)^2 S_{LL},

    and the one whose terms are smaller (less cancellation) is used: the (L, e) form when L is
    far from 0, the (L, k3) form near 0 where e ≈ L. Samples with L = -inf make the mean +inf."""
    n = p.n + p.n_inf
    if p.n_inf:
        return Partial(n, math.inf, math.inf)
    if p.n == 0:
        return Partial()
    m_l, m_k, m_e = p.mean
    s_ll, s_kk, s_ee, s_lk, s_le, _ = p.s
    if lam == 0.0:
        return Partial(n, -m_l, s_ll)
    mean_a, scale_a = lam * m_e - m_l, abs(lam * m_e) + abs(m_l)
    mean_b, scale_b = lam * m_k + (lam - 1) * m_l, abs(lam * m_k) + abs((lam - 1) * m_l)
    mean = mean_a if scale_a <= scale_b else mean_b
    m2_a = s_ll - 2 * lam * s_le + lam * lam * s_ee
    sc_a = s_ll + abs(2 * lam * s_le) + lam * lam * s_ee
    m2_b = lam * lam * s_kk + 2 * lam * (lam - 1) * s_lk + (lam - 1) ** 2 * s_ll
    sc_b = lam * lam * s_kk + abs(2 * lam * (lam - 1) * s_lk) + (lam - 1) ** 2 * s_ll
    m2 = m2_a if sc_a <= sc_b else m2_b
    if not (math.isfinite(mean) and math.isfinite(m2)):
        return Partial(n, math.nan, math.nan)
    return Partial(n, mean, max(m2, 0.0))


# ------------------------------------------------------------------------------- threads
_pool: ThreadPoolExecutor | None = None


def _executor(threads: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool._max_workers != threads:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="klest")
    return _pool


def ordered_map(
    fn: Callable[[T], R],
    items: Sequence[T],
    threads: int,
    on_result: Callable[[int, R], None] | None = None,
    executor: Any = None,
) -> list[R]:
    """``[fn(x) for x in items]`` on ``threads`` workers (or an ``Executor``), results in order.

    At most 2·threads items are in flight; ``on_result(i, result)`` is called in order from the
    calling thread as results arrive (for progress reports)."""
    out: list[R] = []
    if executor is None and (threads <= 1 or len(items) <= 1):
        for i, x in enumerate(items):
            r = fn(x)
            out.append(r)
            if on_result is not None:
                on_result(i, r)
        return out
    pool = executor if executor is not None else _executor(threads)
    pending: list[Future[R]] = []
    nxt = 0
    try:
        while nxt < len(items) or pending:
            while nxt < len(items) and len(pending) < 2 * max(threads, 1):
                pending.append(pool.submit(fn, items[nxt]))
                nxt += 1
            r = pending.pop(0).result()
            out.append(r)
            if on_result is not None:
                on_result(len(out) - 1, r)
    except BaseException:
        for f in pending:
            f.cancel()
        raise
    return out


# ------------------------------------------------------------------------ walking arrays
def pieces(shape: tuple[int, ...], budget: int) -> Iterator[tuple[int, tuple[Any, ...]]]:
    """Cover an array of ``shape`` in C order by sub-views of at most ``budget`` elements.

    Yields ``(flat_start, index)``: ``a[index]`` is the piece, whose elements are the flat
    (C-order) positions ``flat_start, flat_start + 1, ...``."""
    size = math.prod(shape)
    if size == 0:
        return
    if not shape:
        yield 0, ()
        return
    j = 0  # slice axis j, whole sub-arrays below it: the first axis where they fit
    while math.prod(shape[j + 1 :]) > budget:
        j += 1
    rest = math.prod(shape[j + 1 :])
    step = max(1, budget // rest)
    for prefix in np.ndindex(*shape[:j]):
        base = (int(np.ravel_multi_index(prefix, shape[:j])) if j else 0) * shape[j] * rest
        for a in range(0, shape[j], step):
            yield base + a * rest, (*prefix, slice(a, min(a + step, shape[j])))


# ------------------------------------------------------------------------ array reductions
@dataclass(frozen=True)
class ArrayJob:
    """An array reduction: the sources (``[L]`` or ``[log p, log q]``, one shape, reduced axes
    last; views of the caller's arrays), the keep-masks (true = use), the np.ma masks (true =
    masked: neither used nor validated), the clamp bounds and whether to validate values."""

    sources: tuple[np.ndarray, ...]
    masks: tuple[np.ndarray, ...]
    ma_masks: tuple[np.ndarray, ...]
    n_kept: int
    bounds: tuple[float, float] | None
    validate: bool
    source_names: tuple[str, ...]

    @property
    def outer(self) -> tuple[int, ...]:
        return tuple(self.sources[0].shape[: self.n_kept])

    @property
    def inner(self) -> tuple[int, ...]:
        return tuple(self.sources[0].shape[self.n_kept :])


@dataclass(frozen=True)
class _Task:
    row: int  # first output row (flat index over the kept axes)
    rows: int  # output rows covered (whole rows), or 1 for a piece of a long row
    start: int  # flat index of the first element within its row (for a piece of a long row)
    index: tuple[Any, ...]
    whole_rows: bool


def _tasks(job: ArrayJob, budget: int = CHUNK) -> list[_Task]:
    """Pieces of at most ``budget`` elements: whole rows, or pieces of one long row."""
    outer, inner = job.outer, job.inner
    k = math.prod(inner)
    out: list[_Task] = []
    if k == 0 or math.prod(outer) == 0:
        return out
    if k <= budget:
        for start, idx in pieces(outer, max(1, budget // k)):
            rows = math.prod(job.sources[0][idx].shape) // k if idx else 1
            out.append(_Task(start, rows, 0, idx, True))
        return out
    for row in range(math.prod(outer)):
        prefix = tuple(int(i) for i in np.unravel_index(row, outer)) if outer else ()
        for start, idx in pieces(inner, budget):
            out.append(_Task(row, 1, start, (*prefix, *idx), False))
    return out


class _Buffers:
    """Per-thread float64 work buffers (reused: no page faults per chunk)."""

    def __init__(self) -> None:
        self.local = threading.local()

    def get(self, size: int, dtype: Any = np.float64, slot: str = "") -> np.ndarray:
        name = f"buf_{np.dtype(dtype).name}{slot}"
        buf = getattr(self.local, name, None)
        if buf is None or buf.size < size:
            buf = np.empty(max(size, CHUNK), dtype=dtype)
            setattr(self.local, name, buf)
        return buf[:size]


_BUFFERS = _Buffers()


@functools.cache
def numpy_kernel(kind: str) -> Callable[[np.ndarray], tuple[float, float, float, float]]:
    """A NumPy chunk kernel (see :data:`Kernel`) for the primitive ``kind`` of
    :mod:`klest._numerics`: the chunk is widened into a float64 work buffer, its values computed
    by :func:`klest._numerics.numpy_values` (float32 accuracy for float32 input, which lets it
    skip the series almost everywhere) and reduced by :func:`chunk_moments`."""

    def values(L: np.ndarray) -> np.ndarray:
        L = L.reshape(-1)
        v = _BUFFERS.get(L.size, slot="_v")
        if L.dtype in (np.float32, np.float64):
            x = L  # read as it is: the values are computed in float64 (one work buffer)
        else:
            x = _BUFFERS.get(L.size, slot="_x")
            np.copyto(x, L, casting="unsafe")
        return numpy_values(kind, x, v, single=L.dtype == np.float32)

    def kernel(L: np.ndarray) -> tuple[float, float, float, float]:
        p = chunk_moments(values(L))
        return p.mean, p.m2, p.vmin, p.vmax

    def mean_m2(L: np.ndarray) -> tuple[float, float]:
        """``kernel(L)[:2]`` without the two passes for the extremes."""
        p = chunk_moments(values(L), extremes=False)
        return p.mean, p.m2

    kernel.mean_m2 = mean_m2  # type: ignore[attr-defined]
    NUMPY_KERNELS.add(kernel)
    return kernel


NUMPY_KERNELS: set[Any] = set()

_K3 = get_estimator("k3")
#: The :mod:`klest._numerics` primitives that have a NumPy chunk kernel, by value function.
_NUMPY_KINDS: dict[Any, str] = {expm1mx: "expm1mx", lexpl_mexpm1: "lexpl_mexpm1"}
#: Kernels users registered, by estimator name, with the value function they were registered for.
_USER_KERNELS: dict[str, tuple[Any, Kernel]] = {}


def numpy_kind(rec: Estimator) -> str | None:
    """The :mod:`klest._numerics` primitive (a ``numpy_values`` kind) of a record's values, if
    its value function is one (k3: ``"expm1mx"``, forward_k3: ``"lexpl_mexpm1"``)."""
    return _NUMPY_KINDS.get(rec.value) if rec.value is not None else None


def kernel_for(rec: Estimator) -> Kernel | None:
    """The chunk kernel that computes ``rec`` under the options in force, or None (its value
    function, chunk by chunk). Compiled kernels (``klest.options(fast=...)``, ``KLEST_FAST``):
    the kernel a user registered for the record's name and value function
    (:func:`register_kernel`), else :mod:`klest._fast`'s kernel of a built-in record's name.
    Otherwise the NumPy kernel of its value function's primitive (:func:`numpy_kind`), if any.
    Whole-batch records (k_opt) have none: their co-moments are reduced by :func:`reduce_array`.
    """
    if rec.batch:
        return None
    if fast_wanted():
        user = _USER_KERNELS.get(rec.name)
        if user is not None and user[0] is rec.value:
            return user[1]
        if is_builtin(rec):
            from . import _fast  # here, not above: it imports numba, which `import klest` must not

            kernel = _fast.KERNELS.get(rec.name) if _fast.available() else None
            if kernel is not None:
                return kernel
    kind = numpy_kind(rec)
    return numpy_kernel(kind) if kind is not None else None


def register_kernel(estimator: str, kernel: Kernel) -> None:
    r"""Use ``kernel`` to reduce the registered estimator named ``estimator`` in
    :func:`klest.estimate` and the lab, where compiled kernels are on (``klest.options(fast=...)``,
    ``KLEST_FAST``) and it applies (one unmasked, unclamped float32/float64 input).

    ``kernel(L)`` takes a non-empty 1-D chunk of L and returns, for the values v = value(L) of the
    estimator (up to rounding), accumulated in float64,

    .. math:: \bar v = \tfrac1n \textstyle\sum_i v_i, \quad M_2 = \sum_i (v_i - \bar v)^2,
              \quad \min_i v_i, \quad \max_i v_i

    (see :data:`Kernel`). It is tied to the record's value function at registration: once the
    estimator is registered again with another value function, the kernel is no longer used.
    The registry is per process (a lab executor's worker process uses it only if it registered
    it too). :func:`klest.estimate` validates the input of each piece the kernel reduces and
    refuses a NaN mean. Built-in and ``fdiv:`` estimators cannot be given one.
    """
    rec = get_estimator(estimator) if isinstance(estimator, str) else None
    if rec is None or rec.name in BUILTIN_NAMES or rec.name.startswith(FDIV_PREFIX) or rec.batch:
        raise KlestError(
            f"a kernel is registered for an estimator registered by name "
            f"(klest.register_estimator), got {estimator!r}",
            argument="estimator",
        )
    if not callable(kernel):
        raise KlestError(
            f"must be callable: 1-D L -> (mean, m2, min, max), got {type(kernel).__name__}",
            argument="kernel",
        )
    _USER_KERNELS[rec.name] = (rec.value, kernel)


_GATHER = 512  # columns per block of a strided 2-D gather: the lines it touches stay in L1


def _gather(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` (casting as needed). A 2-D ``src`` whose rows are strided (a reduced
    leading axis moved last) is copied in blocks of columns, so that each cache line of the
    source is read while it is still in cache (3-4x faster than one copy of the whole piece)."""
    if src.ndim != 2 or src.strides[1] == src.itemsize or src.shape[1] <= _GATHER:
        np.copyto(dst, src, casting="unsafe")
        return
    for a in range(0, src.shape[1], _GATHER):
        np.copyto(dst[:, a : a + _GATHER], src[:, a : a + _GATHER], casting="unsafe")


def _bad_values(job: ArrayJob, idx: tuple[Any, ...], keep: np.ndarray | None = None) -> None:
    """Raise :class:`KlestError` if a piece holds values no sample can have (see
    :func:`klest._backend.check_log_ratio_values`). Masked-out entries (``keep`` false, or
    np.ma-masked) are not data: they are ignored whatever they hold, the rule of the core and
    of :mod:`klest.rl` alike."""
    raw = [np.asarray(s[idx]) for s in job.sources]
    if keep is None and job.ma_masks:
        keep = ~np.logical_or.reduce([np.asarray(m[idx], dtype=bool) for m in job.ma_masks])
    if keep is not None:
        shape = np.broadcast_shapes(*(r.shape for r in raw))
        k = np.broadcast_to(keep.reshape(shape) if keep.size == math.prod(shape) else keep, shape)
        raw = [np.broadcast_to(r, shape)[k] for r in raw]
    if len(raw) == 1:
        check_log_ratio_values(npx, None, None, raw[0])
    else:
        check_log_ratio_values(npx, raw[1], raw[0], None)


def _load(job: ArrayJob, t: _Task) -> tuple[np.ndarray, np.ndarray | None, int]:
    """The piece's L as a [rows, k] float64 work buffer, its keep-mask (None: keep all) and the
    number of kept elements the clamp moved."""
    first = job.sources[0][t.index]
    size = first.size
    rows = t.rows
    L = _BUFFERS.get(size).reshape(first.shape)
    with np.errstate(invalid="ignore", over="ignore"):
        if len(job.sources) == 1:
            _gather(L, first)
        else:
            np.subtract(first, job.sources[1][t.index], out=L, dtype=np.float64, casting="unsafe")
    keep: np.ndarray | None = None
    for m in job.masks:
        mk = np.asarray(m[t.index])
        if mk.dtype != np.bool_:
            if job.validate and np.any((mk != 0) & (mk != 1)):
                raise KlestError("must hold only 0 and 1 (or be boolean)", argument="mask")
            mk = mk != 0
        keep = mk if keep is None else keep & mk
    for m in job.ma_masks:
        mk = ~np.asarray(m[t.index], dtype=bool)
        keep = mk if keep is None else keep & mk
    if keep is not None:
        keep = np.ascontiguousarray(np.broadcast_to(keep, first.shape)).reshape(rows, -1)
        if keep.all():
            keep = None
    L = L.reshape(rows, -1)
    if job.validate and not math.isfinite(float(np.einsum("ij->", L))):
        _bad_values(job, t.index, keep)
    moved = 0
    if job.bounds is not None:
        lo, hi = job.bounds
        out = (L < lo) | (L > hi)
        if keep is not None:
            out &= keep
        moved = int(np.count_nonzero(out))
        np.clip(L, lo, hi, out=L)
    return L, keep, moved


def _values(rec: Estimator, L: np.ndarray, single: bool = False) -> np.ndarray:
    """The record's per-sample values on a float64 work buffer of L; ``single``: L holds values
    of float32 origin (float32 accuracy suffices: see :func:`klest._numerics.numpy_values`).
    A record's own value function is checked for its shape and dtype
    (:meth:`klest.table.Estimator.values`)."""
    kind = numpy_kind(rec)
    if kind is not None:
        out = _BUFFERS.get(L.size, slot="_values")
        numpy_values(kind, L.reshape(-1), out, single)
        return out.reshape(L.shape)
    with options(validate=False), np.errstate(all="ignore"):
        return np.asarray(rec.values(npx, L), dtype=np.float64)


def _raw_rows(job: ArrayJob, t: _Task) -> np.ndarray:
    """The piece's input as [rows, k] in its own dtype: a view where rows are contiguous in
    memory, else gathered into a buffer."""
    piece = job.sources[0][t.index]
    flat: np.ndarray | None = piece.view()
    try:
        flat.shape = (t.rows, -1)  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        flat = None
    if flat is None or not flat[0].flags.c_contiguous:
        buf = _BUFFERS.get(piece.size, piece.dtype)
        _gather(buf.reshape(piece.shape), piece)
        flat = buf.reshape(t.rows, -1)
    return flat


def _kernel_rows(rec: Estimator, job: ArrayJob, t: _Task, kernel: Any) -> tuple[Any, ...]:
    """The kernel on each output row of a piece, on the input's own float32/float64 values
    (rows that are contiguous in memory are passed as they are; others are gathered into a
    buffer of the input's dtype first)."""
    flat = _raw_rows(job, t)
    fn = getattr(kernel, "mean_m2", kernel)  # compiled: without the unused extremes
    res = [fn(row) for row in flat]
    means = np.array([r[0] for r in res], dtype=np.float64)
    _check_kernel_means(rec, job, t.index, means, kernel)
    n = np.full(t.rows, float(flat.shape[1]))
    return n, means, np.array([r[1] for r in res], dtype=np.float64), 0


def _kernel_applies(job: ArrayJob, kernel: Any) -> bool:
    """Whether a chunk kernel can read the job's input as it is (one float source, no masks)."""
    return (
        kernel is not None
        and len(job.sources) == 1
        and not job.masks
        and not job.ma_masks
        and job.bounds is None
        and job.sources[0].dtype in (np.float32, np.float64)
    )


def _check_kernel_means(
    rec: Estimator, job: ArrayJob, index: tuple[Any, ...], means: np.ndarray, kernel: Any
) -> None:
    """Validation of a piece reduced by a chunk kernel, which never saw the values one by one:
    a non-finite mean sends the input to :func:`_bad_values`; for a record that is not a
    built-in (whose finite means prove finite input) the input is always checked. A NaN mean
    from a registered kernel (:func:`register_kernel`) on input that passed is its fault."""
    builtin = is_builtin(rec)
    if job.validate and (not np.all(np.isfinite(means)) or not builtin):
        _bad_values(job, index)
        if not builtin and kernel not in NUMPY_KERNELS and np.any(np.isnan(means)):
            raise KlestError(
                f"the kernel registered for estimator {rec.name!r} returned a NaN mean for "
                "log-ratios that are not NaN",
                argument="estimator",
            )


def _piece_moments(rec: Estimator, job: ArrayJob, t: _Task, kernel: Any) -> tuple[Any, ...]:
    if (
        _kernel_applies(job, kernel)
        and (t.rows == 1 or job.sources[0][t.index].size >= 1024 * t.rows)
        and (t.rows == 1 or kernel not in NUMPY_KERNELS)  # NumPy: rows at once, below
    ):
        return _kernel_rows(rec, job, t, kernel)
    L, keep, moved = _load(job, t)
    v = _values(rec, L, _single(job))
    n, mean, m2, _, _ = row_moments(v, keep)
    if np.any(np.isnan(mean)):
        _check_nan_rows(rec, L, v, keep, mean)
    return n, mean, m2, moved


def _check_nan_rows(
    rec: Estimator, L: np.ndarray, v: np.ndarray, keep: np.ndarray | None, mean: np.ndarray
) -> None:
    """On the rows whose mean is NaN: KlestError if the record gave NaN for a kept L that is not
    NaN. :func:`row_moments` leaves such rows' values as they were (nothing is subtracted from
    a non-finite mean) and zeroes masked entries; where v is L's own buffer, they are alike."""
    for r in np.flatnonzero(np.isnan(mean)):
        check_values(rec, L[r], v[r], keep=None if keep is None else keep[r])


def _single(job: ArrayJob) -> bool:
    """Whether every source is float32 (its values need float32 accuracy only)."""
    return all(s.dtype == np.float32 for s in job.sources)


def _kopt_kernel(job: ArrayJob, cross: bool) -> Callable[[np.ndarray], np.ndarray] | None:
    """The compiled co-moment kernel (:func:`klest._fast.kopt_comoments`) if it can be used."""
    if cross or not fast_wanted():  # asked before importing numba
        return None
    from . import _fast  # here, not above: it imports numba, which `import klest` must not

    if not _fast.available() or not _kernel_applies(job, _fast.kopt_comoments):
        return None
    return _fast.kopt_comoments


def _kopt_piece(job: ArrayJob, t: _Task, cross: bool, kernel: Any = None) -> tuple[Any, ...]:
    """Per-row :class:`KoptPartial` of a piece (of its even- and odd-indexed samples when
    cross-fitting), and the clamp count. With the compiled kernel, rows are read as they are;
    a row it flags (a NaN, or values beyond float64 moments) sends the piece to NumPy."""
    if kernel is not None and (t.rows == 1 or job.sources[0][t.index].size >= 1024 * t.rows):
        res = [kernel(row) for row in _raw_rows(job, t)]
        if not any(r[11] for r in res):
            return (
                [
                    KoptPartial(
                        float(r[0]),
                        (float(r[1]), float(r[2]), float(r[3])),
                        tuple(float(x) for x in r[4:10]),
                        float(r[10]),
                    )
                    if r[0]
                    else KoptPartial(n_inf=float(r[10]))
                    for r in res
                ],
            ), 0

    k3 = _K3

    def values(L: np.ndarray) -> Any:
        return _values(k3, L, _single(job))

    L, keep, moved = _load(job, t)
    if not cross:
        return (kopt_moments(L, keep, values),), moved
    even = np.broadcast_to(((t.start + np.arange(L.shape[1])) % 2 == 0)[None, :], L.shape)
    k_even = even if keep is None else keep & even
    k_odd = ~even if keep is None else keep & ~even
    return (kopt_moments(L.copy(), k_even, values), kopt_moments(L, k_odd, values)), moved


def _kopt_rows(job: ArrayJob, tasks: list[_Task], cross: bool, threads: int) -> tuple[Any, ...]:
    """Per output row: n, mean, m2 of k_opt (λ̂ fitted on the row; cross-fitted: on each half,
    applied to the other), and the clamp count. One pass: the moments of the values follow
    exactly from the co-moments (:func:`kopt_values`)."""
    rows = math.prod(job.outer)
    halves = 2 if cross else 1
    acc = [[KoptPartial() for _ in range(rows)] for _ in range(halves)]
    moved = 0
    kernel = _kopt_kernel(job, cross)
    piece = CHUNK
    if kernel is not None and math.prod(job.inner) >= 1024:
        piece = _compiled_piece(job)
        tasks = _tasks(job, piece)
    results = _run(lambda t: _kopt_piece(job, t, cross, kernel), tasks, threads, piece)
    for t, (res, t_moved) in zip(tasks, results, strict=True):
        moved += t_moved
        for h in range(halves):
            for i, p in enumerate(res[h]):
                acc[h][t.row + i] = acc[h][t.row + i].merge(p)
    n, mean, m2 = np.zeros(rows), np.zeros(rows), np.zeros(rows)
    for r in range(rows):
        if cross:  # the even half's values use the odd half's λ̂, and the other way round
            even, odd = acc[0][r], acc[1][r]
            p = kopt_values(even, odd.lam).merge(kopt_values(odd, even.lam))
        else:
            p = kopt_values(acc[0][r], acc[0][r].lam)
        n[r], mean[r], m2[r] = p.n, p.mean, p.m2
    return n, mean, m2, moved


def _compiled_piece(job: ArrayJob) -> int:
    """Piece size for a compiled kernel: large where it reads the input in place."""
    return KERNEL_CHUNK_CONTIGUOUS if job.sources[0].flags.c_contiguous else KERNEL_CHUNK


def _blocks(tasks: list[_Task], size: int = BLOCK_CHUNKS) -> list[list[_Task]]:
    return [tasks[i : i + size] for i in range(0, len(tasks), size)]


def _run(fn: Callable[[_Task], T], tasks: list[_Task], threads: int, piece: int = CHUNK) -> list[T]:
    """``[fn(t) for t in tasks]`` in blocks of about BLOCK_CHUNKS·CHUNK elements on the threads
    (results are merged in task order afterwards: the blocks do not affect them)."""

    def block(ts: list[_Task]) -> list[T]:
        return [fn(t) for t in ts]

    size = max(1, BLOCK_CHUNKS * CHUNK // piece)
    return [r for b in ordered_map(block, _blocks(tasks, size), threads) for r in b]


COLUMN_GROUP = 2048  # columns per task of a column reduction (fixed: results ignore threads)


def _column_source(job: ArrayJob, kernel: Any) -> np.ndarray | None:
    """For a 2-D input reduced over its first axis (rows contiguous in memory, so the reduced
    axis, moved last, is strided), the input as [R, C] when the kernel has a compiled column
    form (``kernel.columns``, :mod:`klest._fast`) that reduces it without transposing."""
    src = job.sources[0]
    if (
        not _kernel_applies(job, kernel)
        or kernel in NUMPY_KERNELS
        or getattr(kernel, "columns", None) is None
        or src.ndim != 2
        or job.n_kept != 1
        or src.strides[0] != src.itemsize
        or src.strides[1] == src.itemsize
        or src.shape[0] < 2
    ):
        return None
    return src.T


def _column_reduce(
    rec: Estimator, job: ArrayJob, X: np.ndarray, kernel: Any, threads: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, mean, m2) per column of X [R, C] by the kernel's column form, in fixed groups of
    COLUMN_GROUP columns on the threads."""
    R, C = X.shape
    groups = [(a, min(a + COLUMN_GROUP, C)) for a in range(0, C, COLUMN_GROUP)]
    parts = ordered_map(lambda g: kernel.columns(X[:, g[0] : g[1]]), groups, threads)
    mean = np.concatenate([p[0] for p in parts])
    m2 = np.concatenate([p[1] for p in parts])
    _check_kernel_means(rec, job, (slice(None), slice(None)), mean, kernel)
    return np.full(C, float(R)), mean, m2


def reduce_array(
    rec: Estimator, job: ArrayJob, threads: int, kernel: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(n, mean, m2, n_clamped)`` of the estimator's values over the inner axes, one entry per
    outer position (arrays of the outer shape; n = 0 rows have mean 0, m2 0). ``kernel``: the
    chunk kernel to use where it applies (:func:`kernel_for`, chosen by the caller in its
    ``klest.options`` context), None for the record's value function."""
    outer = job.outer
    rows = math.prod(outer)
    if rec.batch:
        n, mean, m2, moved = _kopt_rows(job, _tasks(job), bool(rec.cross_fit), threads)
        return n.reshape(outer), mean.reshape(outer), m2.reshape(outer), moved
    # larger pieces for a chunk kernel when it takes every row: compiled kernels always, NumPy
    # ones for a full reduction (their Python cost per piece is held under the GIL)
    piece = CHUNK
    if _kernel_applies(job, kernel) and math.prod(job.inner) >= 1024:
        if kernel not in NUMPY_KERNELS:
            piece = _compiled_piece(job)
        elif rows == 1:
            piece = NUMPY_KERNEL_CHUNK
    columns = _column_source(job, kernel)
    if columns is not None:
        n, mean, m2 = _column_reduce(rec, job, columns, kernel, threads)
        return n.reshape(outer), mean.reshape(outer), m2.reshape(outer), 0
    tasks = _tasks(job, piece)
    results = _run(lambda t: _piece_moments(rec, job, t, kernel), tasks, threads, piece)
    n = np.zeros(rows)
    mean = np.zeros(rows)
    m2 = np.zeros(rows)
    moved = 0
    by_row: dict[int, list[Partial]] = {}
    for t, (tn, tmean, tm2, tmoved) in zip(tasks, results, strict=True):
        moved += int(tmoved)
        if t.whole_rows:
            sl = slice(t.row, t.row + len(tn))
            n[sl], mean[sl], m2[sl] = tn, tmean, tm2
        else:
            by_row.setdefault(t.row, []).append(
                Partial(float(tn[0]), float(tmean[0]), float(tm2[0])) if tn[0] else Partial()
            )
    for row, parts in by_row.items():
        merged = finish(parts)
        n[row], mean[row], m2[row] = merged.n, merged.mean, merged.m2
    return n.reshape(outer), mean.reshape(outer), m2.reshape(outer), moved
