r"""Masked reductions of per-token values, with verl's names, and reward-to-go.

Every mode is a weighted sum :math:`\sum_{b,t} a_{bt}\,x_{bt}` whose weights vanish on masked
tokens and are constant along each sequence (row):

============================  ==================================================================
mode                          value
============================  ==================================================================
``"token-mean"``              :math:`\sum m x / N`, N = number of valid tokens in the whole batch
``"seq-mean-token-mean"``     mean over sequences of each sequence's masked mean
``"seq-mean-token-sum"``      mean over sequences of each sequence's masked sum
``"seq-mean-token-sum-norm"`` :math:`\sum m x / (S \cdot H)`, S sequences, H = ``horizon``
                              (default the sequence length): a data-independent token normaliser
                              (Dr. GRPO)
``"sum"``, ``"token-sum"``    :math:`\sum m x` (``token-sum`` is verl's name)
============================  ==================================================================

"Sequences" (S) in the ``seq-mean-*`` modes are rows with at least one valid token: a fully
padded row does not dilute the mean (as in verl 0.9.1; klest before 2026-12 divided
``seq-mean-token-sum-norm`` by all rows). An all-masked batch gives exactly 0, with zero (not NaN)
gradients.

**TRL's loss types** (``TRL_LOSS_TYPES``): ``"trl:grpo"``, ``"trl:bnpo"``, ``"trl:dr_grpo"`` and
``"trl:dapo"`` reproduce ``GRPOConfig.loss_type``'s normalisers per process, exactly as TRL
1.16.0 computes them (``trl:grpo`` averages over *all* rows, empty ones included; ``trl:bnpo`` and
``trl:dr_grpo`` use this process's counts only, never all-reduced; ``trl:dapo`` is the global
``token-mean``). TRL then divides the first three by the gradient-accumulation steps; klest does
not.

**Data parallelism.** When ``torch.distributed`` is initialised with more than one process (or
``distributed=True``), the counts (N, sequences, rows) are summed over the process group and the
local result is multiplied by the world size W. DDP and FSDP *average* gradients over ranks, so
after their averaging the gradients equal those of the whole global batch in one process; the
average over ranks of the returned values is the global result. This is what ``token-mean`` needs
to divide by the global token count.
"""

from __future__ import annotations

import numbers
import operator
from typing import Any

import torch

from ..errors import KlestError
from ._inputs import check_mask

__all__ = ["AGGREGATIONS", "TRL_LOSS_TYPES", "aggregate", "aggregation_scale", "reward_to_go"]

AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "sum",
    "token-sum",
)

# TRL GRPOTrainer's ``loss_type`` normalisers (TRL 1.16.0, ``GRPOTrainer._compute_loss``), per
# process, before TRL's division by the gradient-accumulation steps:
TRL_LOSS_TYPES = {
    "trl:grpo": "mean over all B rows of each row's masked mean (an empty row counts, as 0)",
    "trl:bnpo": "Σ m x / max(Σ m, 1) over this process's tokens (not all-reduced)",
    "trl:dr_grpo": "Σ m x / (B · horizon), horizon = max_completion_length (default: seq length)",
    "trl:dapo": "Σ m x · W / N_global: token-mean over the global batch (= 'token-mean')",
}


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


