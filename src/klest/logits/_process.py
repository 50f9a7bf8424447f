r"""The distribution a sampler draws from: temperature, min-p, top-k, top-p (math below).

With x = logits / T and m = max x, every filter keeps an *upper set* of the row's values, so the
kept set is S = {v : x_v ≥ τ} for one threshold τ per row, and the processed distribution is

.. math::

    \pi_S(v) = \frac{e^{x_v - m}}{\sum_{u \in S} e^{x_u - m}} \ (v \in S),
    \qquad \pi_S(v) = 0 \ (v \notin S).

- **min-p** keeps v with π(v) ≥ min_p · max π, i.e. x_v − m ≥ log min_p: τ_min = m + log min_p
  (the ratio π(v)/max π does not change under renormalisation, so it does not matter which set
  is normalised).
- **top-k** keeps the values ≥ the k-th largest (all tokens tied with the k-th are kept, as
  ``logits < kth_value`` masks in vLLM's ``apply_top_k_top_p`` / ``apply_top_k_only`` and in
  Hugging Face's ``TopKLogitsWarper``); k ≥ V keeps everything.
- **top-p** on the distribution renormalised over the set B kept so far: a token is kept when
  the mass (within B) of the tokens *strictly* more probable than it is < p. This is the smallest
  set of most probable tokens whose mass reaches p; the token that crosses p is kept, the most
  probable always is. vLLM and Hugging Face compute the same rule from an ascending sort
  (``cumsum <= 1 − p`` is removed, the last entry always kept); among tokens *tied* at the
  boundary their choice follows the sort order, here all tied tokens are kept. p = 1 keeps
  everything.

Order: ``"vllm"`` (vLLM v1's sampler: temperature, then min-p, then top-k and top-p) or ``"hf"``
(Hugging Face ``generate``: temperature, top-k, top-p, then min-p). The two differ only when
min-p and top-p are both active (top-p's renormalising set B then includes or excludes the
min-p-removed tokens).

Thresholds are computed chunk by chunk in float64 sums (each row's top values by ``torch.topk``,
never a sorted copy of the whole tensor kept); under a vocabulary-parallel group each rank's top
values are all-gathered, so the global k-th value and the global top-p boundary are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import KlestError
from ._kl import apply_floor, gather, scaled
from ._rows import Group, Plan

__all__ = ["SamplerOrder", "Sampling", "apply_floor", "check_sampling", "floors"]

SamplerOrder = Literal["vllm", "hf"]
_NEG = -math.inf
FIRST_K = 1024  # top values fetched first for top-p; doubled for rows that need more


@dataclass(frozen=True)
class Sampling:
    top_k: int | None
    top_p: float | None
    min_p: float | None
    order: SamplerOrder


def check_sampling(top_k: Any, top_p: Any, min_p: Any, order: Any) -> Sampling | None:
    """The filters, checked; None when none is active (the plain softmax)."""
    k: int | None = None
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise KlestError(f"must be an int, got {top_k!r}", argument="top_k")
        if top_k < -1:
            raise KlestError(
                f"must be ≥ 1 (0 or -1: no top-k, as in vLLM), got {top_k}", argument="top_k"
            )
        k = top_k if top_k >= 1 else None
    p: float | None = None
    if top_p is not None:
        p = _unit(top_p, "top_p")
        if p == 0.0:
            raise KlestError("must lie in (0, 1], got 0", argument="top_p")
        p = None if p >= 1.0 else p
    mp: float | None = None
    if min_p is not None:
        mp = _unit(min_p, "min_p")
        mp = None if mp == 0.0 else mp
    if order not in ("vllm", "hf"):
        raise KlestError(
            f"must be 'vllm' (min-p before top-k/top-p) or 'hf' (after), got {order!r}",
            argument="sampler_order",
        )
    if k is None and p is None and mp is None:
        return None
    return Sampling(k, p, mp, order)


def _unit(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise KlestError(f"must be a number in [0, 1], got {v!r}", argument=name)
    f = float(v)
    if not 0.0 <= f <= 1.0:
        raise KlestError(f"must lie in [0, 1], got {v!r}", argument=name)
    return f


@torch.no_grad()
def floors(
    segs: list[tuple[int, torch.Tensor]],
    plan: Plan,
    inv_t: float,
    cdt: torch.dtype,
    g: Group,
    s: Sampling,
) -> torch.Tensor:
    """τ per row ([N], computation dtype; −inf keeps everything), rows not in ``plan`` −inf."""
    dev = segs[0][1].device
    out = torch.full((plan.n_rows,), _NEG, dtype=cdt, device=dev)
    for c in plan.chunks:
        x = scaled(plan.block(segs, c), cdt, inv_t)
        out[c[0] : c[1]] = _row_floors(x, g, s)
    return out


def _row_floors(x: torch.Tensor, g: Group, s: Sampling) -> torch.Tensor:
    n = x.shape[0]
    f64 = torch.float64
    m = g.max_(torch.amax(x, dim=-1).to(f64))
    neg = torch.full((n,), _NEG, dtype=f64, device=x.device)
    t_min = neg if s.min_p is None else m + math.log(s.min_p)
    t_k = neg if s.top_k is None or s.top_k >= g.vocab else _kth(x, s.top_k, g)
    if s.order == "vllm":
        base = torch.maximum(t_min, t_k)
        tau = base if s.top_p is None else _top_p(x, m, base, s.top_p, s.top_k, g)
    else:
        tau = t_k if s.top_p is None else _top_p(x, m, t_k, s.top_p, s.top_k, g)
        tau = torch.maximum(tau, t_min)
    return tau.to(x.dtype)


def _top_values(x: torch.Tensor, K: int, g: Group) -> torch.Tensor:
    """The K largest values of each (whole-vocabulary) row, descending, float64 (−inf padded)."""
    f64 = torch.float64
    kl_ = min(K, x.shape[-1])
    vals = torch.topk(x, kl_, dim=-1).values.to(f64)
    if kl_ < K:
        pad = torch.full((x.shape[0], K - kl_), _NEG, dtype=f64, device=x.device)
        vals = torch.cat([vals, pad], -1)
    if g.world > 1:  # every rank's K largest hold the global K largest
        every = gather(g, vals)  # [world, n, K]
        vals = torch.topk(every.permute(1, 0, 2).reshape(x.shape[0], -1), K, dim=-1).values
    return vals


def _kth(x: torch.Tensor, k: int, g: Group) -> torch.Tensor:
    return _top_values(x, k, g)[:, k - 1]


def _top_p(
    x: torch.Tensor,
    m: torch.Tensor,
    base: torch.Tensor,
    p: float,
    k: int | None,
    g: Group,
) -> torch.Tensor:
    """τ of top-p on the distribution renormalised over {x ≥ base}."""
    f64 = torch.float64
    e = torch.sub(x, m[:, None].to(x.dtype))
    e.masked_fill_(x < base.to(x.dtype)[:, None], _NEG).exp_()
    Z = g.sum_(e.sum(-1, dtype=f64))  # the mass of {x ≥ base}, relative to e^m
    target = p * Z
    K = min(FIRST_K, g.vocab) if k is None else min(k, g.vocab)
    while True:
        vals = _top_values(x, K, g)
        w = torch.where(vals >= base[:, None], torch.exp(vals - m[:, None]), torch.zeros_like(vals))
        before = torch.cumsum(w, -1) - w  # mass strictly before each position, descending
        inside = (before < target[:, None]) & (vals >= base[:, None])
        enough = (before[:, -1] + w[:, -1] >= target) | (vals[:, -1] < base)
        if bool(enough.all()) or K >= g.vocab or k is not None:
            break
        K = min(2 * K, g.vocab)
    # the last kept position (the first is always kept: its "before" is 0 < target)
    last = (inside.sum(-1) - 1).clamp(min=0)
    tau = vals.gather(1, last[:, None])[:, 0]
    return torch.maximum(tau, base)
