r"""Second derivatives of :mod:`klest.logits`: backward passes that autograd can differentiate.

The streaming Functions compute their gradients chunk by chunk into preallocated buffers, with
in-place ops and a compiled kernel: fast, memory-lean, and invisible to autograd. When a caller
asks for a differentiable gradient (``torch.autograd.grad(..., create_graph=True)``, as a
Hessian-vector product, TRPO or a natural-gradient step does), ``torch.is_grad_enabled()`` is
True inside ``backward``; the Functions then call :func:`regrad` here, which recomputes the value
from the saved inputs with plain, out-of-place torch ops (the formulas below, the same
quantities as the streaming passes: log-softmax from logits shifted by their row maxima, the
same −inf rules) and returns ``torch.autograd.grad(value, inputs, upstream, create_graph=True)``:
a gradient that is itself a function of the inputs and of the upstream gradient, so the
curvature of the divergence enters the Hessian.

This path holds the whole [N, V] graph (memory like the naive formulas: it is what a second
derivative needs). It is not available under a vocabulary-parallel ``process_group`` (a
:class:`~klest.KlestError` says so rather than returning a first derivative treated as
constant).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import KlestError
from ._mix import jsd_entries
from ._rows import Group, Plan

__all__ = [
    "check_world",
    "inf_rule",
    "kl_rows",
    "pointwise_rows",
    "regrad",
    "take",
    "token_rows",
    "valid_index",
]

_NEG = -math.inf


def check_world(g: Group) -> None:
    if g.world > 1:
        raise KlestError(
            "second derivatives (create_graph=True) are not available with a vocabulary-parallel "
            "process_group; compute them on one rank, or use first derivatives only",
            argument="process_group",
        )


def valid_index(plan: Plan, dev: torch.device) -> torch.Tensor | None:
    """Flat indices of the rows that are computed (None: all of them)."""
    if plan.all_valid:
        return None
    parts = [torch.arange(lo, hi, device=dev) for lo, hi in plan.chunks]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=dev)


def take(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """Rows ``idx`` of ``t`` (all rows when None), differentiably."""
    rows = t.reshape(-1, t.shape[-1]) if t.ndim != 1 else t
    return rows if idx is None else rows[idx]


def regrad(
    values: Callable[[], Sequence[torch.Tensor | None]],
    inputs: Sequence[torch.Tensor],
    needs: Sequence[bool],
    upstream: Sequence[torch.Tensor | None],
) -> list[torch.Tensor | None]:
    """∂/∂inputs of Σ_i ⟨upstream_i, values_i⟩ with ``create_graph=True`` (None where an input
    needs no gradient; zeros where it needs one but the values do not depend on it)."""
    wrt = [x for x, n in zip(inputs, needs, strict=True) if n]
    with torch.enable_grad():
        outs = values()
    pairs = [
        (o, u)
        for o, u in zip(outs, upstream, strict=True)
        if o is not None and u is not None and o.requires_grad
    ]
    grads: Sequence[torch.Tensor | None]
    if pairs and wrt:
        grads = torch.autograd.grad(
            [o for o, _ in pairs],
            wrt,
            [u.reshape(o.shape).to(o.dtype) for o, u in pairs],
            create_graph=True,
            allow_unused=True,
        )
    else:
        grads = [None] * len(wrt)
    it = iter(grads)
    res: list[torch.Tensor | None] = []
    for x, n in zip(inputs, needs, strict=True):
        if not n:
            res.append(None)
            continue
        gx = next(it)
        res.append(torch.zeros_like(x) if gx is None else gx)
    return res


def _zero_where(mask: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, torch.zeros((), dtype=v.dtype, device=v.device), v)


def kl_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KL(softmax x ‖ softmax y) per row, differentiable twice: Σ X (log X − log Y) with
    log-softmax from shifted logits; 0 where X = 0 by a −inf logit. Rows whose KL is +inf are
    not passed here (the caller excludes them)."""
    lx = torch.log_softmax(x, -1)
    ly = torch.log_softmax(y, -1)
    dead = (x == _NEG) | (y == _NEG)
    d = _zero_where(dead, lx - ly)
    return (torch.exp(lx) * d).sum(-1)


def token_rows(
    x: torch.Tensor, tok: torch.Tensor, entropy: bool, rest: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(log p_K [n, k], H or None, log R or None) per row, differentiable twice."""
    lp = torch.log_softmax(x, -1)
    lpk = lp.gather(1, tok)
    H = None
    if entropy:
        dead = x == _NEG
        H = -(torch.exp(lp) * _zero_where(dead, lp)).sum(-1)
    R = None
    if rest:
        inK = torch.zeros(x.shape, dtype=torch.bool, device=x.device).scatter_(1, tok, True)
        R = torch.logsumexp(torch.where(inK, torch.full_like(lp, _NEG), lp), -1)
    return lpk, H, R


def pointwise_rows(x: torch.Tensor, y: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """JSD_β(Q = softmax x, P = softmax y) or TV per row, differentiable twice (the entries of
    :func:`klest.logits._pointwise.jsd_entries`, which divide nothing by β)."""
    lq = torch.log_softmax(x, -1)
    lp = torch.log_softmax(y, -1)
    Q, P = torch.exp(lq), torch.exp(lp)
    if kind == "tv":
        return 0.5 * (Q - P).abs().sum(-1)
    qh, pk = jsd_entries(lp - lq, x == _NEG, y == _NEG, Q, P, beta)
    return (qh + pk).sum(-1)


def inf_rule(grad: torch.Tensor | None, bad: torch.Tensor, up: torch.Tensor) -> Any:
    """Rows whose value is infinite get no gradient: NaN where their upstream gradient is
    nonzero, 0 where it is 0 (the first-derivative rule of :mod:`klest.logits._kl`)."""
    if grad is None or not bool(bad.any()):
        return grad
    fill = torch.where(up != 0, torch.full_like(up, math.nan), torch.zeros_like(up))
    shape = grad.shape
    g2 = grad.reshape(bad.shape[0], -1)
    g2 = torch.where(bad[:, None], fill[:, None].to(g2.dtype).expand_as(g2), g2)
    return g2.reshape(shape)
