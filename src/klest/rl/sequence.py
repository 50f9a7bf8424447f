r"""Sequence-level KL(π‖π_ref) with a gradient whose expectation is ∇ of the sequence KL.

A sequence y = y_1..y_T is sampled token by token; ``logp[b, t] = log π(y_t|y_<t)`` (with
gradient), ``ref_logp`` likewise for π_ref, ℓ_t = logp_t - ref_logp_t, and ``kl[b, t]`` =
KL_t = KL(π(·|y_<t)‖π_ref(·|y_<t)), the exact per-position KL over the whole vocabulary at the
sampled prefix (from logits: :func:`klest.logits.full_kl`, differentiable). The sequence KL is

.. math:: \mathrm{KL}_{seq} = E_\pi\Big[\sum_t \ell_t\Big] = E_\pi\Big[\sum_t \mathrm{KL}_t\Big].

:func:`sequence_kl` returns per-token terms [B, T]; each row sums to an unbiased estimate of its
sequence's KL and the gradient of that sum has expectation ∇KL_seq (proved by exact enumeration in
tests/rl/test_sequence.py). Reduce with ``aggregate(terms, mask, "seq-mean-token-sum")``.

================  =======================  ================================================
``estimator``     value of row b           gradient (samples of π)
================  =======================  ================================================
``"k1"``          Σ_t ℓ_t                  Σ_t ∇log π_t · Σ_{s>=t} ℓ_s (reward-to-go)
``"full"``        Σ_t KL_t                 Σ_t ∇KL_t + Σ_t ∇log π_t · Σ_{s>t} KL_s
``"mix"``         α·(k1) + (1-α)·(full)    the same mix of the two gradients
================  =======================  ================================================

``"full"`` is Rao-Blackwellised per position (Amini, Vieira & Cotterell 2025): per position it
never has more variance than k1, but for the sum it can have more (math.md §4: a two-step
example where Var Σk1 = 0.161 and Var ΣKL = 2.25), because the realised log-ratio of one token
acts as a control variate for the KL of the later ones. ``"mix"`` is unbiased for any α that
does not depend on the row it is applied to; ``alpha="cross_fit"`` (default) fits, for each of
``folds`` interleaved folds of rows (row b is in fold b mod ``folds``), the α that minimises
Σ_t Var(α G^{k1}_t + (1-α) G^{full}_t) on the *other* folds, where G_t is the return
Σ_{s>=t} of each estimator's per-token values (the numbers that multiply ∇log π; G_1 is the
row's value). With fewer than two rows outside a fold, or no spread, that fold gets α = 0.

**Off-policy** (``old_logp``: the tokens were sampled by μ, e.g. the older policy or a rollout
engine). With the prefix ratio w_{1:t} = Π_{u<=t} π(y_u|y_<u)/μ(y_u|y_<u):

- ``weighting="per_decision"`` (default): ℓ_t is weighted by w_{1:t} and KL_t (an expectation
  over y_t given y_<t) by w_{1:t-1}; returns are sums of weighted terms. Unbiased for the sequence
  KL and its gradient (per-decision importance sampling).
- ``"sequence"``: every term weighted by the whole-sequence ratio w_{1:T}. Unbiased, more variance.
- ``"per_token"``: ℓ_t weighted by its own ratio π(y_t|y_<t)/μ(y_t|y_<t) only and KL_t not at
  all (what per-token importance weights in RL frameworks amount to). **Biased** at sequence level.
- ``weight_clamp=c``: every weight w is replaced by min(w, c) (truncated importance sampling).
  A bias wherever a weight exceeds c; ``klest gradients`` measures it.

Weights are detached (they multiply values and returns); log-weights are summed in float64.
If ``ref_logp`` (or ``kl``) requires grad, the gradient w.r.t. the reference is the pathwise one,
unbiased for ∇_ref of the sequence KL (the samples do not depend on π_ref).
Masked tokens contribute 0 to values, weights (a ratio of 1) and gradients. The terms are float64
if any input is, else float32 (16-bit inputs are computed in float32); gradients come back in
each input's dtype.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch

from ..errors import KlestError
from ._inputs import check_mask
from .aggregate import reward_to_go
from .penalty import kl_penalty

__all__ = [
    "SEQUENCE_ESTIMATORS",
    "WEIGHTINGS",
    "SequenceKL",
    "fit_alpha",
    "sequence_kl",
    "sequence_kl_from_logits",
]

SequenceEstimator = Literal["k1", "full", "mix"]
Weighting = Literal["per_decision", "sequence", "per_token"]
SEQUENCE_ESTIMATORS: tuple[SequenceEstimator, ...] = ("k1", "full", "mix")
WEIGHTINGS: tuple[Weighting, ...] = ("per_decision", "sequence", "per_token")


class SequenceKL(NamedTuple):
    """``terms`` [B, T]: per-token terms (row sums: the sequence KL estimates, with the gradient
    of the module table); ``alpha`` [B]: the α each row used (``"mix"`` only, else None)."""

    terms: torch.Tensor
    alpha: torch.Tensor | None


def _weights(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    mask: torch.Tensor | None,
    weighting: Weighting,
    weight_clamp: float | None,
    cdt: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(w_upto, w_before): detached weights of terms that depend on y_<=t and on y_<t."""
    if old_logp is None:
        return None, None
    logw = (logp.detach() - old_logp.detach()).to(torch.float64)
    if mask is not None:
        logw = torch.where(mask, logw, torch.zeros((), dtype=logw.dtype, device=logw.device))
    if weighting == "per_decision":
        upto = torch.cumsum(logw, dim=-1)
        w_upto, w_before = upto.exp(), (upto - logw).exp()
    elif weighting == "sequence":
        w_upto = logw.sum(dim=-1, keepdim=True).exp().expand_as(logw)
        w_before = w_upto
    else:  # per_token
        w_upto, w_before = logw.exp(), torch.ones_like(logw)
    if weight_clamp is not None:
        w_upto, w_before = w_upto.clamp(max=weight_clamp), w_before.clamp(max=weight_clamp)
    return w_upto.to(cdt), w_before.to(cdt)