def _horizon(horizon: Any) -> int:
    """``horizon`` as an int >= 1 (a float such as 2.5, or a bool, is refused, not truncated)."""
    try:
        if isinstance(horizon, bool):
            raise TypeError
        h = operator.index(horizon)
    except TypeError:
        raise KlestError(
            f"must be an integer number of tokens, got {type(horizon).__name__} {horizon!r}",
            argument="horizon",
        ) from None
    if h < 1:
        raise KlestError(f"must be a positive number of tokens, got {h}", argument="horizon")
    return h


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
    if mode not in AGGREGATIONS and mode not in TRL_LOSS_TYPES:
        known = ", ".join([*AGGREGATIONS, *TRL_LOSS_TYPES])
        raise KlestError(f"unknown aggregation {mode!r}; known: {known}", argument="aggregation")
    if (mode.startswith(("seq-", "trl:grpo", "trl:dr_grpo"))) and len(shape) != 2:
        raise KlestError(
            f"{mode!r} needs per-token tensors of shape [batch, seq], got {tuple(shape)}",
            argument="aggregation",
        )
    f64 = torch.float64
    if mode in TRL_LOSS_TYPES and mode != "trl:dapo":
        return _trl_scale(shape, mask, mode, horizon, device).to(dtype)
    world = _world(distributed, group)
    w = float(world)
    if mode in ("sum", "token-sum"):
        return torch.tensor(w, dtype=dtype, device=device)
    if mode in ("token-mean", "trl:dapo"):
        if mask is None:
            n = torch.tensor(float(torch.Size(shape).numel()), dtype=f64, device=device)
        else:
            n = torch.count_nonzero(mask).to(f64)
        n = _global_sum(n, world, group)
        return (w / n.clamp(min=1.0)).to(dtype)
    B, T = shape
    if mask is None:
        per_row = torch.full((B, 1), float(T), dtype=f64, device=device)
    else:
        per_row = mask.sum(dim=1, keepdim=True, dtype=f64)
    seqs = _global_sum((per_row > 0).sum(dtype=f64), world, group).clamp(min=1.0)
    if mode == "seq-mean-token-sum-norm":
        H = T if horizon is None else _horizon(horizon)
        return (w / (seqs * H)).to(dtype)
    if mode == "seq-mean-token-sum":
        return (w / seqs).to(dtype)
    return (w / (seqs * per_row.clamp(min=1.0))).to(dtype)  # seq-mean-token-mean


def _trl_scale(
    shape: tuple[int, ...],
    mask: torch.Tensor | None,
    mode: str,
    horizon: Any,
    device: torch.device | None,
) -> torch.Tensor:
    """TRL's per-process normalisers (float64): never all-reduced, every row counts."""
    f64 = torch.float64
    if mode == "trl:bnpo":
        n = float(torch.Size(shape).numel()) if mask is None else torch.count_nonzero(mask)
        return 1.0 / torch.as_tensor(n, dtype=f64, device=device).clamp(min=1.0)
    B, T = shape
    rows = float(max(B, 1))
    if mode == "trl:dr_grpo":
        H = T if horizon is None else _horizon(horizon)
        return torch.tensor(1.0 / (rows * H), dtype=f64, device=device)
    if mask is None:  # trl:grpo
        per_row = torch.full((B, 1), float(T), dtype=f64, device=device)
    else:
        per_row = mask.sum(dim=1, keepdim=True, dtype=f64)
    return 1.0 / (rows * per_row.clamp(min=1.0))


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
    [2.5, 3.0, 5.0, 1.6667, 10.0, 10.0]
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
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise KlestError(
            f"must be a real number in [0, 1], got {type(gamma).__name__} {gamma!r}",
            argument="gamma",
        )
    gamma = float(gamma)
    if not 0.0 <= gamma <= 1.0:  # also refuses NaN
        raise KlestError(f"must lie in [0, 1], got {gamma}", argument="gamma")
    m = check_mask(mask, values.shape, values.device)
    x = values if m is None else torch.where(m, values, torch.zeros_like(values))
    if gamma == 1.0:
        out = torch.flip(torch.cumsum(torch.flip(x, (-1,)), dim=-1), (-1,))
    elif x.shape[-1] == 0:
        out = x.clone()  # no tokens: nothing to discount
    else:
        cols = []
        acc = torch.zeros_like(x[..., -1])
        for t in range(x.shape[-1] - 1, -1, -1):
            acc = x[..., t] + gamma * acc
            cols.append(acc)
        out = torch.stack(cols[::-1], dim=-1)
    return out if m is None else torch.where(m, out, torch.zeros_like(out))
