r"""Reductions: streaming moments (Welford/Chan) and the one-call :func:`estimate`.

NumPy input (every estimator, every ``axis``, masks) goes through the streaming engine
(:mod:`klest._stream`): cache-sized chunks whose values are computed in float64 whatever the input
dtype, reduced exactly and merged with Chan's formula. Memory does not grow with n beyond the
input, and the result does not depend on the number of threads. Other backends use the array
namespace with float64 accumulation where the backend has float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import array_api_compat
import array_api_compat.numpy as npx
import numpy as np

from . import _stream
from ._backend import Array, _clamp_bounds, as_float, clamp_counted, is_traced, namespace
from ._backend import log_ratio as _prepare
from ._config import claim_fast, get_options, options
from .divergences import FDivergence, divergence_names
from .errors import KlestError
from .estimators import _weights, k_opt
from .table import Estimator, check_values, get_estimator, known_estimator_names

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
        p = _stream.Partial(self.n, self.mean, self.m2).merge(
            _stream.Partial(other.n, other.mean, other.m2)
        )
        return Moments(p.n, p.mean, p.m2)

    @staticmethod
    def combine(ns: np.ndarray, means: np.ndarray, m2s: np.ndarray) -> Moments:
        """Merge many partial moments at once (the vectorised form of :meth:`merge`)."""
        n, mean, m2 = _stream.combine(ns, means, m2s)
        return Moments(n, mean, m2) if n > 0 else Moments()

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
    Carlo standard error of the mean, std/√n. ``n``: the number of samples used (after the masks):
    a Python ``int`` for a full reduction, an integer array of the reduced shape otherwise.
    ``n_clamped``: elements (among the used ones) changed by ``clamp``, 0 without a clamp.
    For a full reduction ``mean``/``std``/``stderr`` are NumPy float64 scalars (0-d arrays of the
    input's library on other backends); otherwise arrays of the reduced shape.
    """

    mean: Array
    std: Array
    stderr: Array
    n: int | Array
    n_clamped: int | Array = 0


# --------------------------------------------------------------------------- estimators
_PerSample = Callable[[Any, Array], Array]
Axis = int | tuple[int, ...] | None


def estimator_names() -> list[str]:
    """Names accepted by ``estimate(..., estimator=...)``: the table's canonical names
    (built-ins, registered estimators, ``fdiv:<divergence>``), plus ``fdiv:alpha:<α>``, and the
    bare divergence names accepted as aliases of their ``fdiv:`` form."""
    aliases = []
    for d in divergence_names():
        try:
            get_estimator(d)
        except KlestError:
            continue  # confusable with an estimator's name: only the fdiv: form is accepted
        aliases.append(d)
    return [*known_estimator_names(), *aliases]


def per_sample(
    estimator: str | FDivergence | Estimator | Callable[..., Array],
) -> tuple[str, _PerSample]:
    """Resolve a per-sample estimator to ``(name, fn)`` with ``fn(xp, L)`` giving its values."""
    rec = get_estimator(estimator)
    return rec.name, rec.values


def _normalise_axis(axis: Any, ndim: int) -> tuple[int, ...] | None:
    """None, or the sorted distinct non-negative axes an int or a tuple of ints names."""
    if axis is None:
        return None
    items = axis if isinstance(axis, tuple) else (axis,)
    if not items or any(
        isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)) for a in items
    ):
        raise KlestError(
            f"axis must be None, an int or a non-empty tuple of ints, got {axis!r}",
            argument="axis",
        )
    out = []
    for a in items:
        if not -ndim <= int(a) < ndim:
            raise KlestError(f"axis {a} is out of range for {ndim}-d samples", argument="axis")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise KlestError(f"axis {axis!r} repeats an axis", argument="axis")
    return tuple(sorted(out))


