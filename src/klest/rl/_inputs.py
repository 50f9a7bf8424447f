"""Input checks and preparation shared by every entry point of :mod:`klest.rl`.

Shape, dtype, device and option checks are always made (they cost nothing). Value checks (NaN,
infinities, mask values) follow ``klest.options(validate=...)`` since they read the data; under
``torch.func`` transforms (vmap, grad) they are skipped, since values cannot be read there.

**Masks.** A masked-out entry is ignored entirely: NaN, ±inf or anything else there is never
checked, never reaches a value and gets gradient 0 (padding often holds garbage). The core
(``klest.estimate(..., mask=)``) follows the same rule. Mask checks live in :mod:`klest._torch`
(shared with :mod:`klest.logits`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .._config import get_options
from .._torch import check_mask, tensor_arg
from ..errors import KlestError

__all__ = ["Bounds", "Prepared", "bounds", "logp_pair", "prepare", "traced"]

Bounds = tuple[float, float]


@dataclass(frozen=True)
class Prepared:
    """Detached inputs in the computation dtype (float32, or float64 if any input is float64)."""

    logp: torch.Tensor
    ref_logp: torch.Tensor
    old_logp: torch.Tensor | None
    mask: torch.Tensor | None  # bool, same shape, or None (every token valid)
    dtype: torch.dtype
    ref_finite: bool = False  # True when validation saw only finite ref_logp values
    traced: bool = False  # inputs are torch.func (vmap/grad) wrappers: no host reads of values


def _float(name: str, x: Any) -> torch.Tensor:
    x = tensor_arg(name, x)
    if not x.is_floating_point():
        raise KlestError(
            "log-probabilities must have a floating dtype (float16, bfloat16, float32, "
            "float64); an integer tensor here is usually token ids passed by mistake",
            argument=name,
            value=x,
        )
    return x


def logp_pair(train_logp: Any, rollout_logp: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's and the sampler's per-token log-probabilities as tensors, checked: a floating
    dtype, shape [batch, seq], the same shape (the checks of ``mismatch`` and
    ``importance_weights``)."""
    tr = tensor_arg("train_logp", train_logp)
    ro = tensor_arg("rollout_logp", rollout_logp)
    for name, x in (("train_logp", tr), ("rollout_logp", ro)):
        if not x.is_floating_point():
            raise KlestError("log-probabilities must have a floating dtype", argument=name, value=x)
        if x.ndim != 2:
            raise KlestError(
                f"must have shape [batch, seq] (2 dimensions), got {tuple(x.shape)}",
                argument=name,
                value=x,
            )
    if tuple(ro.shape) != tuple(tr.shape):
        raise KlestError(
            f"shape {tuple(ro.shape)} differs from train_logp's {tuple(tr.shape)}",
            argument="rollout_logp",
        )
    return tr, ro


def bounds(name: str, value: Any, *, upper_only: bool = False) -> Bounds | None:
    """``c`` -> (-c, c) (or (-inf, c) with ``upper_only``); ``(lo, hi)`` as given; None stays."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise KlestError("must be a number c or a pair (lo, hi)", argument=name)
        lo, hi = float(value[0]), float(value[1])
    else:
        hi = float(value)
        lo = -float("inf") if upper_only else -hi
    if not lo < hi:
        raise KlestError(f"bounds must satisfy lo < hi, got ({lo}, {hi})", argument=name)
    return lo, hi


def traced(*xs: Any) -> bool:
    """Whether any tensor is a ``torch.func`` wrapper (vmap's batched or grad's tracking tensor):
    reading its values on the host (``.item()``, ``bool()``) is then impossible or wrong."""
    f = torch._C._functorch
    return any(
        isinstance(x, torch.Tensor) and (f.is_batchedtensor(x) or f.is_functorch_wrapped_tensor(x))
        for x in xs
    )


def _count(cond: torch.Tensor) -> int:
    return int(cond.sum())


def _all_finite(x: torch.Tensor) -> bool:
    """One reduction: a NaN or ±inf anywhere makes the float64 sum non-finite. (A finite sum can
    only overflow for |values| ~ 1e300; the detailed checks that follow are the authority.)"""
    return math.isfinite(float(x.sum(dtype=torch.float64)))


def _raise_if(name: str, x: Any, cond: torch.Tensor, what: str) -> None:
    n = _count(cond)
    if n:
        raise KlestError(f"{what} at {n} valid token(s)", argument=name, value=x)


def prepare(logp: Any, ref_logp: Any, old_logp: Any = None, mask: Any = None) -> Prepared:
    """Check the per-token inputs and return detached copies in the computation dtype."""
    lp = _float("logp", logp)
    ref = _float("ref_logp", ref_logp)
    old = None if old_logp is None else _float("old_logp", old_logp)
    if lp.ndim == 0:
        raise KlestError("must have at least one dimension (tokens)", argument="logp", value=lp)
    for name, x in (("ref_logp", ref), ("old_logp", old)):
        if x is None:
            continue
        if tuple(x.shape) != tuple(lp.shape):
            raise KlestError(
                f"shape {tuple(x.shape)} differs from logp's {tuple(lp.shape)} (per-token "
                "inputs must have the same shape; nothing is broadcast)",
                argument=name,
                value=x,
            )
        if x.device != lp.device:
            raise KlestError(f"is on {x.device}, logp on {lp.device}", argument=name, value=x)
    m = check_mask(mask, lp.shape, lp.device)
    f64 = any(x is not None and x.dtype == torch.float64 for x in (lp, ref, old))
    dtype = torch.float64 if f64 else torch.float32
    lp_c = lp.detach().to(dtype)
    ref_c = ref.detach().to(dtype)
    old_c = None if old is None else old.detach().to(dtype)
    ref_finite = False
    is_traced = traced(lp, ref, old, m)
    if get_options().validate and not is_traced:  # value checks read the data on the host
        # one pass per tensor when everything is finite (the usual case); details otherwise

        def valid(cond: torch.Tensor) -> torch.Tensor:
            return cond if m is None else cond & m

        if not _all_finite(lp_c):
            _raise_if("logp", lp, valid(torch.isnan(lp_c)), "contains NaN")
            _raise_if(
                "logp",
                lp,
                valid(torch.isinf(lp_c)),
                "contains ±inf (a sampled token cannot have zero or infinite probability "
                "under the policy that is being scored)",
            )
        ref_finite = _all_finite(ref_c)
        if not ref_finite:
            _raise_if("ref_logp", ref, valid(torch.isnan(ref_c)), "contains NaN")
            _raise_if("ref_logp", ref, valid(ref_c == float("inf")), "contains +inf")
        if old_c is not None and not _all_finite(old_c):
            _raise_if("old_logp", old, valid(torch.isnan(old_c)), "contains NaN")
            _raise_if(
                "old_logp",
                old,
                valid(torch.isinf(old_c)),
                "contains ±inf (the sampling policy cannot give its own sample zero probability)",
            )
    return Prepared(lp_c, ref_c, old_c, m, dtype, ref_finite, is_traced)
