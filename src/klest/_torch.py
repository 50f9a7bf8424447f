r"""What :mod:`klest.logits` and :mod:`klest.rl` share: torch argument checks, masks, masked
reductions (``aggregate``) and token counts over the data-parallel group.

Both packages build on this module and nothing here imports either of them (``rl`` builds on
``logits``, never the reverse). Importing it imports torch; ``import klest`` does not import it.

**Masks** (:func:`check_mask`): bool, or a numeric tensor holding only 0 and 1, of exactly the
per-token shape (nothing is broadcast: a mis-shaped mask is almost always a bug). A masked-out
entry is ignored entirely: whatever it holds is never read into a value and gets gradient 0.

**Aggregation** (:func:`aggregate`). Every mode is a weighted sum
:math:`\sum_{b,t} a_{bt}\,m_{bt}\,x_{bt}` whose weights are constant along each row b:

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

**Data parallelism** (:func:`world_size`, :func:`global_sum`). When ``torch.distributed`` is
initialised with more than one process (or ``distributed=True``), the counts (N, sequences) are
summed over the process group and the local result is multiplied by the world size W. DDP and
FSDP *average* gradients over ranks, so after their averaging the gradients equal those of the
whole global batch in one process; the average over ranks of the returned values is the global
result. This is what ``token-mean`` needs to divide by the global token count.
"""

from __future__ import annotations

import operator
from typing import Any, Literal

import torch
import torch.distributed as dist

from ._config import get_options
from .errors import KlestError

__all__ = [
    "AGGREGATIONS",
    "TRL_LOSS_TYPES",
    "Aggregation",
    "aggregate",
    "aggregation_scale",
    "check_mask",
    "global_sum",
    "tensor_arg",
    "world_size",
]

Aggregation = Literal[
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "sum",
    "token-sum",
    "trl:grpo",
    "trl:bnpo",
    "trl:dr_grpo",
    "trl:dapo",
]

AGGREGATIONS: tuple[Aggregation, ...] = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "sum",
    "token-sum",
)

# TRL GRPOTrainer's ``loss_type`` normalisers (TRL 1.16.0, ``GRPOTrainer._compute_loss``), per
# process, before TRL's division by the gradient-accumulation steps:
TRL_LOSS_TYPES: dict[Aggregation, str] = {
    "trl:grpo": "mean over all B rows of each row's masked mean (an empty row counts, as 0)",
    "trl:bnpo": "Σ m x / max(Σ m, 1) over this process's tokens (not all-reduced)",
    "trl:dr_grpo": "Σ m x / (B · horizon), horizon = max_completion_length (default: seq length)",
    "trl:dapo": "Σ m x · W / N_global: token-mean over the global batch (= 'token-mean')",
}


# ------------------------------------------------------------------------------------- arguments


def tensor_arg(name: str, x: Any) -> torch.Tensor:
    """``x`` itself if it is a torch tensor; otherwise a :class:`KlestError` naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise KlestError(
            "must be a torch tensor (klest.rl and klest.logits work on torch tensors; the core "
            "functions take any array)",
            argument=name,
            value=x,
        )
    return x


def check_mask(mask: Any, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    """The mask as a bool tensor of exactly ``shape`` (``None`` stays ``None``).

    A numeric mask must hold only 0 and 1 (checked when ``klest.options(validate=True)``, since
    it reads the data); ``mask != 0`` is returned.
    """
    if mask is None:
        return None
    mask = tensor_arg("mask", mask)
    if tuple(mask.shape) != tuple(shape):
        raise KlestError(
            f"must have exactly the per-token shape {tuple(shape)} (no broadcasting: a "
            "mis-shaped mask is almost always a bug)",
            argument="mask",
            value=mask,
        )
    if mask.device != device:
        raise KlestError(f"is on {mask.device}, the log-probs on {device}", argument="mask")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise KlestError("must be boolean or 0/1", argument="mask", value=mask)
    if get_options().validate:
        bad = int(((mask != 0) & (mask != 1)).sum())
        if bad:
            raise KlestError(
                f"must be boolean or 0/1 ({bad} elements are neither)", argument="mask", value=mask
            )
    return mask != 0


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


# ------------------------------------------------------------------------ data-parallel counts


def world_size(distributed: bool | None, group: Any = None) -> int:
    """Number of data-parallel processes whose counts are pooled: 1 when ``distributed=False``
    or ``torch.distributed`` is not initialised (``distributed=True`` then raises)."""
    if distributed is False:
        return 1
    ready = dist.is_available() and dist.is_initialized()
    if distributed is True and not ready:
        raise KlestError(
            "distributed=True but torch.distributed is not initialised", argument="distributed"
        )
    if not ready:
        return 1
    return int(dist.get_world_size(group))


def global_sum(counts: torch.Tensor, world: int, group: Any = None) -> torch.Tensor:
    """``counts`` summed over the ``world`` processes of ``group`` (a detached copy is reduced;
    ``counts`` itself when ``world == 1``)."""
    if world == 1:
        return counts
    out = counts.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


# ----------------------------------------------------------------------------------- aggregation


def aggregation_scale(
    shape: tuple[int, ...],
    mask: torch.Tensor | None,
    mode: Aggregation,
    *,
    horizon: int | None = None,
    distributed: bool | None = None,
    group: Any = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> torch.Tensor:
    r"""The per-row weight s_b of ``mode``: 0-d, or [B, 1] for ``seq-mean-token-mean`` and
    ``trl:grpo``.

    The aggregate is :math:`\sum_b s_b \sum_t m_{bt} x_{bt}`. ``mask`` is bool or None.
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
    world = world_size(distributed, group)
    w = float(world)
    if mode in ("sum", "token-sum"):
        return torch.tensor(w, dtype=dtype, device=device)
    if mode in ("token-mean", "trl:dapo"):
        if mask is None:
            n = torch.tensor(float(torch.Size(shape).numel()), dtype=f64, device=device)
        else:
            n = torch.count_nonzero(mask).to(f64)
        n = global_sum(n, world, group)
        return (w / n.clamp(min=1.0)).to(dtype)
    B, T = shape
    if mask is None:
        per_row = torch.full((B, 1), float(T), dtype=f64, device=device)
    else:
        per_row = mask.sum(dim=1, keepdim=True, dtype=f64)
    seqs = global_sum((per_row > 0).sum(dtype=f64), world, group).clamp(min=1.0)
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
    mode: Aggregation = "token-mean",
    *,
    horizon: int | None = None,
    distributed: bool | None = None,
    group: Any = None,
) -> torch.Tensor:
    r"""Reduce per-token ``values`` [batch, seq] to a scalar with ``mode`` (module table):
    :math:`\sum_b s_b \sum_t m_{bt} x_{bt}` with s_b from :func:`aggregation_scale`.

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