# ---------------------------------------------------------------------------- estimate
def estimate(
    logq: Array = None,
    logp: Array = None,
    estimator: str | FDivergence | Estimator | Callable[..., Array] = "k3",
    *,
    log_ratio: Array = None,
    axis: Axis = None,
    mask: Array = None,
    clamp: Any = None,
    ddof: int = 1,
) -> Estimate:
    r"""Estimate a divergence from samples of q: mean, per-sample stdev, standard error and n.

    ``estimator`` is a name from the estimator table (``klest.estimator_names()``: k1, k2, k3,
    forward_k1, forward_k3, k_opt, k_opt_crossfit, registered ones, ``"fdiv:<divergence>"`` such
    as ``"fdiv:chi2"`` or ``"fdiv:alpha:0.5"``), a :class:`klest.Estimator`, an
    :class:`FDivergence`, or a callable accepting ``log_ratio=``. ``axis=None`` reduces everything
    and returns scalars; an int or a tuple of ints reduces those axes. ``mask`` (bool or 0/1,
    broadcastable) keeps the samples where it is true; the mask of a ``numpy.ma`` array is
    honoured too, combined with ``mask``. Masked-out entries are neither used nor validated:
    they may hold anything, NaN included (the same rule as :mod:`klest.rl`).
    Values are computed and accumulated in float64 for NumPy input of any floating dtype
    (``np.longdouble`` input is computed in float64: precision beyond float64 is not used).
    With NumPy the samples are streamed: extra memory does not grow with their number.

    >>> import numpy as np, klest
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal(1_000_000)            # q = N(0, 1)
    >>> L = x - 0.5                                    # p = N(1, 1): log p - log q = x - 1/2
    >>> r = klest.estimate(log_ratio=L, estimator="k3")
    >>> round(float(r.mean), 3), round(float(r.std / 0.5), 2)   # true KL 0.5, stdev/KL 1.695
    (0.5, 1.7)
    """
    if isinstance(ddof, bool) or not isinstance(ddof, (int, np.integer)) or ddof < 0:
        raise KlestError(f"ddof must be an integer >= 0, got {ddof!r}", argument="ddof")
    if log_ratio is not None and (logq is not None or logp is not None):
        raise KlestError("pass either (logq, logp) or log_ratio, not both", argument="log_ratio")
    rec = get_estimator(estimator)
    xp, _ = namespace(logq=logq, logp=logp, log_ratio=log_ratio)
    if array_api_compat.is_numpy_namespace(xp):
        return _estimate_numpy(rec, logq, logp, log_ratio, axis, mask, clamp, int(ddof))
    return _estimate_generic(rec, logq, logp, log_ratio, axis, mask, clamp, int(ddof))


def _estimate_generic(
    rec: Estimator,
    logq: Array,
    logp: Array,
    log_ratio: Array,
    axis: Axis,
    mask: Array,
    clamp: Any,
    ddof: int,
) -> Estimate:
    xp, L, _ = _prepare(logq, logp, log_ratio, mask=mask)  # masked-out entries: not checked
    axes = _normalise_axis(axis, L.ndim)
    w = _weights(xp, L, mask)
    L, n_clamped = clamp_counted(xp, L, clamp, keep=w > 0)
    if rec.batch:
        if axes is not None and len(axes) > 1:
            raise KlestError(
                f"{rec.name} over several axes is supported for NumPy arrays only",
                argument="axis",
            )
        one = None if axes is None else axes[0]
        values = k_opt(log_ratio=L, axis=one, mask=mask, cross_fit=rec.cross_fit)
        return _reduce(xp, values, w, axes, ddof, n_clamped)
    values = rec.values(xp, L)  # library, shape and dtype checked
    out = _reduce(xp, values, w, axes, ddof, n_clamped)
    if not is_traced(out.mean) and bool(xp.any(xp.isnan(out.mean))):
        check_values(rec, L, values, keep=w > 0)  # a NaN the record made from a finite L?
    return out


def _reduce(
    xp: Any, values: Array, w: Array, axes: tuple[int, ...] | None, ddof: int, n_clamped: Any
) -> Estimate:
    acc = _accumulation_dtype(xp)
    v = xp.astype(values, acc)
    w = xp.astype(w, acc)
    keep = w > 0
    v = xp.where(keep, v, xp.zeros_like(v))
    n = xp.sum(w, axis=axes, keepdims=True)
    n_safe = xp.where(n > 0, n, xp.ones_like(n))
    mean = xp.sum(v, axis=axes, keepdims=True) / n_safe
    # centre on a finite mean (an infinite one gets an infinite spread below, without inf - inf)
    shift = xp.where(xp.isfinite(mean), mean, xp.zeros_like(mean))
    centred = xp.where(keep & xp.isfinite(v), v - shift, xp.zeros_like(v))
    m2 = xp.sum(centred * centred, axis=axes, keepdims=True)
    nan = xp.full_like(mean, math.nan)
    dof = n - ddof
    var = xp.where(dof > 0, m2 / xp.where(dof > 0, dof, xp.ones_like(dof)), nan)
    # A mean of +inf (log p = -inf somewhere) has an infinite spread, not a NaN one.
    var = xp.where(xp.isinf(mean), xp.full_like(mean, math.inf), var)
    var = xp.where(xp.isnan(mean), nan, var)
    mean = xp.where(n > 0, mean, nan)
    std = xp.sqrt(var)
    stderr = std / xp.sqrt(n_safe)
    shape = tuple(s for i, s in enumerate(v.shape) if axes is not None and i not in axes)
    mean, std, stderr, n = (xp.reshape(a, shape) for a in (mean, std, stderr, n))
    if axes is None and not is_traced(n):
        return Estimate(mean, std, stderr, int(n), _as_int(n_clamped))
    int_dtype = xp.int64 if acc == xp.float64 else xp.int32
    return Estimate(mean, std, stderr, xp.astype(n, int_dtype), _as_int(n_clamped))


