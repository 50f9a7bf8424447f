r"""Reductions: streaming moments (Welford/Chan) and the one-call :func:`estimate`.

For NumPy input reduced over all axes, :func:`estimate` streams the samples in cache-sized chunks:
each chunk's values are computed in float64 (whatever the input dtype), its mean and centred sum of
squares are taken exactly (two passes over a chunk that is already in cache), and chunks are merged
with Chan's parallel formula. Memory does not grow with n beyond the input, and the result does not
depend on the number of threads (the work is cut into fixed blocks, merged in order).
Other backends, or a reduction over one axis, use the array namespace with float64 accumulation
where the backend has float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

from . import _numerics as nm
from ._backend import Array, as_float, check_log_ratio_values, clamp_counted, namespace
from ._backend import log_ratio as _prepare
from ._config import get_options
from .divergences import FDivergence, get_divergence
from .errors import KlestError

__all__ = ["Estimate", "Moments", "estimate", "estimator_names", "per_sample"]


# ------------------------------------------------------------------------------ moments
@dataclass(frozen=True)
class Moments:
    """Count, mean and centred sum of squares ``m2 = Σ (x - mean)²`` of a stream of numbers."""

    n: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    @classmethod
    def of(cls, values: np.ndarray) -> Moments:
        """Exact two-pass moments of a float array (accumulated in float64)."""
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return cls()
        mean = float(np.mean(v))
        d = v - mean
        return cls(float(v.size), mean, float(np.dot(d, d)))

    def merge(self, other: Moments) -> Moments:
        """Chan et al.'s pairwise update: exact for means and centred sums of squares."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta * delta * (self.n * other.n / n)
        return Moments(n, mean, m2)

    @staticmethod
    def combine(ns: np.ndarray, means: np.ndarray, m2s: np.ndarray) -> Moments:
        """Merge many partial moments at once (the vectorised form of :meth:`merge`)."""
        ns = np.asarray(ns, dtype=np.float64)
        keep = ns > 0
        ns, means, m2s = ns[keep], np.asarray(means)[keep], np.asarray(m2s)[keep]
        if ns.size == 0:
            return Moments()
        n = float(ns.sum())
        mean = float(np.dot(ns, means) / n)
        d = means - mean
        m2 = float(m2s.sum() + np.dot(ns, d * d))
        return Moments(n, mean, m2)

    def var(self, ddof: int = 1) -> float:
        if self.n - ddof <= 0:
            return math.nan
        return self.m2 / (self.n - ddof)

    def std(self, ddof: int = 1) -> float:
        return math.sqrt(self.var(ddof)) if self.n - ddof > 0 else math.nan

    def stderr(self, ddof: int = 1) -> float:
        return self.std(ddof) / math.sqrt(self.n) if self.n > 0 else math.nan


class Estimate(NamedTuple):
    """What :func:`estimate` returns.

    ``mean``: the estimate (average of the per-sample values). ``std``: the per-sample standard
    deviation (ddof as requested, 1 by default), *not* the error of the mean. ``stderr``: the Monte
    Carlo standard error of the mean, std/√n. ``n``: the number of samples used (after the mask).
    ``n_clamped``: elements changed by ``clamp`` (0 when no clamp was asked for).
    """

    mean: Any
    std: Any
    stderr: Any
    n: Any
    n_clamped: Any = 0


# --------------------------------------------------------------------------- estimators
_PerSample = Callable[[Any, Array], Array]

_BUILTIN: dict[str, _PerSample] = {
    "k1": lambda xp, L: -L,
    "k2": lambda xp, L: L * L / 2,
    "k3": nm.expm1mx,
    "forward_k1": nm.xlogx,
    "forward_k3": nm.lexpl_mexpm1,
}


def estimator_names() -> list[str]:
    """Names accepted by ``estimate(..., estimator=...)`` (plus ``"alpha:<α>"``)."""
    from .divergences import divergence_names

    return sorted([*_BUILTIN, "k_opt", "k_opt_crossfit", *divergence_names()])


