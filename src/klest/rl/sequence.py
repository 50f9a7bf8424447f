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

Weights are detached (they multiply values and returns); log-weights are summed in float64, and
a weight is never formed alone where it over- or underflows: w·x is taken directly while w is a
normal float64, else as sign(x)·exp(log w + log|x|) (a prefix ratio e^800 times a KL of 1e-310
is 2.7e37, not +inf; a ratio that underflows to 0 times a KL of +inf is +inf, not NaN).
If ``ref_logp`` (or ``kl``) requires grad, the gradient w.r.t. the reference is the pathwise one,
unbiased for ∇_ref of the sequence KL (the samples do not depend on π_ref).

**Infinite KLs.** Where KL_s = +inf (π_ref gives a token of π's support probability 0), the row
is +inf and so are the score coefficients of the positions before s; every other derivative is
the finite number of the table: Σ_{u>t} sums are formed as sums, never as the difference
Σ_{u>=t} − (term t) (inf − inf), and a derivative that the loss multiplies by 0 is 0 (not 0·inf).

**Inputs.** ``kl`` must be >= 0 and not NaN at valid tokens, ``logp``/``old_logp`` finite there
(checked in validation mode, ``klest.options(validate=True)``, the default); every tensor must be
floating and of ``logp``'s shape and device, ``weight_clamp`` a real number >= 1; else
:class:`klest.KlestError`. Masked tokens are never read and contribute 0 to values, weights (a
ratio of 1) and gradients. The terms are float64 if any input (``old_logp`` included) is, else
float32 (16-bit inputs are computed in float32); gradients come back in each input's dtype.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, NamedTuple

import torch

from .._config import get_options
from .._torch import check_mask
from ..errors import KlestError
from ..logits import full_kl, token_logprobs
from ._inputs import traced
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


class _LogWeights(NamedTuple):
    """Detached float64 log-weights log w_{1:t} (``upto``) and log w_{1:t-1} (``before``), and the
    weight cap c (None: no cap). A weight is min(e^{log w}, c); it is never formed alone where
    e^{log w} overflows or underflows (see :func:`_times_weight`)."""

    upto: torch.Tensor
    before: torch.Tensor
    cap: float | None


def _log_weights(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    mask: torch.Tensor | None,
    weighting: Weighting,
    weight_clamp: float | None,
) -> _LogWeights | None:
    """The log-weights of terms that depend on y_<=t (``upto``) and on y_<t (``before``)."""
    if old_logp is None:
        return None
    logw = logp.detach().to(torch.float64) - old_logp.detach().to(torch.float64)
    if mask is not None:
        logw = torch.where(mask, logw, torch.zeros((), dtype=logw.dtype, device=logw.device))
    if weighting == "per_decision":
        upto = torch.cumsum(logw, dim=-1)
        before = torch.cat([torch.zeros_like(upto[..., :1]), upto[..., :-1]], dim=-1)
    elif weighting == "sequence":
        upto = logw.sum(dim=-1, keepdim=True).expand_as(logw)
        before = upto
    else:  # per_token
        upto, before = logw, torch.zeros_like(logw)
    return _LogWeights(upto, before, weight_clamp)


def _weight(logw: torch.Tensor, cap: float | None) -> torch.Tensor:
    """min(e^{log w}, c) in float64 (+inf where e^{log w} overflows and there is no cap)."""
    w = torch.exp(logw)
    return w if cap is None else w.clamp(max=cap)


def _times_weight(x: torch.Tensor, logw: torch.Tensor, cap: float | None) -> torch.Tensor:
    r"""x · min(e^{log w}, c) in float64, right where e^{log w} alone over- or underflows.

    Where the weight is a normal float64 the product is formed directly (correctly rounded);
    elsewhere (log w > 709.78 or < -708.4) as sign(x)·exp(log w' + log|x|), log w' = min(log w,
    log c), whose relative error is a few times 1e-16·(|log w| + |log|x||) (below 1e-12). x = 0
    gives 0 and x = ±inf gives ±inf, whatever the weight (every weight is positive).
    """
    x = x.to(torch.float64)
    w = _weight(logw, cap)
    logw_c = logw if cap is None else logw.clamp(max=math.log(cap))
    normal = torch.isfinite(w) & (w >= torch.finfo(torch.float64).tiny)
    with torch.no_grad():
        via_log = torch.sign(x) * torch.exp(logw_c + torch.log(x.abs()))
        out = torch.where(normal, w * x, via_log)
        return torch.where(x == 0, torch.zeros((), dtype=x.dtype, device=x.device), out)


def _suffix_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_{s>=t} x_s, Σ_{s>t} x_s) along the last axis, each a sum (never a difference: with
    x_s = +inf the later positions' sums stay finite, not inf - inf)."""
    inclusive = torch.flip(torch.cumsum(torch.flip(x, (-1,)), dim=-1), (-1,))
    exclusive = torch.cat([inclusive[..., 1:], torch.zeros_like(inclusive[..., :1])], dim=-1)
    return inclusive, exclusive


class _Score(torch.autograd.Function):
    """Value exactly 0 (even where ``coef`` is ±inf), derivative ``coef`` with respect to ``x``.

    An upstream gradient of exactly 0 gives 0 (not 0·inf = NaN): a term the loss does not depend
    on contributes nothing, whatever its coefficient."""

    @staticmethod
    def forward(x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (coef,) = ctx.saved_tensors
        zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
        return torch.where(grad == 0, zero, grad * coef.to(grad.dtype)), None


def _score(x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """sg(coef)·(x − sg(x)): value 0, derivative ``coef`` with respect to ``x``.

    Written out, it would be 0·inf = NaN where a return is +inf (π_ref gives a later token
    probability 0); this value stays 0, so the terms say +inf, not NaN.
    """
    out: torch.Tensor = _Score.apply(x, coef.detach())
    return out


def _part(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """c·x, with 0 where c = 0 (a piece of weight 0 is absent: 0·inf is 0 here, not NaN)."""
    return torch.where(c == 0, torch.zeros((), dtype=x.dtype, device=x.device), c * x)


class _Pieces(NamedTuple):
    """One estimator's per-token terms as a detached value and the coefficients of the
    gradient: d(terms)/d logp = ``logp``, d/d kl = ``kl``, d/d ref_logp = ``ref`` (None:
    no dependence). ``returns``: Σ_{s>=t} of the values (for the cross-fitted α)."""

    value: torch.Tensor
    logp: torch.Tensor
    kl: torch.Tensor | None
    ref: torch.Tensor | None
    returns: torch.Tensor


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
    folds = _check_folds(folds)
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
    _check_options(estimator, weighting, alpha, weight_clamp, folds)
    if not isinstance(logp, torch.Tensor) or logp.ndim != 2 or not logp.is_floating_point():
        raise KlestError(
            "must be a floating torch tensor [batch, seq]", argument="logp", value=logp
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
        if not x.is_floating_point():
            raise KlestError(
                "must have a floating dtype (float16, bfloat16, float32, float64); an integer "
                "tensor here is usually token ids passed by mistake",
                argument=name,
                value=x,
            )
        if x.device != logp.device:
            raise KlestError(f"is on {x.device}, logp on {logp.device}", argument=name, value=x)
    m = check_mask(mask, logp.shape, logp.device)
    if get_options().validate and not traced(logp, ref_logp, kl, old_logp, m):
        _check_values(logp, kl, old_logp, m)
    # float64 if any input is, else float32 (16-bit inputs are computed in float32)
    f64 = any(x is not None and x.dtype == torch.float64 for x in (logp, ref_logp, kl, old_logp))
    cdt = torch.float64 if f64 else torch.float32
    lw = _log_weights(logp, old_logp, m, weighting, weight_clamp)
    logp = logp.to(cdt)  # differentiable cast

    def zero_masked(x: torch.Tensor) -> torch.Tensor:
        return x if m is None else torch.where(m, x, x.new_zeros(()))

    k1 = full = None
    kl_: torch.Tensor | None = None
    if ref_logp is not None and estimator in ("k1", "mix"):
        ell = kl_penalty(logp, ref_logp, mask=m, estimator="k1").to(cdt)
        value = ell if lw is None else _times_weight(ell, lw.upto, lw.cap).to(cdt)
        returns = reward_to_go(value, m)  # Σ_{s>=t} w_{1:s} ℓ_s
        # a trainable reference: the pathwise −w_{1:t}·∇log π_ref,t
        w_ref = None
        if ref_logp.requires_grad:
            w_ref = -(torch.ones_like(value) if lw is None else _weight(lw.upto, lw.cap).to(cdt))
        k1 = _Pieces(value, returns, None, w_ref, returns)
    if kl is not None and estimator in ("full", "mix"):
        kl_ = zero_masked(kl.to(cdt))
        kl_d = kl_.detach()
        value = kl_d if lw is None else _times_weight(kl_d, lw.before, lw.cap).to(cdt)
        returns, future = _suffix_sums(zero_masked(value))  # future: Σ_{s>t} w_{1:s-1} KL_s
        w_kl = torch.ones_like(value) if lw is None else _weight(lw.before, lw.cap).to(cdt)
        full = _Pieces(value, zero_masked(future), w_kl, None, zero_masked(returns))
    a = None
    if estimator == "k1":
        assert k1 is not None
        pieces = k1
    elif estimator == "full":
        assert full is not None
        pieces = full
    else:
        assert k1 is not None and full is not None
        if alpha == "cross_fit":
            a = fit_alpha(k1.returns, full.returns, folds=folds)
        else:
            a = torch.full(logp.shape[:1], float(alpha), dtype=cdt, device=logp.device)
        pieces = _mix(a[:, None], k1, full)
    terms = pieces.value + _score(logp, pieces.logp)
    if pieces.kl is not None:
        assert kl_ is not None
        terms = terms + _score(kl_, pieces.kl)
    if pieces.ref is not None:
        assert ref_logp is not None
        terms = terms + _score(ref_logp.to(cdt), pieces.ref)
    return SequenceKL(zero_masked(terms), a)


def _mix(a: torch.Tensor, k1: _Pieces, full: _Pieces) -> _Pieces:
    """α·k1 + (1 − α)·full, piece by piece. Where either value (or either score coefficient) is
    +inf, the mix is +inf: both say that the KL at (or after) that prefix is +inf, which no
    weighting undoes (α outside [0, 1] would otherwise give inf − inf or −inf). A piece of weight
    0 is absent (α = 1 is k1 exactly, α = 0 full)."""

    def mix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = _part(a, x) + _part(1 - a, y)
        inf = (torch.isposinf(x) & (a != 0)) | (torch.isposinf(y) & (a != 1))
        return torch.where(inf, torch.full((), math.inf, dtype=out.dtype, device=out.device), out)

    assert full.kl is not None
    ref = None if k1.ref is None else _part(a, k1.ref)
    value = mix(k1.value, full.value)
    return _Pieces(value, mix(k1.logp, full.logp), _part(1 - a, full.kl), ref, value)


def _check_folds(folds: Any) -> int:
    """``folds`` as an int if it is an integer >= 2 (not a bool); KlestError otherwise."""
    if isinstance(folds, bool) or not isinstance(folds, numbers.Integral):
        raise KlestError(
            f"must be an integer >= 2, got {type(folds).__name__}", argument="folds", value=folds
        )
    if folds < 2:
        raise KlestError("cross-fitting needs at least 2 folds", argument="folds", value=folds)
    return int(folds)


def _check_options(
    estimator: Any, weighting: Any, alpha: Any, weight_clamp: Any, folds: Any
) -> None:
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
    if weight_clamp is not None:
        if isinstance(weight_clamp, bool) or not isinstance(weight_clamp, numbers.Real):
            raise KlestError(
                f"must be a real number >= 1 or None, got {type(weight_clamp).__name__}",
                argument="weight_clamp",
                value=weight_clamp,
            )
        if not float(weight_clamp) >= 1.0:  # also refuses NaN
            raise KlestError(
                "must be >= 1 (a weight cap below 1 clips every weight)",
                argument="weight_clamp",
                value=weight_clamp,
            )
    if alpha != "cross_fit" and not (
        isinstance(alpha, numbers.Real) and not isinstance(alpha, bool) and math.isfinite(alpha)
    ):
        raise KlestError("must be a finite number or 'cross_fit'", argument="alpha", value=alpha)
    _check_folds(folds)


def _check_values(
    logp: torch.Tensor,
    kl: torch.Tensor | None,
    old_logp: torch.Tensor | None,
    m: torch.Tensor | None,
) -> None:
    """Refuse NaN/±inf sampled log-probs and NaN or negative KLs at valid tokens (masked tokens
    may hold anything)."""

    def count(bad: torch.Tensor) -> int:
        return int((bad if m is None else bad & m).sum())

    for name, x in (("logp", logp), ("old_logp", old_logp)):
        if x is None:
            continue
        n_bad = count(~torch.isfinite(x.detach()))
        if n_bad:
            raise KlestError(
                f"is ±inf or NaN at {n_bad} valid token(s) (log-probs of sampled tokens must be "
                "finite; masked tokens may hold anything)",
                argument=name,
                value=x,
            )
    if old_logp is not None:
        logw = logp.detach().to(torch.float64) - old_logp.detach().to(torch.float64)
        if count(~torch.isfinite(logw)):
            raise KlestError(
                "logp - old_logp overflows float64 (|log-probs| near 1e308 are not log-probs)",
                argument="old_logp",
                value=old_logp,
            )
    if kl is not None:
        k = kl.detach()
        n_nan, n_neg = count(torch.isnan(k)), count(k < 0)
        if n_nan:
            raise KlestError(
                f"is NaN at {n_nan} valid token(s) (a KL is a number in [0, +inf])",
                argument="kl",
                value=kl,
            )
        if n_neg:
            raise KlestError(
                f"is negative at {n_neg} valid token(s) (a KL is >= 0; clamp rounding errors "
                "at 0 before passing it)",
                argument="kl",
                value=kl,
            )


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
