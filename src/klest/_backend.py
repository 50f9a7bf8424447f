"""Array-namespace resolution and input checks shared by every public function.

Nothing here imports a backend: the namespace comes from the arrays the caller passed.
"""

from __future__ import annotations

from typing import Any

import array_api_compat as _compat
import numpy as np

from ._config import get_options
from .errors import KlestError

__all__ = [
    "Array",
    "as_float",
    "check_log_ratio_values",
    "is_traced",
    "log_ratio",
    "mask_weights",
    "namespace",
]

Array = Any  # any array-API array (numpy, torch, jax, array_api_strict, ...)


def is_traced(x: Array) -> bool:
    """True for abstract values (a jax tracer under jit/grad) whose contents cannot be inspected."""
    return any(cls.__name__.endswith("Tracer") for cls in type(x).__mro__)


def _library(x: Any) -> str:
    return type(x).__module__.split(".")[0]


def namespace(**named: Any) -> tuple[Any, dict[str, Array]]:
    """Resolve one array namespace for the named arguments (``None`` values are skipped).

    Python scalars and lists become arrays of that namespace; arrays from two different libraries
    raise :class:`KlestError` naming both arguments.
    """
    arrays = {k: v for k, v in named.items() if v is not None and _compat.is_array_api_obj(v)}
    if not arrays:
        xp = _compat.array_namespace(np.empty(0))
    else:
        spaces = {k: _compat.array_namespace(v) for k, v in arrays.items()}
        (first, xp), *rest = spaces.items()
        for other, space in rest:
            if space is not xp:
                raise KlestError(
                    f"arrays from two different libraries: `{first}` is {_library(arrays[first])} "
                    f"and `{other}` is {_library(arrays[other])}; convert one of them first",
                    argument=other,
                    value=arrays[other],
                )
    out: dict[str, Array] = {}
    for k, v in named.items():
        if v is None:
            continue
        if k in arrays:
            out[k] = v
        elif isinstance(v, bool) or (
            isinstance(v, (list, tuple)) and v and all(isinstance(e, bool) for e in v)
        ):
            out[k] = xp.asarray(v)
        elif isinstance(v, (int, float)) and arrays:
            # a Python number takes the dtype of the arrays it meets (like array-API scalars)
            like = next(iter(arrays.values()))
            dtype = like.dtype if xp.isdtype(like.dtype, "real floating") else None
            out[k] = xp.asarray(float(v), dtype=dtype)
        elif isinstance(v, (int, float, list, tuple)) or isinstance(v, np.generic):
            out[k] = xp.asarray(np.asarray(v, dtype=np.float64))
        else:
            raise KlestError("expected an array or a number", argument=k, value=v)
    return xp, out


def as_float(xp: Any, name: str, a: Array) -> Array:
    """Check that ``a`` has a real floating dtype; float16/bfloat16 are promoted to float32.

    Integer, boolean and complex arrays raise: log-densities are real numbers, and silently
    converting an integer array usually hides a bug (token ids passed for log-probs).
    """
    if not xp.isdtype(a.dtype, "real floating"):
        raise KlestError(
            "log-densities must have a real floating dtype (float16, bfloat16, float32 or float64)",
            argument=name,
            value=a,
        )
    if a.dtype not in (xp.float32, xp.float64):
        a = xp.astype(a, xp.float32)
    return a


def _count(xp: Any, cond: Array) -> int:
    return int(xp.count_nonzero(cond))


def _raise_if(
    xp: Any, cond: Array, name: str, value: Array, what: str, keep: Array | None = None
) -> None:
    if keep is not None:
        cond = cond & keep
    n = _count(xp, cond)
    if n:
        total = int(np.prod(value.shape)) if value.shape else 1
        where = f"{n} of {total} elements" if keep is None else f"at {n} kept element(s)"
        raise KlestError(f"{what} ({where})", argument=name, value=value)


def check_log_ratio_values(
    xp: Any,
    logq: Array | None,
    logp: Array | None,
    log_ratio: Array | None,
    keep: Array | None = None,
) -> None:
    """Raise on values no sample can have: NaN anywhere, log q = ±inf, log p = +inf.

    log p = -inf is allowed (the target gives the sample zero probability: KL(q‖p) is +inf).
    ``keep`` (boolean, broadcasting with the inputs): the rule for masks, the same in the core
    and in :mod:`klest.rl` — masked-out entries are ignored entirely, whatever they hold (NaN
    and infinities included: padding often holds garbage); only kept entries are checked.
    """
    for name, a in (("logq", logq), ("logp", logp), ("log_ratio", log_ratio)):
        if a is None or is_traced(a) or (keep is not None and is_traced(keep)):
            continue
        _raise_if(xp, xp.isnan(a), name, a, "contains NaN", keep)
        if name == "logq":
            _raise_if(
                xp,
                xp.isinf(a),
                name,
                a,
                "contains ±inf: a sample drawn from q cannot have zero (or infinite) density "
                "under q",
                keep,
            )
        else:
            pos = a == xp.inf
            _raise_if(
                xp,
                pos,
                name,
                a,
                "contains +inf"
                + (
                    " (log p - log q = +inf means log q = -inf or log p = +inf)"
                    if name == "log_ratio"
                    else ""
                ),
                keep,
            )