def per_sample(estimator: str | FDivergence | Callable[..., Array]) -> tuple[str, _PerSample]:
    """Resolve an estimator to ``(name, fn)`` with ``fn(xp, L)`` giving per-sample values."""
    from . import estimators as est

    if callable(estimator) and not isinstance(estimator, FDivergence):
        by_function = {
            est.k1: "k1",
            est.k2: "k2",
            est.k3: "k3",
            est.forward_k1: "forward_k1",
            est.forward_k3: "forward_k3",
        }
        if estimator is est.k_opt:
            raise KlestError(
                "pass estimator='k_opt' (or 'k_opt_crossfit'): λ is fitted over the whole "
                "reduction, which a per-sample callable cannot do",
                argument="estimator",
            )
        if estimator in by_function:
            name = by_function[estimator]
            return name, _BUILTIN[name]
        user = estimator
        return getattr(user, "__name__", "custom"), lambda xp, L: user(log_ratio=L)
    if isinstance(estimator, str) and estimator in _BUILTIN:
        return estimator, _BUILTIN[estimator]
    if isinstance(estimator, (str, FDivergence)):
        try:
            div = get_divergence(estimator)
        except KlestError:
            raise KlestError(
                f"unknown estimator {estimator!r}; known: {', '.join(estimator_names())}",
                argument="estimator",
            ) from None
        return div.name, div.corrected
    raise KlestError(
        "expected an estimator name, an FDivergence or a callable",
        argument="estimator",
        value=estimator,
    )


# ---------------------------------------------------------------------------- estimate
def estimate(
    logq: Array = None,
    logp: Array = None,
    estimator: str | FDivergence | Callable[..., Array] = "k3",
    *,
    log_ratio: Array = None,
    axis: int | None = None,
    mask: Array = None,
    clamp: Any = None,
    ddof: int = 1,
) -> Estimate:
    r"""Estimate a divergence from samples of q: mean, per-sample stdev, standard error and n.

    ``estimator`` is a name (``klest.estimator_names()``: k1, k2, k3, forward_k1, forward_k3,
    k_opt, k_opt_crossfit, every registered f-divergence, ``"alpha:<α>"``), an
    :class:`FDivergence`, or a callable accepting ``log_ratio=``. ``axis=None`` reduces everything
    and returns scalars; an int reduces that axis. ``mask`` (bool or 0/1, broadcastable) keeps the
    samples where it is true. float32 and lower inputs are accumulated in float64.

    >>> import numpy as np, klest
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal(1_000_000)            # q = N(0, 1)
    >>> L = x - 0.5                                    # p = N(1, 1): log p - log q = x - 1/2
    >>> r = klest.estimate(log_ratio=L, estimator="k3")
    >>> round(float(r.mean), 3), round(float(r.std / 0.5), 2)   # true KL 0.5, stdev/KL 1.695
    (0.5, 1.7)
    """
    if ddof < 0:
        raise KlestError(f"ddof must be >= 0, got {ddof}", argument="ddof")
    if log_ratio is not None and (logq is not None or logp is not None):
        raise KlestError("pass either (logq, logp) or log_ratio, not both", argument="log_ratio")
    name = estimator if isinstance(estimator, str) else None
    label, fn = per_sample(estimator) if name not in _FITTED else (name, None)
    xp, arrays = namespace(logq=logq, logp=logp, log_ratio=log_ratio)
    if (
        axis is None
        and fn is not None
        and array_api_compat.is_numpy_namespace(xp)
        and (log_ratio is not None or (logq is not None and logp is not None))
    ):
        return _estimate_numpy(arrays, label, fn, mask, clamp, ddof)
    from .estimators import _axes, _weights, k_opt

    xp, L, _ = _prepare(logq, logp, log_ratio)
    axes = _axes(axis, L.ndim)
    w = _weights(xp, L, mask)
    L, n_clamped = clamp_counted(xp, L, clamp, keep=w > 0)
    if fn is None:  # the optimal control variate: λ fitted along the reduced axis
        values = k_opt(log_ratio=L, axis=axis, mask=mask, cross_fit=label == "k_opt_crossfit")
    else:
        values = fn(xp, L)
    return _reduce(xp, values, w, axes, ddof, n_clamped)


_FITTED = ("k_opt", "k_opt_crossfit")


