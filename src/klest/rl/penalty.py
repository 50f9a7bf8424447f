r"""KL to a reference policy, per token, as a reward penalty or a loss, with the gradient you chose.

RL convention: the tokens were sampled from the policy π, so q = π and p = π_ref;
``ℓ = logp - ref_logp`` (= k1 = -L) and ``r = π_ref/π = e^{-ℓ}``. "KL" below means the reverse
KL(π‖π_ref) = E_π[ℓ], the KL that RLHF penalises; the forward KL is KL(π_ref‖π).

**Value and gradient are chosen separately.** ``estimator`` sets the value (``"k1"`` ℓ,
``"k2"`` ½ℓ², ``"k3"`` (r - 1) - log r, ``"abs"`` |ℓ|, ``"forward_k1"`` r log r,
``"forward_k3"`` r log r - (r - 1), or any f-divergence name / :class:`klest.FDivergence`).
``gradient`` sets the per-token derivative with respect to ``logp`` (x ~ π, expectations exact,
proved by enumeration in tests/rl/test_enumeration.py):

========================  ===========================  =========================================
``gradient``              d(term)/d logp               expected gradient follows
========================  ===========================  =========================================
``"reverse_kl"``          ℓ                            ∇KL(π‖π_ref) per token (= k2's gradient;
                                                       straight-through, whatever the value)
``"forward_kl"``          1 - r                        ∇KL(π_ref‖π) per token (= k3's gradient)
``"as_written"``          -v'(L) (autograd of v)       k1: nothing (E = 0); k2: reverse KL;
                                                       k3: forward KL; in general ∇D_h with
                                                       h(r) - r h'(r) = -v'(log r)
``"sequence_reverse_kl"`` Σ_{s>=t} ℓ_s (reward-to-go)  ∇ of the sequence KL E[Σ_t ℓ_t]
``"none"``                0                            nothing (a detached value)
========================  ===========================  =========================================

"Per token" means the gradient of Σ_t KL(π(·|y_<t)‖π_ref(·|y_<t)) at the sampled prefixes, with
the prefixes held fixed: it ignores how a token changes the KL of the tokens after it. Only
``"sequence_reverse_kl"`` (or k1 in the reward with :func:`reward_to_go` returns) follows the
sequence-level KL.

**Off-policy.** With ``old_logp`` (the policy that sampled), each term is weighted by
w = π/π_old = exp(logp - old_logp), so that expectations under π_old equal those under π. With
``weight="detached"`` the options above keep their meaning. With ``weight="differentiable"``
(only with ``gradient="as_written"``) the derivative of w adds the score term v·∇log π: the
expected gradient is then ∇E_π[v], the gradient of whatever v is unbiased for: reverse KL for
k1/k3, the forward KL for forward_k1/forward_k3, ½E[ℓ²] for k2. Without ``old_logp`` this is
w = exp(logp - sg(logp)) = 1: "score + pathwise". With ``weight="gradient_only"`` the detached w
multiplies the derivative only and the value is the unweighted v (OpenRLHF's unbiased gradient:
the gradient keeps its meaning, the value is v at samples of π_old, not an estimate under π).
``weight_clamp`` clips w (a number c means w <= c); a clamp is a bias, counted in the diagnostics.

**Clamps.** ``clamp`` clips the log-ratio L = -ℓ to [-c, c] (or (lo, hi)) before the value is
computed; ``value_clamp`` clips the value. Both are off by default, count what they touch, and,
for ``"as_written"``, zero the gradient of the tokens they touch (as autograd of a clip does).
The "reverse_kl"/"forward_kl" coefficients use the unclipped ℓ.

**Peers' clamp conventions** (for the presets): ``clamp_weighted=True`` makes ``value_clamp`` clip
the weighted value w·v (gradient 0 where it binds) instead of v; ``clamp_stops_gradient=True``
gives a token whose log-ratio clamp binds no gradient at all (score term included).
``weight_level="sequence"`` replaces the per-token weight by one per row,
w_b = exp(Σ_t m_t (logp_t - old_t) / max(Σ_t m_t, 1)) (TRL's sequence-level importance sampling).

**Masks.** A masked-out token is ignored entirely: whatever its log-probs hold (NaN, ±inf) is
never checked and contributes 0 to values and gradients (the core follows the same rule).

**Higher derivatives.** Gradients are +inf/-inf where the true derivative overflows, never NaN.
The term is twice differentiable (``create_graph=True``: Hessian-vector products keep the KL's
curvature) and works under ``torch.func.grad``/``vmap`` (value checks and diagnostics are skipped
there).

float16/bfloat16 inputs are computed in float32; outputs are float32 (float64 if any input is),
gradients come back in ``logp``'s dtype.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple

import torch

from .._config import get_options
from ..errors import KlestError
from ._autograd import GRADIENTS, WEIGHT_LEVELS, WEIGHTS, Spec, apply, compute
from ._inputs import Prepared, bounds, prepare
from ._kernels import resolve, value
from .aggregate import Aggregation, aggregation_scale

__all__ = ["GRADIENTS", "KLDiagnostics", "KLLoss", "kl_loss", "kl_penalty", "kl_per_token"]


@dataclass(frozen=True)
class KLDiagnostics:
    """What a training dashboard logs, over the valid tokens of this process (0-d float64 tensors,
    detached; ``as_dict()`` gives floats).

    ``mean``/``std``: mean and sample stdev of the per-token value (w·v off-policy; v with
    ``weight="gradient_only"``).
    ``frac_clamped``/``frac_value_clamped``/``frac_weight_clamped``: fraction of valid tokens whose
    log-ratio / value / importance weight was clipped. ``max_abs_log_ratio``: max |ℓ|.
    ``ess``: effective sample size (Σw)²/Σw² of the unclipped importance weights (= n_tokens
    on-policy). ``n_infinite``: tokens whose estimate is +inf (π_ref gives them probability 0).
    """

    n_tokens: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    frac_clamped: torch.Tensor
    frac_value_clamped: torch.Tensor
    frac_weight_clamped: torch.Tensor
    max_abs_log_ratio: torch.Tensor
    ess: torch.Tensor
    n_infinite: torch.Tensor

    def as_dict(self, prefix: str = "kl/") -> dict[str, float]:
        return {prefix + f.name: float(getattr(self, f.name)) for f in fields(self)}


class KLLoss(NamedTuple):
    """``loss``: the aggregated scalar term (add β·loss to the policy loss); ``diagnostics``."""

    loss: torch.Tensor
    diagnostics: KLDiagnostics | None


def _spec(
    estimator: Any,
    gradient: str,
    weight: str,
    weight_clamp: Any,
    clamp: Any,
    value_clamp: Any,
    old_logp: Any,
    clamp_weighted: bool = False,
    clamp_stops_gradient: bool = False,
    weight_level: str = "token",
) -> Spec:
    if weight_level not in WEIGHT_LEVELS:
        raise KlestError(
            f"must be one of {', '.join(map(repr, WEIGHT_LEVELS))}, got {weight_level!r}",
            argument="weight_level",
        )
    if weight_level == "sequence" and (weight_clamp is not None or clamp_weighted):
        raise KlestError(
            "a sequence-level weight takes no weight_clamp and no clamp of the weighted value",
            argument="weight_level",
        )
    if weight_level == "sequence" and weight == "gradient_only":
        raise KlestError("weight='gradient_only' is a token-level option", argument="weight_level")
    if gradient not in GRADIENTS:
        raise KlestError(
            f"unknown gradient {gradient!r}; known: {', '.join(GRADIENTS)}", argument="gradient"
        )
    if weight not in WEIGHTS:
        raise KlestError(
            f"must be one of {', '.join(map(repr, WEIGHTS))}, got {weight!r}", argument="weight"
        )
    if weight == "differentiable" and gradient != "as_written":
        raise KlestError(
            "a differentiable importance weight adds the score term v·∇log π to the estimator's "
            "own gradient; it only makes sense with gradient='as_written' (the other options "
            "are already the exact gradients they name)",
            argument="weight",
        )
    if gradient == "sequence_reverse_kl" and old_logp is not None:
        raise KlestError(
            "the sequence-level gradient needs samples of the current policy (per-token "
            "importance weights do not correct a sequence); pass old_logp=None",
            argument="old_logp",
        )
    wc = bounds("weight_clamp", weight_clamp, upper_only=True)
    c = bounds("clamp", clamp)
    vc = bounds("value_clamp", value_clamp)
    for name, b, inside in (("clamp", c, 0.0), ("value_clamp", vc, 0.0), ("weight_clamp", wc, 1.0)):
        if b is not None and not b[0] <= inside <= b[1]:
            raise KlestError(f"bounds {b} must contain {inside}", argument=name)
    return Spec(
        resolve(estimator),
        gradient,
        weight,
        wc,
        c,
        vc,
        clamp_weighted=bool(clamp_weighted),
        clamp_stops_gradient=bool(clamp_stops_gradient),
    )


def _warn_infinite(prep: Prepared, spec: Spec) -> None:
    """In validation mode, say so when π_ref gives a valid token probability 0 and the value
    there (L = -inf, after ``clamp`` and ``value_clamp``) is +inf: the reverse KL's. The forward
    KL and f-divergences with f(0) finite have finite values there (forward_k1: 0,
    forward_k3: 1), and so does any estimator whose log-ratio or value is clamped."""
    if not get_options().validate or prep.ref_finite or prep.traced:
        return
    bad = prep.ref_logp == -torch.inf
    if prep.mask is not None:
        bad = bad & prep.mask
    n = int(bad.sum())
    if not n:
        return
    L0 = torch.tensor([-torch.inf], dtype=torch.float64)
    if spec.clamp is not None:
        L0 = L0.clamp(*spec.clamp)
    at_zero = value(spec.estimator, L0)
    if spec.value_clamp is not None:  # v or w·v (w > 0 finite) clipped: the same bound binds
        at_zero = at_zero.clamp(*spec.value_clamp)
    if bool(torch.isposinf(at_zero).all()):
        warnings.warn(
            f"klest.rl: ref_logp = -inf at {n} valid token(s): the reference gives them "
            "probability 0, so KL(π‖π_ref) is +inf there (values are +inf, not NaN)",
            RuntimeWarning,
            stacklevel=3,
        )


def _weighted_sum(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Σ_b s_b Σ_t x_bt (x is 0 on masked tokens) in float64."""
    x = x.to(torch.float64)
    if scale.ndim == 0:
        return x.sum() * scale
    return (x.sum(dim=-1, keepdim=True) * scale).sum()


