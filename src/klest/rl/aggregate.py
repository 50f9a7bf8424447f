r"""Masked reductions of per-token values, with verl's names, and reward-to-go.

Every mode is a weighted sum :math:`\sum_{b,t} a_{bt}\,x_{bt}` whose weights vanish on masked
tokens and are constant along each sequence (row):

============================  ==================================================================
mode                          value
============================  ==================================================================
``"token-mean"``              :math:`\sum m x / N`, N = number of valid tokens in the whole batch
``"seq-mean-token-mean"``     mean over sequences of each sequence's masked mean
``"seq-mean-token-sum"``      mean over sequences of each sequence's masked sum
``"seq-mean-token-sum-norm"`` :math:`\sum m x / (B \cdot H)`, B rows (all of them), H =
                              ``horizon`` (default the sequence length): a data-independent
                              normaliser (Dr. GRPO)
``"sum"``                     :math:`\sum m x`
============================  ==================================================================

"Sequences" in ``seq-mean-token-mean`` and ``seq-mean-token-sum`` are rows with at least one valid
token (a fully padded row does not dilute the mean). An all-masked batch gives exactly 0, with zero
(not NaN) gradients.

**Data parallelism.** When ``torch.distributed`` is initialised with more than one process (or
``distributed=True``), the counts (N, sequences, rows) are summed over the process group and the
local result is multiplied by the world size W. DDP and FSDP *average* gradients over ranks, so
after their averaging the gradients equal those of the whole global batch in one process; the
average over ranks of the returned values is the global result. This is what ``token-mean`` needs
to divide by the global token count.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import KlestError
from ._inputs import check_mask

__all__ = ["AGGREGATIONS", "aggregate", "aggregation_scale", "reward_to_go"]

AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "sum",
)


def _world(distributed: bool | None, group: Any) -> int:
    """World size to use (1 when not distributed)."""
    if distributed is False:
        return 1
    import torch.distributed as dist

    ready = dist.is_available() and dist.is_initialized()
    if distributed is True and not ready:
        raise KlestError(
            "distributed=True but torch.distributed is not initialised", argument="distributed"
        )
    if not ready:
        return 1
    return int(dist.get_world_size(group))


def _global_sum(counts: torch.Tensor, world: int, group: Any) -> torch.Tensor:
    if world == 1:
        return counts
    import torch.distributed as dist

    out = counts.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def aggregation_scale(
    shape: tuple[int, ...],
    mask: torch.Tensor | None,
    mode: str,
    *,
    horizon: int | None = None,
    distributed: bool | None = None,
    group: Any = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The per-row weight s_b of ``mode``: 0-d, or [B, 1] for ``seq-mean-token-mean``.

    The aggregate is :math:`\\sum_b s_b \\sum_t m_{bt} x_{bt}`. ``mask`` is bool or None.
    """
    if mode not in AGGREGATIONS:
        raise KlestError(
            f"unknown aggregation {mode!r}; known: {', '.join(AGGREGATIONS)}",
            argument="aggregation",
        )
    if mode.startswith("seq-") and len(shape) != 2:
        raise KlestError(
            f"{mode!r} needs per-token tensors of shape [batch, seq], got {tuple(shape)}",
            argument="aggregation",
        )
    world = _world(distributed, group)
    w = float(world)
    if mode == "sum":
        return torch.tensor(w, dtype=dtype, device=device)
    f64 = torch.float64
    if mode == "token-mean":
        if mask is None:
            n = torch.tensor(float(torch.Size(shape).numel()), dtype=f64, device=device)
        else:
            n = torch.count_nonzero(mask).to(f64)
        n = _global_sum(n, world, group)
        return (w / n.clamp(min=1.0)).to(dtype)
    B, T = shape
    if mode == "seq-mean-token-sum-norm":
        H = T if horizon is None else int(horizon)
        if H <= 0:
            raise KlestError("must be a positive number of tokens", argument="horizon")
        rows = _global_sum(torch.tensor(float(B), dtype=f64, device=device), world, group)
        return (w / (rows.clamp(min=1.0) * H)).to(dtype)
    if mask is None:
        per_row = torch.full((B, 1), float(T), dtype=f64, device=device)
    else:
        per_row = mask.sum(dim=1, keepdim=True, dtype=f64)
    seqs = _global_sum((per_row > 0).sum(dtype=f64), world, group).clamp(min=1.0)
    if mode == "seq-mean-token-sum":
        return (w / seqs).to(dtype)
    return (w / (seqs * per_row.clamp(min=1.0))).to(dtype)  # seq-mean-token-mean


