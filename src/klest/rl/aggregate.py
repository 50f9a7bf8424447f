r"""Masked reductions of per-token values, with verl's names and TRL's loss types, and
reward-to-go.

:func:`aggregate`, :func:`aggregation_scale`, ``AGGREGATIONS`` and ``TRL_LOSS_TYPES`` live in
:mod:`klest._torch` (shared with :mod:`klest.logits`, which reduces with the same modes) and are
the same objects here; their table is in that module's documentation and in docs/rl.md. In short:
every mode is :math:`\sum_b s_b \sum_t m_{bt} x_{bt}` with a per-row weight s_b —
``token-mean`` (1/N, N valid tokens of the global batch), ``seq-mean-token-mean``,
``seq-mean-token-sum``, ``seq-mean-token-sum-norm`` (1/(S·horizon)), ``sum``/``token-sum``, and
TRL 1.16.0's ``"trl:grpo"``, ``"trl:bnpo"``, ``"trl:dr_grpo"``, ``"trl:dapo"`` normalisers. Under
``torch.distributed`` the counts are summed over the data-parallel group and the local result is
multiplied by the world size, so that DDP's/FSDP's gradient averaging yields the global batch's
gradient.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from .._torch import (
    AGGREGATIONS,
    TRL_LOSS_TYPES,
    Aggregation,
    aggregate,
    aggregation_scale,
    check_mask,
)
from ..errors import KlestError

__all__ = [
    "AGGREGATIONS",
    "TRL_LOSS_TYPES",
    "Aggregation",
    "aggregate",
    "aggregation_scale",
    "reward_to_go",
]


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