def _reduce(
    xp: Any, values: Array, w: Array, axes: tuple[int, ...] | None, ddof: int, n_clamped: Any
) -> Estimate:
    acc = _accumulation_dtype(xp)
    v = xp.astype(values, acc)
    w = xp.astype(w, acc)
    keep = w > 0
    v = xp.where(keep, v, xp.zeros_like(v))
    n = xp.sum(w, axis=axes)
    n_safe = xp.where(n > 0, n, xp.ones_like(n))
    mean = xp.sum(v, axis=axes) / n_safe
    # centre on a finite mean (an infinite one gets an infinite spread below, without inf - inf)
    finite_mean = xp.where(xp.isfinite(mean), mean, xp.zeros_like(mean))
    shift = finite_mean if axes is None else xp.expand_dims(finite_mean, axis=axes[0])
    centred = xp.where(keep & xp.isfinite(v), v - shift, xp.zeros_like(v))
    m2 = xp.sum(centred * centred, axis=axes)
    nan = xp.full_like(mean, math.nan)
    dof = n - ddof
    var = xp.where(dof > 0, m2 / xp.where(dof > 0, dof, xp.ones_like(dof)), nan)
    # A mean of +inf (log p = -inf somewhere) has an infinite spread, not a NaN one.
    var = xp.where(xp.isinf(mean), xp.full_like(mean, math.inf), var)
    var = xp.where(xp.isnan(mean), nan, var)
    mean = xp.where(n > 0, mean, nan)
    std = xp.sqrt(var)
    stderr = std / xp.sqrt(n_safe)
    return Estimate(mean, std, stderr, n, n_clamped)


def _accumulation_dtype(xp: Any) -> Any:
    probe = xp.asarray(0.0, dtype=xp.float64) if _has_float64(xp) else None
    return xp.float64 if probe is not None and probe.dtype == xp.float64 else xp.float32


def _has_float64(xp: Any) -> bool:
    name = getattr(xp, "__name__", "")
    if name.startswith("jax"):
        import jax  # already imported: the caller passed jax arrays

        return bool(jax.config.read("jax_enable_x64"))
    return True


# ------------------------------------------------------------------ numpy streaming path
CHUNK = 1 << 16  # elements per chunk: float64 work buffers of 512 KiB stay in cache
BLOCK = 1 << 21  # elements per unit of parallel work (fixed, so results ignore thread count)
_pool: ThreadPoolExecutor | None = None
_ROW = 8192  # BLAS dot below OpenBLAS's threading threshold: no helper threads left spinning


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


def _executor(threads: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool._max_workers != threads:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="klest")
    return _pool


def _estimate_numpy(
    arrays: dict[str, np.ndarray], label: str, fn: _PerSample, mask: Array, clamp: Any, ddof: int
) -> Estimate:
    import array_api_compat.numpy as npx

    from ._backend import _clamp_bounds

    lr = arrays.get("log_ratio")
    if lr is not None:
        srcs = [as_float(npx, "log_ratio", np.asarray(lr))]
    else:
        lq = as_float(npx, "logq", np.asarray(arrays["logq"]))
        lp = as_float(npx, "logp", np.asarray(arrays["logp"]))
        try:
            shape = np.broadcast_shapes(lq.shape, lp.shape)
        except ValueError:
            raise KlestError(
                f"shape {lp.shape} does not broadcast with logq's shape {lq.shape}",
                argument="logp",
                value=lp,
            ) from None
        srcs = [np.broadcast_to(lp, shape), np.broadcast_to(lq, shape)]
    shape = srcs[0].shape
    flat = [np.ascontiguousarray(s).reshape(-1) for s in srcs]
    m = None
    if mask is not None:
        m_arr = np.asarray(mask)
        if m_arr.dtype != np.bool_:
            if not (
                np.issubdtype(m_arr.dtype, np.integer) or np.issubdtype(m_arr.dtype, np.floating)
            ):
                raise KlestError("mask must be boolean or 0/1", argument="mask", value=m_arr)
            if get_options().validate and np.any((m_arr != 0) & (m_arr != 1)):
                raise KlestError(
                    "must hold only 0 and 1 (or be boolean)", argument="mask", value=m_arr
                )
            m_arr = m_arr != 0
        try:
            m = np.ascontiguousarray(np.broadcast_to(m_arr, shape)).reshape(-1)
        except ValueError:
            raise KlestError(
                f"does not broadcast to the samples' shape {shape}", argument="mask", value=m_arr
            ) from None
    bounds = _clamp_bounds(clamp) if clamp is not None else None
    fast = (
        label
        if (label in ("k1", "k2", "k3") and all(f.dtype == np.float32 for f in flat))
        else None
    )

    size = flat[0].size
    starts = range(0, size, BLOCK)
    opts = get_options()

    # k1/k2/k3 turn any bad input into a non-finite value (caught after the merge); other
    # estimators, a clamp or a mask could hide one, so those chunks are summed raw first.
    check = opts.validate and (fast is None or bounds is not None or m is not None)

    def work(start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, bool]:
        # +inf values (log p = -inf) are legitimate; they are sorted out after the merge
        with np.errstate(over="ignore", invalid="ignore"):
            stop = min(start + BLOCK, size)
            return _stream_block(flat, m, start, stop, fast, fn, npx, bounds, check)

    if opts.threads > 1 and len(starts) > 1:  # numpy releases the GIL inside each ufunc
        parts = list(_executor(opts.threads).map(work, starts))
    else:
        parts = [work(s) for s in starts]
    if parts:
        ns = np.concatenate([p[0] for p in parts])
        means = np.concatenate([p[1] for p in parts])
        m2s = np.concatenate([p[2] for p in parts])
        n_clamped = sum(p[3] for p in parts)
    else:
        ns = means = m2s = np.zeros(0)
        n_clamped = 0
    with np.errstate(invalid="ignore"):
        mom = Moments.combine(ns, means, m2s)
    suspect = any(p[4] for p in parts)
    if opts.validate and (suspect or not (math.isfinite(mom.mean) and math.isfinite(mom.m2))):
        # Lazy validation: finite inputs give finite values (and the chunks whose estimator could
        # hide an infinity were flagged), so the inputs are inspected only now.
        if lr is not None:
            check_log_ratio_values(npx, None, None, flat[0])
        else:
            check_log_ratio_values(npx, flat[1], flat[0], None)
    if not math.isfinite(mom.mean):
        live = means[np.asarray(ns) > 0]
        if np.any(np.isnan(live)) or (np.any(live == np.inf) and np.any(live == -np.inf)):
            mom = Moments(mom.n, math.nan, math.nan)
        else:  # infinite values of one sign only (log p = -inf on some sample)
            mom = Moments(mom.n, float(live[~np.isfinite(live)][0]), math.inf)
    elif not math.isfinite(mom.m2):  # finite mean, overflowing spread
        mom = Moments(mom.n, mom.mean, math.inf)
    if math.isnan(mom.mean):
        std = math.nan
    else:
        std = mom.std(ddof) if math.isfinite(mom.m2) else math.inf
    stderr = std / math.sqrt(mom.n) if mom.n > 0 else math.nan
    mean = mom.mean if mom.n > 0 else math.nan
    return Estimate(np.float64(mean), np.float64(std), np.float64(stderr), int(mom.n), n_clamped)