def _as_int(count: Any) -> Any:
    return count if is_traced(count) else int(count)


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
def _numpy_source(name: str, a: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """The data of one input (no copy) and its np.ma mask (None without one)."""
    ma_mask: np.ndarray | None = None
    if isinstance(a, np.ma.MaskedArray):
        m = np.ma.getmask(a)
        ma_mask = None if m is np.ma.nomask else np.asarray(m)
        a = a.data
    arr = np.asarray(a)
    if not np.issubdtype(arr.dtype, np.floating):
        as_float(npx, name, arr)  # raises with the library's message
    return arr, ma_mask


def _estimate_numpy(
    rec: Estimator,
    logq: Array,
    logp: Array,
    log_ratio: Array,
    axis: Axis,
    mask: Array,
    clamp: Any,
    ddof: int,
) -> Estimate:
    if log_ratio is not None:
        named = {"log_ratio": log_ratio}
    else:
        if logq is None or logp is None:
            missing = "logq" if logq is None else "logp"
            raise KlestError(
                "both logq and logp are required (or pass log_ratio=)", argument=missing
            )
        named = {"logp": logp, "logq": logq}
    arrays: list[np.ndarray] = []
    ma_masks: list[np.ndarray] = []
    for name, a in named.items():
        arr, m = _numpy_source(name, a)
        arrays.append(arr)
        if m is not None:
            ma_masks.append(m)
    try:
        shape = np.broadcast_shapes(*(a.shape for a in arrays))
    except ValueError:
        raise KlestError(
            f"shape {arrays[0].shape} does not broadcast with logq's shape {arrays[1].shape}",
            argument="logp",
            value=arrays[0],
        ) from None
    sources = [np.broadcast_to(a, shape) for a in arrays]
    masks: list[np.ndarray] = []
    if mask is not None:
        m_arr = mask.data if isinstance(mask, np.ma.MaskedArray) else np.asarray(mask)
        if not (
            m_arr.dtype == np.bool_
            or np.issubdtype(m_arr.dtype, np.integer)
            or np.issubdtype(m_arr.dtype, np.floating)
        ):
            raise KlestError("mask must be boolean or 0/1", argument="mask", value=m_arr)
        try:
            masks.append(np.broadcast_to(m_arr, shape))
        except ValueError:
            raise KlestError(
                f"does not broadcast to the samples' shape {shape}", argument="mask", value=m_arr
            ) from None
    ma = [np.broadcast_to(m, shape) for m in ma_masks]
    axes = _normalise_axis(axis, len(shape))
    n_kept = 0
    if axes is not None:
        ndim = len(shape)
        dest = tuple(range(ndim - len(axes), ndim))
        sources = [np.moveaxis(s, axes, dest) for s in sources]
        masks = [np.moveaxis(m, axes, dest) for m in masks]
        ma = [np.moveaxis(m, axes, dest) for m in ma]
        n_kept = ndim - len(axes)
    opts = get_options()
    job = _stream.ArrayJob(
        tuple(sources),
        tuple(masks),
        tuple(ma),
        n_kept,
        _clamp_bounds(clamp) if clamp is not None else None,
        opts.validate,
        tuple(named),
    )
    with options(fast=claim_fast(math.prod(shape))):  # "auto": compiled once they pay
        n, mean, m2, moved = _stream.reduce_array(rec, job, opts.threads, _stream.kernel_for(rec))
    with np.errstate(invalid="ignore", divide="ignore"):
        dof = n - ddof
        var = np.where(dof > 0, m2 / np.where(dof > 0, dof, 1.0), np.nan)
        var = np.where(np.isinf(mean), np.inf, var)
        var = np.where(np.isnan(mean), np.nan, var)
        mean = np.where(n > 0, mean, np.nan)
        std = np.sqrt(var)
        stderr = std / np.sqrt(np.where(n > 0, n, 1.0))
    if axes is None:
        return Estimate(np.float64(mean), np.float64(std), np.float64(stderr), int(n), moved)
    return Estimate(mean, std, stderr, n.astype(np.int64), moved)