def aggregate(
    values: torch.Tensor,
    mask: Any = None,
    mode: str = "token-mean",
    *,
    horizon: int | None = None,
    distributed: bool | None = None,
    group: Any = None,
) -> torch.Tensor:
    """Reduce per-token ``values`` [batch, seq] to a scalar with ``mode`` (see the module doc).

    Masked tokens contribute nothing, even if their value is NaN or inf, and receive gradient 0.
    ``distributed=None`` follows ``torch.distributed`` when it is initialised; ``group`` is the
    process group. Returns a 0-d tensor of ``values``' floating dtype (float32 for 16-bit input).

    >>> import torch, klest.rl
    >>> x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    >>> m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    >>> [round(float(klest.rl.aggregate(x, m, k)), 4) for k in klest.rl.AGGREGATIONS]
    [2.5, 3.0, 5.0, 1.6667, 10.0]
    """
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise KlestError("must be a floating torch tensor", argument="values", value=values)
    if values.ndim == 0:
        raise KlestError("must have at least one dimension", argument="values", value=values)
    m = check_mask(mask, values.shape, values.device)
    x = values if values.dtype in (torch.float32, torch.float64) else values.float()
    scale = aggregation_scale(
        tuple(x.shape),
        m,
        mode,
        horizon=horizon,
        distributed=distributed,
        group=group,
        dtype=x.dtype,
        device=x.device,
    )
    if m is not None:
        x = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if scale.ndim == 0:
        return x.sum() * scale
    return (x.sum(dim=1, keepdim=True) * scale).sum()


def reward_to_go(values: torch.Tensor, mask: Any = None, *, gamma: float = 1.0) -> torch.Tensor:
    r"""Per-token returns :math:`G_t = \sum_{s \ge t} \gamma^{s-t} m_s x_s` along the last axis.

    With ``values`` the per-token KL ℓ_t (e.g. ``kl_penalty(..., estimator="k1")``), the
    surrogate :math:`\sum_t \log\pi(y_t|y_{<t})\,\mathrm{sg}(G_t)` has, for γ = 1 and samples of π,
    expected gradient ∇ KL(π‖π_ref) of whole sequences: each token is charged for
    the KL of the tokens after it. Per-token losses keep only the s = t term. Masked positions
    are 0. Differentiable in ``values``.
    """
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise KlestError("must be a floating torch tensor", argument="values", value=values)
    if values.ndim == 0:
        raise KlestError("must have at least one dimension", argument="values", value=values)
    m = check_mask(mask, values.shape, values.device)
    x = values if m is None else torch.where(m, values, torch.zeros_like(values))
    if gamma == 1.0:
        out = torch.flip(torch.cumsum(torch.flip(x, (-1,)), dim=-1), (-1,))
    else:
        if not 0.0 <= gamma <= 1.0:
            raise KlestError(f"must lie in [0, 1], got {gamma}", argument="gamma")
        cols = []
        acc = torch.zeros_like(x[..., -1])
        for t in range(x.shape[-1] - 1, -1, -1):
            acc = x[..., t] + gamma * acc
            cols.append(acc)
        out = torch.stack(cols[::-1], dim=-1)
    return out if m is None else torch.where(m, out, torch.zeros_like(out))