def _sequence_weight(
    logp: torch.Tensor, prep: Prepared, spec: Spec
) -> tuple[Prepared, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    r"""Sequence-level importance weight w_b = exp(mean over row b's valid tokens of
    (logp - old_logp)) (TRL's ``importance_sampling_level="sequence"``).

    Returned as an equivalent token-level ``old_logp`` (logp - log w_b), so that the fused term
    computes w_b·v and the gradient with w_b held fixed; for a differentiable weight also
    (log w_b, v, w_b - sg(w_b)) whose product v·(w_b - sg w_b) adds the score term of w_b
    (it couples the tokens of a row, so it goes through autograd)."""
    m = prep.mask
    if prep.old_logp is None:  # on-policy: w_b = exp(mean(logp - sg logp)) = 1, its gradient not 0
        prep = replace(prep, old_logp=prep.logp)
    assert prep.old_logp is not None
    d = prep.logp - prep.old_logp
    if m is not None:
        d = torch.where(m, d, torch.zeros((), dtype=d.dtype, device=d.device))
        n = m.sum(dim=-1, keepdim=True).clamp(min=1).to(d.dtype)
    else:
        n = torch.full_like(d[..., :1], float(max(d.shape[-1], 1)))
    logw = d.sum(dim=-1, keepdim=True) / n
    eff = replace(prep, old_logp=prep.logp - logw)
    if spec.weight != "differentiable":
        return eff, None
    # the same log w_b as a function of logp (autograd), masked twice so padding cannot leak NaN
    lp = logp.to(prep.dtype)
    diff = lp - prep.old_logp
    if m is not None:
        diff = torch.where(m, diff, torch.zeros((), dtype=diff.dtype, device=diff.device))
    logw_g = (diff.sum(dim=-1, keepdim=True) / n).to(torch.float64)
    # w_b − sg(w_b) written as sg(w_b)·(log w_b − sg log w_b): value exactly 0 (no inf − inf
    # where e^{log w_b} overflows float32), gradient w_b·∇log w_b
    dw = torch.exp(logw_g.detach()) * (logw_g - logw_g.detach())
    bare = replace(prep, old_logp=None)
    v, _ = compute(bare, replace(spec, gradient="none", weight="detached"), None, None)
    return eff, (logw, v, dw)


def kl_per_token(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    estimator: Any = "k3",
    gradient: str = "reverse_kl",
    weight: str = "detached",
    weight_clamp: Any = None,
    clamp: Any = None,
    value_clamp: Any = None,
    clamp_weighted: bool = False,
    clamp_stops_gradient: bool = False,
    weight_level: str = "token",
) -> torch.Tensor:
    """Per-token KL term [batch, seq] with the value of ``estimator`` and the chosen gradient.

    Value (per token): w·v(L) (v(L) with ``weight="gradient_only"``), 0 on masked tokens;
    derivative with respect to ``logp``: see the module table. Reduce it with
    :func:`klest.rl.aggregate`; :func:`kl_loss` does both in one fused step. All presets are built
    on this function.
    """
    spec = _spec(
        estimator,
        gradient,
        weight,
        weight_clamp,
        clamp,
        value_clamp,
        old_logp,
        clamp_weighted,
        clamp_stops_gradient,
        weight_level,
    )
    prep = prepare(logp, ref_logp, old_logp, mask)
    _warn_infinite(prep, spec)
    if weight_level == "sequence":
        prep, extra = _sequence_weight(logp, prep, spec)
        out = apply(logp, prep, replace(spec, weight="detached"), None, None)
        if extra is None:
            return out
        _, v, dw = extra  # v·(w_b - sg w_b): value + 0, gradient v·∇w_b (the score of w_b)
        return out + (v * dw).to(out.dtype)
    return apply(logp, prep, spec, None, None)


def kl_penalty(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    estimator: Any = "k1",
    clamp: Any = None,
    value_clamp: Any = None,
) -> torch.Tensor:
    r"""Detached per-token KL penalty for the reward: ``reward_t - β · kl_penalty(...)_t``.

    .. math:: \text{k1: } \ell_t = \log\pi(y_t|y_{<t}) - \log\pi_{ref}(y_t|y_{<t})

    The default k1 in the reward, with returns that sum the future (reward-to-go, as PPO/GAE with
    γ = λ = 1 or REINFORCE do, see :func:`reward_to_go`), gives a policy gradient that follows the
    sequence reverse KL exactly. k3 in the reward follows ∇KL(π‖π_ref) - ∇KL(π_ref‖π) per token
    (biased); k2 in the reward is unbiased only for ½E[ℓ²]. Masked tokens are 0.

    >>> import torch, klest.rl
    >>> klest.rl.kl_penalty(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]]))
    tensor([[ 0.5000, -1.0000]])
    """
    spec = _spec(estimator, "none", "detached", None, clamp, value_clamp, None)
    prep = prepare(logp, ref_logp, None, mask)
    _warn_infinite(prep, spec)
    out, _ = compute(prep, spec, None, None, differentiable=prep.traced)
    return out


def kl_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    estimator: Any = "k3",
    gradient: str = "reverse_kl",
    aggregation: Aggregation = "token-mean",
    weight: str = "detached",
    weight_clamp: Any = None,
    clamp: Any = None,
    value_clamp: Any = None,
    clamp_weighted: bool = False,
    clamp_stops_gradient: bool = False,
    weight_level: str = "token",
    horizon: int | None = None,
    distributed: bool | None = None,
    group: Any = None,
    diagnostics: bool = True,
) -> KLLoss:
    r"""A scalar KL loss term (add ``β · loss`` to the policy loss) and its diagnostics.

    .. math::
        \text{loss} = \sum_{b,t} s_b m_{bt} w_{bt} v(L_{bt}), \qquad
        \partial\,\text{loss} / \partial\,\text{logp}_{bt} = s_b m_{bt} w_{bt} c_{bt}

    s_b from ``aggregation`` (:mod:`klest.rl.aggregate`, distributed-aware), v from ``estimator``,
    c from ``gradient`` (module table). The default, k3 value with the reverse-KL gradient, reports
    an unbiased low-variance KL(π‖π_ref) and its gradient follows ∇KL(π‖π_ref) per token, exactly.

    Fused: one pass, one tensor saved for backward (the per-token derivative), whatever the
    options; diagnostics cost a few more reductions (``diagnostics=False`` skips them).

    >>> import torch, klest.rl
    >>> logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    >>> out = klest.rl.kl_loss(logp, torch.tensor([[-1.1, -1.8, -0.5]]))
    >>> round(out.loss.item(), 6), round(out.diagnostics.as_dict()["kl/std"], 6)
    (0.008747, 0.011224)
    >>> out.loss.backward(); logp.grad  # ℓ / N: the reverse-KL gradient
    tensor([[ 0.0333, -0.0667, -0.0000]])
    """
    spec = _spec(
        estimator,
        gradient,
        weight,
        weight_clamp,
        clamp,
        value_clamp,
        old_logp,
        clamp_weighted,
        clamp_stops_gradient,
        weight_level,
    )
    prep = prepare(logp, ref_logp, old_logp, mask)
    _warn_infinite(prep, spec)
    extra = None
    if weight_level == "sequence":
        prep, extra = _sequence_weight(logp, prep, spec)
    scale = aggregation_scale(
        tuple(prep.logp.shape),
        prep.mask,
        aggregation,
        horizon=horizon,
        distributed=distributed,
        group=group,
        dtype=torch.float64,
        device=prep.logp.device,
    )
    # under torch.func transforms the diagnostics would be wrapped tensors leaking out: none
    stats: dict[str, torch.Tensor] | None = {} if diagnostics and not prep.traced else None
    if weight_level == "sequence":  # w_b's own gradient is added below, through autograd
        spec = replace(spec, weight="detached")
    loss = apply(logp, prep, spec, scale, stats)
    if extra is not None:
        _, v, dw = extra
        loss = loss + _weighted_sum(v * dw, scale).to(loss.dtype)
    diag = KLDiagnostics(**stats) if stats is not None else None
    return KLLoss(loss, diag)
