"""Public functions of :mod:`klest.logits` (thin: check inputs, plan chunks, call a Function)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .._torch import Aggregation, aggregate
from ..errors import KlestError
from ._hidden import KLHiddenFunction, TokenHiddenFunction
from ._kl import InfGuard, KLFunction
from ._pointwise import PointwiseFunction
from ._process import SamplerOrder, check_sampling, floors
from ._rows import (
    Group,
    Plan,
    check_logits,
    check_same,
    check_temperature,
    compute_dtype,
    flat_mask,
    group_of,
    plan,
    real_arg,
    rows_of,
)
from ._tokens import TokenFunction

__all__ = [
    "Direction",
    "full_jsd",
    "full_kl",
    "full_kl_from_hidden",
    "full_tv",
    "token_logprobs",
    "token_logprobs_from_hidden",
    "topk_kl",
]

Direction = Literal["reverse", "forward"]


@dataclass(frozen=True)
class Pair:
    a: torch.Tensor
    b: torch.Tensor
    plan: Plan
    segs: tuple[list[tuple[int, torch.Tensor]], list[tuple[int, torch.Tensor]]]
    mask: torch.Tensor | None
    inv_t: float
    group: Group
    cdt: torch.dtype


def prepare_pair(
    logits: Any,
    ref_logits: Any,
    mask: Any,
    temperature: float,
    chunk_size: int | None,
    process_group: Any,
) -> Pair:
    a = check_logits("logits", logits)
    b = check_logits("ref_logits", ref_logits)
    check_same("ref_logits", b, a)
    inv_t = 1.0 / check_temperature(temperature)
    m = flat_mask(mask, a.shape[:-1], a.device)
    segs = (rows_of(a), rows_of(b))
    V = a.shape[-1]
    n = a.numel() // V
    p = plan(n, V, list(segs), m, chunk_size)
    g = group_of(process_group, V, a.device)
    return Pair(a, b, p, segs, m, inv_t, g, compute_dtype(a, b))


def check_direction(direction: Any) -> bool:
    """True for the forward KL(π_ref‖π), False for the reverse KL(π‖π_ref)."""
    if direction not in ("reverse", "forward"):
        raise KlestError(
            f"must be 'reverse' (KL(π‖π_ref)) or 'forward' (KL(π_ref‖π)), got {direction!r}",
            argument="direction",
        )
    return direction == "forward"


def finish(
    values: torch.Tensor,
    shape: torch.Size,
    mask: Any,
    aggregation: Aggregation | None,
    distributed: bool | None,
    data_group: Any,
) -> torch.Tensor:
    out = values.view(shape)
    if aggregation is None:
        return out
    return aggregate(out, mask, aggregation, distributed=distributed, group=data_group)


def full_kl(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    mask: Any = None,
    direction: Direction = "reverse",
    temperature: float = 1.0,
    *,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    sampler_order: SamplerOrder = "vllm",
    aggregation: Aggregation | None = None,
    chunk_size: int | None = None,
    process_group: Any = None,
    distributed: bool | None = None,
    data_group: Any = None,
) -> torch.Tensor:
    r"""Exact KL between the two softmaxes at every position, streamed over the vocabulary.

    With π = softmax(logits / T) and π_ref = softmax(ref_logits / T) over the last axis:

    .. math::

        \mathrm{reverse} = \mathrm{KL}(\pi\|\pi_{ref}) = \sum_v \pi_v (\log\pi_v - \log\pi_{ref,v}),
        \qquad \mathrm{forward} = \mathrm{KL}(\pi_{ref}\|\pi).

    Zero variance per position; summed along a sampled sequence it is the Rao-Blackwellised
    sequence estimator (math.md §4). One pass over each row saves lse(π), lse(π_ref) and the KL
    (three floats per row); backward recomputes the softmaxes chunk by chunk. Gradients flow to
    ``logits`` and, when it requires grad, to ``ref_logits``.

    Args:
        logits, ref_logits: [..., V] of the same shape, any floating dtype (16-bit is computed in
            float32). The result has shape ``logits.shape[:-1]`` and dtype float32 (float64 if an
            input is float64), or is reduced by ``aggregation``.
        mask: per-position bool or 0/1 of shape ``logits.shape[:-1]``: masked positions are not
            read (they may hold anything), are 0 and get zero gradient.
        direction: ``"reverse"`` KL(π‖π_ref) (the RLHF penalty) or ``"forward"`` KL(π_ref‖π)
            (distillation from a teacher π_ref).
        temperature: T > 0, divides both logit tensors.
        top_k, top_p, min_p, sampler_order: the KL between the two *processed* distributions a
            sampler draws from with these settings, each side filtered by its own values (see
            :func:`token_logprobs`); +inf where π gives mass to a token π_ref's filter removes.
        aggregation: None (per position) or a :func:`klest.rl.aggregate` mode; ``distributed`` and
            ``data_group`` are passed to it (the *data-parallel* group, not ``process_group``).
        chunk_size: rows per chunk (default: about 128k elements per chunk).
        process_group: vocabulary-parallel group: each rank holds an equal [..., V/world] shard,
            in rank order; every rank gets the whole-vocabulary value, and backward gives each rank
            the gradient w.r.t. its shard.

    −inf logits are masked vocabulary entries: finite KL when both sides mask the same entries;
    +inf when the distribution taken the expectation under gives positive probability to a token
    the other masks. Rows with an infinite value have no gradient (NaN where their upstream
    gradient is nonzero, 0 where it is 0); every finite value has a finite gradient.

    >>> import torch
    >>> from klest.logits import full_kl
    >>> a = torch.tensor([[0.0, 1.0, 2.0]]); b = torch.tensor([[2.0, 1.0, 0.0]])
    >>> round(float(full_kl(a, b)[0]), 6)  # Σ π (a − b) = 2 (e² − 1) / (1 + e + e²)
    1.150421
    """
    pr = prepare_pair(logits, ref_logits, mask, temperature, chunk_size, process_group)
    swap = check_direction(direction)
    sp = check_sampling(top_k, top_p, min_p, sampler_order)
    fl = None
    if sp is not None:
        fl = tuple(floors(sg, pr.plan, pr.inv_t, pr.cdt, pr.group, sp) for sg in pr.segs)
    values = KLFunction.apply(
        pr.a, pr.b, pr.plan, pr.segs, swap, pr.inv_t, pr.group, pr.cdt, torch.is_grad_enabled(),
        fl,
    )  # fmt: skip
    return finish(values, pr.a.shape[:-1], mask, aggregation, distributed, data_group)


def check_tokens(
    tokens: Any, shape: torch.Size, vocab: int, mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Integer token ids of the per-position ``shape``, in [0, vocab) wherever mask is True."""
    if not isinstance(tokens, torch.Tensor):
        raise KlestError("must be a torch tensor of token ids", argument="tokens", value=tokens)
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise KlestError(
            "token ids must have an integer dtype (a float tensor here is usually log-probs "
            "passed by mistake)",
            argument="tokens",
            value=tokens,
        )
    if tuple(tokens.shape) != tuple(shape):
        raise KlestError(
            f"must have the per-position shape {tuple(shape)} (logits without the vocabulary axis)",
            argument="tokens",
            value=tokens,
        )
    if tokens.device != device:
        raise KlestError(f"is on {tokens.device}, logits on {device}", argument="tokens")
    t = tokens.reshape(-1).to(torch.int64)
    if mask is not None:
        t = torch.where(
            mask.reshape(-1), t, torch.zeros_like(t)
        )  # padding ids (e.g. -100) are fine
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= vocab:
            raise KlestError(
                f"ids must lie in [0, {vocab}) (the vocabulary), found {lo if lo < 0 else hi}",
                argument="tokens",
                value=tokens,
            )
    return t


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    *,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    sampler_order: SamplerOrder = "vllm",
    mask: Any = None,
    return_entropy: bool = False,
    return_outside: bool = False,
    chunk_size: int | None = None,
    process_group: Any = None,
) -> Any:
    r"""Log-probabilities of ``tokens`` under softmax(logits / T), without an [N, V] float32 copy.

    .. math::

        \log \pi(t) = x_t - \log\sum_v e^{x_v}, \qquad x = \text{logits} / T,
        \qquad H = -\sum_v \pi_v \log \pi_v.

    The same values as ``log_softmax(logits / T).gather(-1, tokens)``; one pass saves the
    log-sum-exp per row (and the entropy), backward recomputes the softmax chunk by chunk.

    Args:
        logits: [..., V] (16-bit logits are read as such and computed in float32).
        tokens: integer ids of shape ``logits.shape[:-1]`` in [0, V) (global ids under
            ``process_group``; masked positions may hold anything, e.g. -100).
        temperature: T > 0.
        top_k, top_p, min_p: the log-probability under the distribution a sampler draws from
            (vLLM, Hugging Face): x = logits / T, then min-p (keep π(v) ≥ min_p · max π), then
            top-k (keep the values ≥ the k-th largest: ties with it are kept), then top-p on the
            distribution renormalised over what is left (keep the smallest set of most probable
            tokens whose mass reaches p; the token that crosses p is kept, and every token tied
            with it), renormalised: log π_S(t) = x_t − log Σ_{v∈S} e^{x_v}. None (or top_k 0
            or −1, top_p 1, min_p 0) turns a filter off. A sampled token outside the kept set
            has log-prob −inf (never renormalised away: it means the sampler and this call
            disagree) and zero gradient; ``return_outside`` returns where that happened.
        sampler_order: ``"vllm"`` (min-p before top-k/top-p, vLLM v1's sampler) or ``"hf"``
            (min-p after top-p, Hugging Face ``generate``); they differ only when min-p and
            top-p are both on.
        mask: per-position bool or 0/1: masked positions are not read, give 0 and zero gradient.
        return_entropy: also return the entropy H per position (with its gradient), computed in
            the same pass (of the processed distribution when a filter is on).
        return_outside: also return a bool tensor of the positions whose token lies outside the
            kept set (their count is the number of disagreements with the sampler).
        chunk_size, process_group: as in :func:`full_kl`.

    Returns:
        log-probs of shape ``logits.shape[:-1]`` (float32, or float64 for float64 logits), or
        the tuple ``(logprobs, entropy, outside)`` restricted to what ``return_entropy`` and
        ``return_outside`` ask for. A token whose logit is −inf has log-prob −inf (its gradient
        is still finite).

    >>> import torch
    >>> from klest.logits import token_logprobs
    >>> lp = token_logprobs(torch.tensor([[0.0, 0.0, 0.0, 0.0]]), torch.tensor([2]))
    >>> round(float(lp[0]), 6)  # log(1/4)
    -1.386294
    """
    a = check_logits("logits", logits)
    inv_t = 1.0 / check_temperature(temperature)
    m = flat_mask(mask, a.shape[:-1], a.device)
    V = a.shape[-1]
    g = group_of(process_group, V, a.device)
    t = check_tokens(tokens, a.shape[:-1], g.vocab, m, a.device)
    segs = rows_of(a)
    p = plan(a.numel() // V, V, [segs], m, chunk_size)
    entropy = bool(return_entropy)
    cdt = compute_dtype(a)
    sp = check_sampling(top_k, top_p, min_p, sampler_order)
    fl = None if sp is None else floors(segs, p, inv_t, cdt, g, sp)
    lp, H, _ = TokenFunction.apply(a, t[:, None], p, segs, inv_t, g, cdt, entropy, False, fl)
    shape = a.shape[:-1]
    out = [lp.view(shape)]
    if return_entropy:
        out.append(H.view(shape))
    if return_outside:
        outside = lp.detach().view(shape) == -math.inf
        if m is not None:
            outside = outside & m.view(shape)
        out.append(outside)
    return out[0] if len(out) == 1 else tuple(out)


def full_jsd(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    beta: float = 0.5,
    mask: Any = None,
    temperature: float = 1.0,
    *,
    aggregation: Aggregation | None = None,
    chunk_size: int | None = None,
    process_group: Any = None,
    distributed: bool | None = None,
    data_group: Any = None,
) -> torch.Tensor:
    r"""Generalised Jensen-Shannon divergence with weight β per position, normalised (math.md §6).

    With π = softmax(logits / T), π_ref = softmax(ref_logits / T), M = β π_ref + (1 − β) π:

    .. math::

        D_\beta = \frac{\beta\,\mathrm{KL}(\pi_{ref}\|M) + (1-\beta)\,\mathrm{KL}(\pi\|M)}
                        {\beta(1-\beta)}

    **β = 0 is the forward KL(π_ref‖π), β = 1 the reverse KL(π‖π_ref)**, reached continuously
    (the division by β(1 − β) is what makes the ends the two KLs instead of 0, as in TRL's
    unnormalised form, whose mixture weights are the same); β = ½ gives 4·JS(π, π_ref). Always
    finite for 0 < β < 1. Gradients to both inputs; arguments as in :func:`full_kl`.

    >>> import torch
    >>> from klest.logits import full_jsd, full_kl
    >>> a = torch.tensor([[0.0, 1.0, 2.0]]); b = torch.tensor([[2.0, 1.0, 0.0]])
    >>> bool(torch.allclose(full_jsd(a, b, 1e-6), full_kl(a, b, direction="forward"), atol=1e-5))
    True
    """
    b_ = real_arg("beta", beta)
    if not 0.0 <= b_ <= 1.0:
        raise KlestError(f"must lie in [0, 1], got {beta!r}", argument="beta")
    if b_ in (0.0, 1.0):
        direction: Direction = "forward" if b_ == 0.0 else "reverse"
        return full_kl(
            logits,
            ref_logits,
            mask,
            direction,
            temperature,
            aggregation=aggregation,
            chunk_size=chunk_size,
            process_group=process_group,
            distributed=distributed,
            data_group=data_group,
        )
    pr = prepare_pair(logits, ref_logits, mask, temperature, chunk_size, process_group)
    values = PointwiseFunction.apply(
        pr.a, pr.b, pr.plan, pr.segs, "jsd", b_, pr.inv_t, pr.group, pr.cdt
    )
    return finish(values, pr.a.shape[:-1], mask, aggregation, distributed, data_group)


def full_tv(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    mask: Any = None,
    temperature: float = 1.0,
    *,
    aggregation: Aggregation | None = None,
    chunk_size: int | None = None,
    process_group: Any = None,
    distributed: bool | None = None,
    data_group: Any = None,
) -> torch.Tensor:
    r"""Total variation ½ Σ_v |π_v − π_ref,v| per position, in [0, 1].

    Not differentiable where π_v = π_ref,v; there the gradient uses sign(0) = 0 (a subgradient).
    Arguments as in :func:`full_kl`.

    >>> import torch
    >>> from klest.logits import full_tv
    >>> a = torch.tensor([[0.5, 0.5, 0.0]]).log()
    >>> b = torch.tensor([[0.0, 0.5, 0.5]]).log()
    >>> round(float(full_tv(a, b)[0]), 6)
    0.5
    """
    pr = prepare_pair(logits, ref_logits, mask, temperature, chunk_size, process_group)
    values = PointwiseFunction.apply(
        pr.a, pr.b, pr.plan, pr.segs, "tv", 0.5, pr.inv_t, pr.group, pr.cdt
    )
    return finish(values, pr.a.shape[:-1], mask, aggregation, distributed, data_group)


# Σ_K e^{r} may exceed 1 by rounding in what a server returns; beyond this it is bad input
TOPK_SUM_TOLERANCE = 1e-4


def _plogp_ratio(l: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """e^l (l − m) elementwise: 0 where l = −inf, +inf where l is finite and m = −inf, with
    finite gradients wherever the value is finite (double where)."""
    zero = l == -math.inf
    bad = (m == -math.inf) & ~zero
    l_s = torch.where(zero, torch.zeros_like(l), l)
    m_s = torch.where(zero | bad, torch.zeros_like(m), m)
    val = torch.exp(l_s) * (l_s - m_s)
    val = torch.where(bad, torch.full_like(val, math.inf), val)
    return torch.where(zero, torch.zeros_like(val), val)


def _log1mexp(c: torch.Tensor) -> torch.Tensor:
    """log(1 − e^c) for c < 0 (−inf for c ≥ 0), accurate on both sides of −log 2, with finite
    gradients wherever the value is finite."""
    neg = c < 0
    cs = torch.where(neg, c, torch.full_like(c, -1.0))
    val = torch.where(cs > -math.log(2.0), torch.log(-torch.expm1(cs)), torch.log1p(-torch.exp(cs)))
    return torch.where(neg, val, torch.full_like(val, -math.inf))


def _coarsen(
    r: torch.Tensor, lp: torch.Tensor, lrest: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The outcomes of the coarsened pair: (r, log π) of the top-k tokens kept as their own
    outcomes (−inf for the others), log R and log R_ref of the rest.

    R_ref = 1 − Σ_j e^{r_j} is computed as log1mexp(logsumexp r). When the returned top-k
    probabilities sum to 1 or more, or so close to 1 that R_ref is below what rounding of the
    r_j can resolve (4·k·eps of their dtype: a peaked float32 teacher), the least probable of
    the top-k tokens are merged into the rest, one by one, until 1 − Σ_{kept} e^{r_j} exceeds
    that (possibly all of them: one outcome, KL 0). That is a coarser partition of the same two
    distributions, so the KL stays a finite lower bound (data-processing inequality) instead of
    +inf, or of a large value made of rounding noise."""
    order = torch.argsort(r.detach(), -1, descending=True)
    rs, ls = r.gather(-1, order), lp.gather(-1, order)
    tails = _log1mexp(torch.logcumsumexp(rs, -1))  # log(1 − Σ_{j≤i} e^{r_(j)})
    keep = tails > math.log(4.0 * r.shape[-1] * eps)  # a prefix of each row (tails decrease)
    n_keep = keep.sum(-1, keepdim=True)
    last = (n_keep - 1).clamp(min=0)
    lrest_ref = torch.where(
        n_keep > 0, tails.gather(-1, last), torch.zeros_like(last, dtype=r.dtype)
    )[..., 0]
    neg = torch.full_like(rs, -math.inf)
    some = (~keep).any(-1)
    parts = torch.cat([lrest[..., None], torch.where(keep, neg, ls)], -1)
    parts = torch.where(some[..., None], parts, torch.zeros_like(parts))  # no all −inf lse
    merged = torch.where(some, torch.logsumexp(parts, -1), lrest)
    return torch.where(keep, rs, neg), torch.where(keep, ls, neg), merged, lrest_ref


def _check_topk(
    logprobs: Any, indices: Any, shape: torch.Size, vocab: int, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    lp = check_logits("ref_topk_logprobs", logprobs)
    if (
        not isinstance(indices, torch.Tensor)
        or indices.is_floating_point()
        or (indices.dtype == torch.bool or indices.is_complex())
    ):
        raise KlestError(
            "must be an integer torch tensor of token ids",
            argument="ref_topk_indices",
            value=indices,
        )
    if tuple(lp.shape[:-1]) != tuple(shape) or tuple(indices.shape) != tuple(lp.shape):
        raise KlestError(
            f"ref_topk_logprobs and ref_topk_indices must both have shape {tuple(shape)} + (k,), "
            f"got {tuple(lp.shape)} and {tuple(indices.shape)}",
            argument="ref_topk_indices",
            value=indices,
        )
    k = lp.shape[-1]
    if k > vocab:
        raise KlestError(f"k = {k} exceeds the vocabulary {vocab}", argument="ref_topk_indices")
    idx = indices.reshape(-1, k).to(torch.int64)
    r = lp.reshape(-1, k)
    valid = None if mask is None else mask.reshape(-1)
    idx_v = idx if valid is None else idx[valid]
    r_v = r.detach() if valid is None else r.detach()[valid]
    if idx_v.numel():
        lo, hi = int(idx_v.min()), int(idx_v.max())
        if lo < 0 or hi >= vocab:
            raise KlestError(
                f"ids must lie in [0, {vocab}), found {lo if lo < 0 else hi}",
                argument="ref_topk_indices",
                value=indices,
            )
        srt = idx_v.sort(-1).values
        rep = int((srt[:, 1:] == srt[:, :-1]).any(-1).sum())
        if rep:
            raise KlestError(
                f"{rep} position(s) list the same token twice", argument="ref_topk_indices"
            )
        if bool(torch.isnan(r_v).any()):
            raise KlestError("contains NaN", argument="ref_topk_logprobs", value=logprobs)
        total = float(torch.logsumexp(r_v.to(torch.float64), -1).max())
        if total > math.log1p(TOPK_SUM_TOLERANCE):
            raise KlestError(
                f"probabilities sum to {math.exp(total):.6g} > 1 at some position (log-probs "
                "expected)",
                argument="ref_topk_logprobs",
                value=logprobs,
            )
    return idx, r


def _no_topk(logprobs: Any, indices: Any, shape: torch.Size) -> bool:
    """True for a well-formed k = 0 (shapes ``shape + (0,)``, integer ids, floating log-probs)."""
    if not (isinstance(logprobs, torch.Tensor) and isinstance(indices, torch.Tensor)):
        return False
    if logprobs.ndim == 0 or logprobs.shape[-1] != 0:
        return False
    want = (*tuple(shape), 0)
    if tuple(logprobs.shape) != want or tuple(indices.shape) != want:
        return False  # _check_topk says what is wrong
    return logprobs.is_floating_point() and not (
        indices.is_floating_point() or indices.dtype == torch.bool or indices.is_complex()
    )


def topk_kl(
    logits: torch.Tensor,
    ref_topk_logprobs: torch.Tensor,
    ref_topk_indices: torch.Tensor,
    mask: Any = None,
    direction: Direction = "reverse",
    temperature: float = 1.0,
    *,
    aggregation: Aggregation | None = None,
    chunk_size: int | None = None,
    process_group: Any = None,
    distributed: bool | None = None,
    data_group: Any = None,
) -> torch.Tensor:
    r"""Exact KL between π and π_ref coarsened to the reference's top-k tokens plus one "rest".

    Inference servers return only the reference's (teacher's) top-k log-probs r_j at ids K.
    Both distributions are coarsened to k + 1 outcomes: the k tokens, and the rest with mass
    R = 1 − Σ_K π (summed exactly over the rest of π's row) and R_ref = 1 − Σ_j e^{r_j}:

    .. math::

        \mathrm{reverse} = \sum_{j} \pi_{K_j} (\log\pi_{K_j} - r_j) + R \log(R / R_{ref}),
        \qquad \mathrm{forward} = \sum_j e^{r_j}(r_j - \log\pi_{K_j})
                                  + R_{ref}\log(R_{ref}/R).

    By the data-processing inequality this is a **lower bound on the full-vocabulary KL** in the
    same direction (coarsening can only lose divergence), equal to it when k = V − 1 (or when
    both distributions agree, up to a factor, on the rest). Gradients flow to ``logits`` (the
    whole row, through log π_K and R) and to ``ref_topk_logprobs`` if it requires grad.
    k = 0 is allowed: one outcome each side, KL exactly 0 with zero gradients.

    Args:
        logits: [..., V] policy (student) logits, divided by ``temperature``.
        ref_topk_logprobs: [..., k] reference log-probs (as returned: no temperature applied
            here); their probabilities may exceed 1 in total by at most 1e-4 (rounding; then
            R_ref = 0).
        ref_topk_indices: [..., k] distinct integer ids in [0, V) (global ids under
            ``process_group``).
        other arguments: as in :func:`full_kl`. Masked positions are not read (ids may be
            anything there).

    +inf when one side gives positive mass to an outcome the other gives 0 (e.g. R > 0 but the
    reference's top-k already sum to 1); such positions have no gradient (NaN, or 0 where
    their upstream gradient is 0).

    >>> import torch
    >>> from klest.logits import topk_kl, full_kl
    >>> a = torch.tensor([[0.0, 1.0, 2.0, 0.5]]); b = torch.tensor([[2.0, 1.0, 0.0, 0.1]])
    >>> r, i = torch.log_softmax(b, -1).topk(3)
    >>> bool(torch.allclose(topk_kl(a, r, i), full_kl(a, b), atol=1e-6))  # k = V − 1
    True
    """
    a = check_logits("logits", logits)
    inv_t = 1.0 / check_temperature(temperature)
    swap = check_direction(direction)
    m = flat_mask(mask, a.shape[:-1], a.device)
    V = a.shape[-1]
    g = group_of(process_group, V, a.device)
    if _no_topk(ref_topk_logprobs, ref_topk_indices, a.shape[:-1]):
        # k = 0: both sides coarsen to the single outcome "the rest" (mass 1 each): KL 0 exactly,
        # with zero gradients (the ``where`` passes 0, never 0·inf, to logits)
        a0 = a.reshape(-1, V)[:, 0]
        r0 = ref_topk_logprobs.reshape(a0.shape[0], 0).sum(-1)  # exactly 0, keeps r's graph
        cdt = compute_dtype(a, ref_topk_logprobs)
        never = torch.zeros_like(a0, dtype=torch.bool)
        values = torch.where(never, a0.to(cdt), r0.to(cdt))
        return finish(values, a.shape[:-1], mask, aggregation, distributed, data_group)
    idx, r = _check_topk(ref_topk_logprobs, ref_topk_indices, a.shape[:-1], g.vocab, m)
    if r.device != a.device:
        raise KlestError(f"is on {r.device}, logits on {a.device}", argument="ref_topk_logprobs")
    k = r.shape[-1]
    if m is not None:
        mf = m.reshape(-1, 1)
        idx = torch.where(mf, idx, torch.arange(k, device=idx.device))
        r = torch.where(mf, r, torch.full_like(r, -math.log(k + 1)))
    segs = rows_of(a)
    p = plan(a.numel() // V, V, [segs], m, chunk_size)
    cdt = compute_dtype(a, r)
    lp, _, lrest = TokenFunction.apply(a, idx, p, segs, inv_t, g, cdt, False, True)
    # [N, k] arithmetic in float64: 1 − Σ e^r cancels when the top-k hold most of the mass
    f64 = torch.float64
    eps = torch.finfo(r.dtype).eps
    rr, lp, lrest, lrest_ref = _coarsen(r.to(f64), lp.to(f64), lrest.to(f64), eps)
    if swap:
        terms = _plogp_ratio(rr, lp).sum(-1) + _plogp_ratio(lrest_ref, lrest)
    else:
        terms = _plogp_ratio(lp, rr).sum(-1) + _plogp_ratio(lrest, lrest_ref)
    values = InfGuard.apply(terms.clamp_min(0.0).to(cdt))
    if m is not None:
        values = torch.where(m.reshape(-1), values, torch.zeros_like(values))
    return finish(values, a.shape[:-1], mask, aggregation, distributed, data_group)


HIDDEN_ROWS = 256  # default rows per chunk of the fused variants
# default vocabulary entries per block: V/48, so the four float32 blocks of [rows, V/48] alive at
# once (rows ≤ N) stay below N·V·4/12 bytes, under 10 % of one [N, V] float32 tensor
VOCAB_BLOCKS = 48


def _check_layer(
    hname: str, hidden: Any, wname: str, weight: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    h = check_logits(hname, hidden)
    W = check_logits(wname, weight)
    if W.ndim != 2 or W.shape[1] != h.shape[-1]:
        raise KlestError(
            f"must be [vocabulary, {h.shape[-1]}] (the output layer's weight, hidden size "
            f"{h.shape[-1]} from {hname})",
            argument=wname,
            value=W,
        )
    if W.device != h.device:
        raise KlestError(f"is on {W.device}, {hname} on {h.device}", argument=wname, value=W)
    return h, W


def _rows2d(h: torch.Tensor) -> torch.Tensor:
    return h.reshape(-1, h.shape[-1])  # [N, hidden] is small next to [N, V]: a copy is fine


def _vocab_chunk(vocab_chunk_size: int | None, vocab: int) -> int:
    vc = max(512, -(-vocab // VOCAB_BLOCKS)) if vocab_chunk_size is None else int(vocab_chunk_size)
    if vc < 1:
        raise KlestError("must be a positive number of entries", argument="vocab_chunk_size")
    return vc


def full_kl_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    mask: Any = None,
    direction: Direction = "reverse",
    temperature: float = 1.0,
    *,
    aggregation: Aggregation | None = None,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    process_group: Any = None,
    distributed: bool | None = None,
    data_group: Any = None,
) -> torch.Tensor:
    r""":func:`full_kl` of ``hidden @ weightᵀ`` and ``ref_hidden @ ref_weightᵀ``, never forming
    [N, V].

    Logits are computed in blocks of ``chunk_size`` positions (default 256) × ``vocab_chunk_size``
    entries (default V/48, at least 512), reduced to three floats per row and block, merged
    exactly; backward recomputes each block and accumulates the gradients w.r.t. ``hidden`` and
    ``weight`` (and the reference's, when they require grad) block by block. The extra memory is
    four blocks, under 10 % of one [N, V] float32 tensor by default (plus float32 gradient
    accumulators and block copies of the weight for 16-bit inputs).

    Args:
        hidden, ref_hidden: [..., H] and [..., H_ref] final hidden states (same leading shape).
        weight, ref_weight: [V, H] and [V, H_ref] output-layer (unembedding) weights, without
            bias; under ``process_group`` each rank holds its [V/world, ·] rows of both.
        other arguments: as in :func:`full_kl`.

    >>> import torch
    >>> from klest.logits import full_kl, full_kl_from_hidden
    >>> h, W = torch.randn(4, 3, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    >>> hr, Wr = torch.randn(4, 5, dtype=torch.float64), torch.randn(10, 5, dtype=torch.float64)
    >>> fused = full_kl_from_hidden(h, W, hr, Wr, vocab_chunk_size=4)
    >>> bool(torch.allclose(fused, full_kl(h @ W.T, hr @ Wr.T), rtol=0, atol=1e-12))
    True
    """
    h, W = _check_layer("hidden", hidden, "weight", weight)
    hr, Wr = _check_layer("ref_hidden", ref_hidden, "ref_weight", ref_weight)
    if tuple(hr.shape[:-1]) != tuple(h.shape[:-1]):
        raise KlestError(
            f"leading shape {tuple(hr.shape[:-1])} differs from hidden's {tuple(h.shape[:-1])}",
            argument="ref_hidden",
            value=hr,
        )
    if Wr.shape[0] != W.shape[0]:
        raise KlestError(
            f"vocabulary size {Wr.shape[0]} differs from weight's {W.shape[0]}",
            argument="ref_weight",
            value=Wr,
        )
    if hr.device != h.device:
        raise KlestError(f"is on {hr.device}, hidden on {h.device}", argument="ref_hidden")
    inv_t = 1.0 / check_temperature(temperature)
    swap = check_direction(direction)
    shape = h.shape[:-1]
    m = flat_mask(mask, shape, h.device)
    V = W.shape[0]
    g = group_of(process_group, V, h.device)
    h2, hr2 = _rows2d(h), _rows2d(hr)
    rows = HIDDEN_ROWS if chunk_size is None else chunk_size
    p = plan(h2.shape[0], V, [], m, rows)
    cdt = compute_dtype(h, W, hr, Wr)
    values = KLHiddenFunction.apply(
        h2, W, hr2, Wr, p, swap, inv_t, g, cdt, _vocab_chunk(vocab_chunk_size, V)
    )
    return finish(values, shape, mask, aggregation, distributed, data_group)


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    *,
    mask: Any = None,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    process_group: Any = None,
) -> Any:
    r""":func:`token_logprobs` of ``hidden @ weightᵀ``, never forming [N, V].

    Blocks, gradients (w.r.t. ``hidden`` and ``weight``) and arguments as in
    :func:`full_kl_from_hidden` and :func:`token_logprobs`.

    >>> import torch
    >>> from klest.logits import token_logprobs, token_logprobs_from_hidden
    >>> h, W = torch.randn(4, 3, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    >>> t = torch.tensor([0, 9, 3, 3])
    >>> fused = token_logprobs_from_hidden(h, W, t, vocab_chunk_size=4)
    >>> bool(torch.allclose(fused, token_logprobs(h @ W.T, t), rtol=0, atol=1e-12))
    True
    """
    h, W = _check_layer("hidden", hidden, "weight", weight)
    inv_t = 1.0 / check_temperature(temperature)
    shape = h.shape[:-1]
    m = flat_mask(mask, shape, h.device)
    V = W.shape[0]
    g = group_of(process_group, V, h.device)
    t = check_tokens(tokens, shape, g.vocab, m, h.device)
    h2 = _rows2d(h)
    rows = HIDDEN_ROWS if chunk_size is None else chunk_size
    p = plan(h2.shape[0], V, [], m, rows)
    lp, H = TokenHiddenFunction.apply(
        h2, W, t[:, None], p, inv_t, g, compute_dtype(h, W), bool(return_entropy),
        _vocab_chunk(vocab_chunk_size, V),
    )  # fmt: skip
    if return_entropy:
        return lp.view(shape), H.view(shape)
    return lp.view(shape)
