r"""The KL to the reference from logits: exact over the whole vocabulary at every position.

Where the per-token estimators (k1, k2, k3 of :func:`klest.rl.kl_penalty`) use the sampled
token only, these use both models' whole next-token distributions (math.md §4, §6):

.. math::

    \mathrm{KL}_t = \sum_v \pi(v|y_{<t}) \log\frac{\pi(v|y_{<t})}{\pi_{ref}(v|y_{<t})}

(zero variance per position; Σ_t KL_t is an unbiased estimate of the sequence KL). Computed by
:func:`klest.logits.full_kl` (streamed, a few floats per row saved, vocab-parallel ready).

As a **loss**, its gradient is the exact ∇KL_t at each sampled prefix (the pathwise part); the
effect of a token on the KL of later positions (the score part) is what
:func:`klest.rl.sequence_kl` adds. As a **penalty**, detach it (:func:`full_kl_penalty`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from .._torch import Aggregation, aggregate
from ..logits import full_kl

__all__ = ["full_kl_loss", "full_kl_penalty", "full_kl_per_token"]


def full_kl_per_token(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    mask: Any = None,
    *,
    direction: Literal["reverse", "forward"] = "reverse",
    temperature: float = 1.0,
    chunk_size: int | None = None,
    process_group: Any = None,
) -> torch.Tensor:
    """Per-position exact KL(π‖π_ref) (or KL(π_ref‖π)) [batch, seq] from logits [batch, seq, V],
    differentiable in ``logits`` (and ``ref_logits`` if it requires grad); 0 where masked.

    >>> import torch, klest.rl
    >>> a = torch.zeros(1, 2, 4)
    >>> b = torch.log(torch.tensor([0.25, 0.25, 0.5, 0.0])).expand(1, 2, 4)
    >>> klest.rl.full_kl_per_token(a, b)  # π uniform, π_ref gives 0 to a token: +inf
    tensor([[inf, inf]])
    >>> klest.rl.full_kl_per_token(b, a)  # log(4) − H(π_ref) = log 4 − 1.5 log 2
    tensor([[0.3466, 0.3466]])
    """
    return full_kl(
        logits,
        ref_logits,
        mask,
        direction,
        temperature,
        chunk_size=chunk_size,
        process_group=process_group,
    )


def full_kl_penalty(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    mask: Any = None,
    *,
    direction: Literal["reverse", "forward"] = "reverse",
    temperature: float = 1.0,
    chunk_size: int | None = None,
    process_group: Any = None,
) -> torch.Tensor:
    """:func:`full_kl_per_token`, computed without autograd: a per-token penalty for the reward
    (subtract β·penalty from the reward, as with :func:`klest.rl.kl_penalty`)."""
    with torch.no_grad():
        return full_kl_per_token(
            logits,
            ref_logits,
            mask,
            direction=direction,
            temperature=temperature,
            chunk_size=chunk_size,
            process_group=process_group,
        )


def full_kl_loss(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    mask: Any = None,
    aggregation: Aggregation = "token-mean",
    *,
    direction: Literal["reverse", "forward"] = "reverse",
    temperature: float = 1.0,
    chunk_size: int | None = None,
    process_group: Any = None,
    horizon: int | None = None,
    distributed: bool | None = None,
    group: Any = None,
) -> torch.Tensor:
    """The scalar KL loss term: :func:`full_kl_per_token` reduced by :func:`klest.rl.aggregate`
    (``aggregation``, ``horizon``, ``distributed`` and ``group`` — the data-parallel group — as
    there). Multiply by the KL coefficient and add to the policy loss.

    >>> import torch, klest.rl
    >>> a = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]]); b = torch.zeros(1, 2, 2)
    >>> loss = klest.rl.full_kl_loss(a.requires_grad_(), b, torch.tensor([[1, 0]]))
    >>> round(float(loss.detach()), 6)  # position 0 only: KL(softmax(0, 1) ‖ uniform)
    0.110944
    """
    per = full_kl_per_token(
        logits,
        ref_logits,
        mask,
        direction=direction,
        temperature=temperature,
        chunk_size=chunk_size,
        process_group=process_group,
    )
    return aggregate(per, mask, aggregation, horizon=horizon, distributed=distributed, group=group)