def _stream_block(
    flat: list[np.ndarray],
    mask: np.ndarray | None,
    start: int,
    stop: int,
    fast: str | None,
    fn: _PerSample,
    npx: Any,
    bounds: tuple[float, float] | None,
    check: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, bool]:
    size = min(CHUNK, stop - start)
    L_buf = np.empty(size)
    v_buf = np.empty(size)
    count = -(-(stop - start) // CHUNK)
    ns = np.zeros(count)
    means = np.zeros(count)
    m2s = np.zeros(count)
    n_clamped = 0
    suspect = False
    for i, a in enumerate(range(start, stop, CHUNK)):
        b = min(a + CHUNK, stop)
        k = b - a
        L = L_buf[:k]
        if len(flat) == 1:
            np.copyto(L, flat[0][a:b])
        else:
            np.subtract(flat[0][a:b], flat[1][a:b], out=L, dtype=np.float64)
        if check and not math.isfinite(float(np.einsum("i->", L))):
            suspect = True  # an infinity or NaN the estimator, clamp or mask might hide
        if bounds is not None:
            lo, hi = bounds
            moved = (L < lo) | (L > hi)
            if mask is not None:
                moved &= mask[a:b]
            n_clamped += int(np.count_nonzero(moved))
            np.clip(L, lo, hi, out=L)
        v = v_buf[:k]
        if fast == "k3":
            # float32 samples, float64 arithmetic: expm1(L) - L has an absolute error of about
            # 2^-52·|L|, below half a float32 ulp of k3 for every |L| > 1e-8.
            np.expm1(L, out=v)
            np.subtract(v, L, out=v)
        elif fast == "k2":
            np.multiply(L, L, out=v)
            v *= 0.5
        elif fast == "k1":
            np.negative(L, out=v)
        else:
            v = np.asarray(fn(npx, L), dtype=np.float64)
        if mask is not None:
            v = v[mask[a:b]]
            k = v.size
            if k == 0:
                continue
        mean = float(np.einsum("i->", v)) / k
        np.subtract(v, mean, out=v)  # v is a work buffer or a fresh array: safe to overwrite
        m2 = _sum_of_squares(v)
        ns[i], means[i], m2s[i] = k, mean, m2
    return ns, means, m2s, n_clamped, suspect