class _Score(torch.autograd.Function):
    """Value exactly 0 (even where ``coef`` is ±inf), derivative ``coef`` with respect to logp."""

    @staticmethod
    def forward(logp: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(logp)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (coef,) = ctx.saved_tensors
        return grad * coef, None


def _score(logp: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """The score term sg(coef)·∇log π: value 0, derivative ``coef`` with respect to logp.

    Written as (logp − sg(logp))·sg(coef) it would be 0·inf = NaN where a return is +inf (π_ref
    gives a later token probability 0); this value stays 0, so the terms say +inf, not NaN.
    """
    out: torch.Tensor = _Score.apply(logp, coef.detach())
    return out


def fit_alpha(
    returns_k1: torch.Tensor, returns_full: torch.Tensor, *, folds: int = 2
) -> torch.Tensor:
    r"""Cross-fitted α per row [B] for the mix α·k1 + (1-α)·full.

    .. math:: \alpha^* = -\frac{\sum_t \mathrm{Cov}(G^{full}_t, D_t)}{\sum_t \mathrm{Var}(D_t)},
        \qquad D_t = G^{k1}_t - G^{full}_t,

    moments over the rows *not* in the row's fold (row b is in fold b mod ``folds``), so α is
    independent of the row it weights and the mix stays unbiased. Rows [B, T] of returns; rows
    with a non-finite return (an infinite KL) are left out of the moments.
    """
    if folds < 2:
        raise KlestError("cross-fitting needs at least 2 folds", argument="folds", value=folds)
    a = returns_full.detach().to(torch.float64)
    d = returns_k1.detach().to(torch.float64) - a
    B = a.shape[0]
    fold = torch.arange(B, device=a.device) % folds
    finite = torch.isfinite(a).all(-1) & torch.isfinite(d).all(-1)  # +inf rows carry no moments
    alpha = torch.zeros(B, dtype=torch.float64, device=a.device)
    for k in range(folds):
        other = (fold != k) & finite
        n = int(other.sum())
        if n < 2:
            continue
        ao, do = a[other], d[other]
        ac, dc = ao - ao.mean(0), do - do.mean(0)
        var = (dc * dc).sum()
        if float(var) > 0:
            alpha[fold == k] = -(ac * dc).sum() / var
    return alpha.to(returns_k1.dtype)


def sequence_kl(
    logp: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    *,
    kl: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    estimator: SequenceEstimator = "full",
    alpha: float | Literal["cross_fit"] = "cross_fit",
    folds: int = 2,
    weighting: Weighting = "per_decision",
    weight_clamp: float | None = None,
) -> SequenceKL:
    """Per-token terms [B, T] of the sequence KL(π‖π_ref) (module table), with its gradient.

    ``estimator="k1"`` needs ``ref_logp``; ``"full"`` needs ``kl`` (the per-position KL,
    differentiable, e.g. :func:`klest.logits.full_kl`); ``"mix"`` needs both. ``logp`` carries
    the gradient of the sampled tokens (the score terms); ``kl`` carries the pathwise gradient.

    >>> import torch, klest.rl as rl
    >>> logp = torch.tensor([[-0.7, -0.2]], requires_grad=True)
    >>> kl = torch.tensor([[0.3, 0.5]], requires_grad=True)
    >>> out = rl.sequence_kl(logp, kl=kl)
    >>> out.terms.sum().backward()
    >>> out.terms.detach(), logp.grad, kl.grad  # value KL_t; ∇log π_1 carries KL_2
    (tensor([[0.3000, 0.5000]]), tensor([[0.5000, 0.0000]]), tensor([[1., 1.]]))
    """
    if estimator not in SEQUENCE_ESTIMATORS:
        raise KlestError(
            f"unknown estimator {estimator!r}; known: {', '.join(SEQUENCE_ESTIMATORS)}",
            argument="estimator",
        )
    if weighting not in WEIGHTINGS:
        raise KlestError(
            f"unknown weighting {weighting!r}; known: {', '.join(WEIGHTINGS)}",
            argument="weighting",
        )
    if not isinstance(logp, torch.Tensor) or logp.ndim != 2 or not logp.is_floating_point():
        raise KlestError(
            "must be a floating torch tensor [batch, seq]", argument="logp", value=logp
        )
    if weight_clamp is not None and not weight_clamp >= 1.0:
        raise KlestError(
            "must be >= 1 (a weight cap below 1 clips every weight)",
            argument="weight_clamp",
            value=weight_clamp,
        )
    for name, x, needed in (
        ("ref_logp", ref_logp, estimator in ("k1", "mix")),
        ("kl", kl, estimator in ("full", "mix")),
        ("old_logp", old_logp, False),
    ):
        if x is None:
            if needed:
                raise KlestError(f"estimator={estimator!r} needs {name}", argument=name)
            continue
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(logp.shape):
            raise KlestError(
                f"must be a torch tensor of the shape of logp {tuple(logp.shape)}",
                argument=name,
                value=x,
            )
    m = check_mask(mask, logp.shape, logp.device)
    if alpha != "cross_fit" and not (
        isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)
    ):
        raise KlestError("must be a finite number or 'cross_fit'", argument="alpha", value=alpha)
    for name, x in (("logp", logp), ("old_logp", old_logp)):
        if x is None:
            continue
        bad = ~torch.isfinite(x.detach())
        if m is not None:
            bad = bad & m
        n_bad = int(bad.sum())
        if n_bad:
            raise KlestError(
                f"is ±inf or NaN at {n_bad} valid token(s) (log-probs of sampled tokens must be "
                "finite; masked tokens may hold anything)",
                argument=name,
                value=x,
            )
    # float64 if any input is, else float32 (16-bit inputs are computed in float32)
    f64 = any(x is not None and x.dtype == torch.float64 for x in (logp, ref_logp, kl))
    cdt = torch.float64 if f64 else torch.float32
    w_upto, w_before = _weights(logp, old_logp, m, weighting, weight_clamp, cdt)
    logp = logp.to(cdt)  # differentiable cast

    def zero_masked(x: torch.Tensor) -> torch.Tensor:
        return x if m is None else torch.where(m, x, x.new_zeros(()))

    k1_terms = k1_returns = full_terms = full_returns = None
    if ref_logp is not None and estimator in ("k1", "mix"):
        ell = kl_penalty(logp, ref_logp, mask=m, estimator="k1").to(cdt)
        value = ell if w_upto is None else w_upto * ell
        k1_returns = reward_to_go(value, m)  # Σ_{s>=t} w_{1:s} ℓ_s
        k1_terms = value + _score(logp, k1_returns)
        if ref_logp.requires_grad:  # a trainable reference: the pathwise −w_{1:t}∇log π_ref,t
            w = torch.ones_like(value) if w_upto is None else w_upto
            k1_terms = k1_terms + _score(ref_logp.to(cdt), -w)
        k1_terms = zero_masked(k1_terms)
    if kl is not None and estimator in ("full", "mix"):
        kl_ = zero_masked(kl.to(cdt))
        value_full = kl_ if w_before is None else w_before * kl_  # pathwise ∇KL_t kept
        full_returns = reward_to_go(value_full.detach(), m)
        future = full_returns - value_full.detach()  # Σ_{s>t} w_{1:s-1} KL_s
        full_terms = zero_masked(value_full + _score(logp, future))
    if estimator == "k1":
        assert k1_terms is not None
        return SequenceKL(k1_terms, None)
    if estimator == "full":
        assert full_terms is not None
        return SequenceKL(full_terms, None)
    assert k1_terms is not None and full_terms is not None
    assert k1_returns is not None and full_returns is not None
    if alpha == "cross_fit":
        a = fit_alpha(k1_returns, full_returns, folds=folds)
    else:
        a = torch.full(logp.shape[:1], float(alpha), dtype=cdt, device=logp.device)
    a2 = a[:, None]
    mixed = a2 * k1_terms + (1 - a2) * full_terms
    # where π_ref gives a token probability 0 both terms are +inf: the mix is +inf (not 0·inf)
    infinite = torch.isposinf(k1_terms.detach()) | torch.isposinf(full_terms.detach())
    mixed = torch.where(infinite, torch.full((), torch.inf, dtype=cdt, device=mixed.device), mixed)
    return SequenceKL(mixed, a)


def sequence_kl_from_logits(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    estimator: SequenceEstimator = "full",
    alpha: float | Literal["cross_fit"] = "cross_fit",
    folds: int = 2,
    weighting: Weighting = "per_decision",
    weight_clamp: float | None = None,
    temperature: float = 1.0,
) -> SequenceKL:
    """:func:`sequence_kl` from the two models' logits [B, T, V] and the sampled ``tokens`` [B, T].

    ``KL_t`` comes from :func:`klest.logits.full_kl` (differentiable in ``logits``), ``logp`` and
    ``ref_logp`` the sampled tokens' log-probs from :func:`klest.logits.token_logprobs` (at
    ``temperature``).
    """
    from ..logits import full_kl, token_logprobs

    if not isinstance(tokens, torch.Tensor) or tuple(tokens.shape) != tuple(logits.shape[:-1]):
        raise KlestError(
            f"must be token ids of shape {tuple(logits.shape[:-1])}",
            argument="tokens",
            value=tokens,
        )
    # the sampled tokens' log-probs without an [N, V] float32 copy
    logp = token_logprobs(logits, tokens, temperature, mask=mask)
    ref_logp = token_logprobs(ref_logits, tokens, temperature, mask=mask)
    kl = full_kl(logits, ref_logits, mask=mask, direction="reverse", temperature=temperature)
    return sequence_kl(
        logp,
        ref_logp,
        kl=kl,
        old_logp=old_logp,
        mask=mask,
        estimator=estimator,
        alpha=alpha,
        folds=folds,
        weighting=weighting,
        weight_clamp=weight_clamp,
    )