def log_ratio(
    logq: Array | None,
    logp: Array | None,
    log_ratio: Array | None,
    *,
    clamp: Any = None,
    mask: Array = None,
) -> tuple[Any, Array, int | Array]:
    """Return ``(xp, L, n_clamped)`` with ``L = logp - logq`` in the computation dtype.

    Either ``logq`` and ``logp`` or ``log_ratio`` must be given. Shapes broadcast. With
    ``clamp=c`` (or ``(lo, hi)``) L is clipped to ``[-c, c]`` and the number of clipped elements
    is returned; without it nothing is clipped and the count is 0. With ``mask`` (bool or 0/1,
    broadcasting to L), masked-out entries are neither checked nor counted: they may hold
    anything, NaN included (see :func:`check_log_ratio_values`).
    """
    if log_ratio is not None:
        if logq is not None or logp is not None:
            raise KlestError(
                "pass either (logq, logp) or log_ratio, not both", argument="log_ratio"
            )
        xp, arrs = namespace(log_ratio=log_ratio)
        L = as_float(xp, "log_ratio", arrs["log_ratio"])
        keep = None if mask is None else mask_weights(xp, L, mask) > 0
        if get_options().validate:
            check_log_ratio_values(xp, None, None, L, keep)
    else:
        if logq is None or logp is None:
            missing = "logq" if logq is None else "logp"
            raise KlestError(
                "both logq and logp are required (or pass log_ratio=)", argument=missing
            )
        xp, arrs = namespace(logq=logq, logp=logp)
        lq = as_float(xp, "logq", arrs["logq"])
        lp = as_float(xp, "logp", arrs["logp"])
        try:
            shape = np.broadcast_shapes(tuple(lq.shape), tuple(lp.shape))
        except ValueError:
            raise KlestError(
                f"shape {tuple(lp.shape)} does not broadcast with logq's shape {tuple(lq.shape)}",
                argument="logp",
                value=lp,
            ) from None
        del shape
        if lq.dtype != lp.dtype:
            dt = xp.float64 if xp.float64 in (lq.dtype, lp.dtype) else xp.float32
            lq, lp = xp.astype(lq, dt), xp.astype(lp, dt)
        with np.errstate(invalid="ignore"):  # inf - inf under a mask: NaN, and ignored
            L = lp - lq
        keep = None if mask is None else mask_weights(xp, L, mask) > 0
        if get_options().validate:
            check_log_ratio_values(xp, lq, lp, None, keep)
    return (xp, *clamp_counted(xp, L, clamp, keep=keep))


def mask_weights(xp: Any, L: Array, mask: Array) -> Array:
    """``mask`` (bool or 0/1, broadcasting to L's shape) as 0/1 weights of L's dtype and shape;
    all ones when ``mask`` is None."""
    if mask is None:
        return xp.ones_like(L)
    _, m = namespace(mask=mask, L=L)
    mask_arr = m["mask"]
    try:
        mask_arr = xp.broadcast_to(mask_arr, L.shape)
    except (ValueError, RuntimeError):
        raise KlestError(
            f"does not broadcast to the samples' shape {tuple(L.shape)}",
            argument="mask",
            value=mask_arr,
        ) from None
    if xp.isdtype(mask_arr.dtype, "bool"):
        return xp.astype(mask_arr, L.dtype)
    if xp.isdtype(mask_arr.dtype, ("integral", "real floating")):
        if get_options().validate and not is_traced(mask_arr):
            if int(xp.count_nonzero((mask_arr != 0) & (mask_arr != 1))):
                raise KlestError(
                    "must hold only 0 and 1 (or be boolean)", argument="mask", value=mask_arr
                )
        return xp.astype(mask_arr != 0, L.dtype)
    raise KlestError("mask must be boolean or 0/1", argument="mask", value=mask_arr)


def clamp_counted(
    xp: Any, L: Array, clamp: Any, keep: Array | None = None
) -> tuple[Array, int | Array]:
    """Clip L to the clamp's bounds; return ``(L, number of elements moved)``.

    ``keep`` (boolean, broadcastable): count only where it is true (masked-out elements are not
    counted). ``clamp=None`` changes nothing and counts 0.
    """
    if clamp is None:
        return L, 0
    lo, hi = _clamp_bounds(clamp)
    moved = (L < lo) | (L > hi)
    if keep is not None:
        moved = moved & keep
    return xp.clip(L, lo, hi), xp.count_nonzero(moved)


def _clamp_bounds(clamp: Any) -> tuple[float, float]:
    if isinstance(clamp, (tuple, list)):
        if len(clamp) != 2:
            raise KlestError(
                "clamp must be a number c (for [-c, c]) or a pair (lo, hi)", argument="clamp"
            )
        lo, hi = float(clamp[0]), float(clamp[1])
    else:
        hi = float(clamp)
        lo = -hi
    if not lo < hi:
        raise KlestError(f"clamp bounds must satisfy lo < hi, got ({lo}, {hi})", argument="clamp")
    return lo, hi
