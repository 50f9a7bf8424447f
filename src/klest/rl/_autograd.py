r"""The fused per-token KL term: one pass computes the value and the gradient coefficient.

For a policy log-prob ``logp`` the output (per token, or already reduced with the aggregation
weights s_b m_t) has value ``w·v(L)`` (``v(L)`` with ``weight="gradient_only"``) and derivative
``g = s_b m_t · w · c`` with respect to ``logp``, where c is the chosen gradient coefficient (see
:mod:`klest.rl.penalty`). Only g is allocated for backward: one tensor of the computation dtype,
whatever the estimator, clamps and weights; the inputs are kept by reference so that a double
backward (``create_graph=True``) can recompute g as a differentiable function of ``logp``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any

import torch

from ._inputs import Bounds, Prepared, traced
from ._kernels import Estimator, Moments, k3_blocks, moments, slope, v_minus_slope, value
from .aggregate import reward_to_go

__all__ = ["GRADIENTS", "WEIGHTS", "WEIGHT_LEVELS", "Spec", "apply", "compute"]

GRADIENTS = ("reverse_kl", "forward_kl", "as_written", "sequence_reverse_kl", "none")
WEIGHTS = ("detached", "differentiable", "gradient_only")
WEIGHT_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class Spec:
    estimator: Estimator
    gradient: str
    weight: str  # "detached" | "differentiable" | "gradient_only" (w scales g, not the value)
    weight_clamp: Bounds | None = None
    clamp: Bounds | None = None
    value_clamp: Bounds | None = None
    clamp_weighted: bool = False  # value_clamp clips w·v (gradient 0 where it binds), not v
    clamp_stops_gradient: bool = False  # where the L clamp binds the gradient is 0, score included


def _either(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a | b


def _zero(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def _times(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w·x, exactly 0 where x = 0: every weight is a positive number, so a w that overflowed to
    +inf times 0 is 0, not NaN."""
    return torch.where(x == 0, _zero(w), w * x)


def compute(
    prep: Prepared,
    spec: Spec,
    scale: torch.Tensor | None,
    stats: dict[str, torch.Tensor] | None,
    differentiable: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(output, g): the per-token values (scale None) or their weighted sum, and d output/d logp
    per token (None when the gradient is "none"). Runs without autograd, or, with
    ``differentiable`` (``prep.logp`` then carries the graph; used for double backward and under
    ``torch.func``), out of place so that autograd can differentiate g itself: the weight keeps
    its gradient only with ``weight="differentiable"`` (a detached weight stays detached)."""
    with contextlib.nullcontext() if differentiable else torch.no_grad():
        cdt = prep.dtype
        m = prep.mask
        L = torch.sub(prep.ref_logp, prep.logp)  # a fresh tensor, owned here
        if m is not None:  # padding can hold anything: never let it in
            if differentiable:
                L = torch.where(m, L, _zero(L))
            else:
                torch.where(m, L, _zero(L), out=L)
        L_raw = L
        est = spec.estimator
        as_written = spec.gradient == "as_written"
        clipped = vclipped = wclipped = None
        if spec.clamp is not None:
            lo, hi = spec.clamp
            clipped = (L < lo) | (L > hi)
            L = L.clamp(lo, hi)
        sums_only = (
            scale is not None
            and est == "k3"
            and prep.old_logp is None
            and spec.value_clamp is None
            and spec.weight == "detached"
            and not differentiable
        )
        # the fused loss needs only Σ_t v (and the moments): reduce k3 block by block in float64
        mom: Moments | None = None
        if sums_only:
            v, mom = k3_blocks(L, m, stats is not None)
        else:
            v = value(est, L)
        dv = slope(est, L) if as_written else None
        if dv is not None and clipped is not None:
            dv = torch.where(clipped, _zero(dv), dv)
        if spec.value_clamp is not None and not spec.clamp_weighted:
            lo, hi = spec.value_clamp
            vclipped = (v < lo) | (v > hi)
            v = v.clamp(lo, hi)
            if dv is not None:
                dv = torch.where(vclipped, _zero(dv), dv)

        c: torch.Tensor | None
        if spec.gradient == "reverse_kl":
            c = None  # -L_raw, formed last (in place) once nothing else needs L_raw
        elif spec.gradient == "forward_kl":
            c = v_minus_slope("forward_k3", L_raw)  # -(r - 1): the table's record of forward_k3
        elif spec.gradient == "sequence_reverse_kl":
            c = reward_to_go(-L_raw, m)
        elif as_written:
            assert dv is not None
            c = -dv
        else:
            c = None

        w = w_raw = None
        if prep.old_logp is not None:
            logw = prep.logp - prep.old_logp
            if spec.weight != "differentiable":
                logw = logw.detach()
            if m is not None:
                logw = torch.where(m, logw, _zero(logw))
            # in float64: e^{logw} overflows float32 past logw = 88.7 (w·v may still be finite)
            w = w_raw = torch.exp(logw.to(torch.float64))
            if spec.weight_clamp is not None:
                lo, hi = spec.weight_clamp
                wclipped = (w < lo) | (w > hi)
                w = w.clamp(lo, hi)

        vw = v if w is None or spec.weight == "gradient_only" else _times(w, v)
        if spec.value_clamp is not None and spec.clamp_weighted:
            lo, hi = spec.value_clamp
            vclipped = (vw < lo) | (vw > hi)
            vw = vw.clamp(lo, hi)
        if stats is not None:
            if mom is None:
                mom = moments(vw, m)
            _diagnostics(stats, mom, m, L_raw, w_raw, clipped, vclipped, wclipped)
        if scale is None:
            out = vw.to(cdt)
            if m is not None:  # exactly +0 on masked tokens (k1 would give -0.0 there)
                out = torch.where(m, out, _zero(out))
        elif sums_only:
            out = (vw * scale).sum().to(cdt)
        elif scale.ndim == 0:
            out = (vw.sum(dtype=torch.float64) * scale).to(cdt)
        else:
            out = (vw.sum(dim=-1, keepdim=True, dtype=torch.float64) * scale).sum().to(cdt)
        if spec.gradient == "reverse_kl":
            # c = -L_raw: reuse L_raw's buffer when no other tensor still refers to it
            if (
                L is L_raw
                and spec.value_clamp is None
                and w is None
                and scale is not None
                and not differentiable
            ):
                c = L_raw.neg_()
            else:
                c = -L_raw
        g: torch.Tensor | None = None
        if spec.weight == "differentiable":
            # d(w·v)/dlogp = w·(v - v'(L)): score term v plus pathwise term -v' (as_written only).
            # v - v' is taken in closed form (k3: -L exactly, where v and v' are both ~e^L).
            assert c is not None
            g = v_minus_slope(est, L).to(cdt)
            # pathwise term zeroed by a clamp: score only
            off = _either(clipped, None if spec.clamp_weighted else vclipped)
            if off is not None:
                g = torch.where(off, v.to(cdt), g)
            if wclipped is not None:  # clipped weight: no score term, pathwise only
                g = torch.where(wclipped, c, g)
            if w is not None:
                g = _times(w, g)
        elif c is not None:
            g = c if w is None else _times(w, c)
        if g is not None and (spec.weight == "differentiable" or as_written):
            if spec.clamp_weighted and vclipped is not None:  # d clip(w·v) = 0 where it binds
                g = torch.where(vclipped, _zero(g), g)
            if spec.clamp_stops_gradient and clipped is not None:
                g = torch.where(clipped, _zero(g), g)
        if g is not None and m is not None and (spec.weight == "differentiable" or as_written):
            g = torch.where(m, g, _zero(g))  # e.g. k1's slope is 1 even where L = 0
        if g is not None and scale is not None:
            s = scale.to(cdt)
            in_place = g is c and g is L_raw and s.ndim == 0 and not differentiable
            g = g.mul_(s) if in_place else g * s
        return out, (None if g is None else g.to(cdt))


def _diagnostics(
    stats: dict[str, torch.Tensor],
    mom: Moments,
    m: torch.Tensor | None,
    L: torch.Tensor,
    w: torch.Tensor | None,
    clipped: torch.Tensor | None,
    vclipped: torch.Tensor | None,
    wclipped: torch.Tensor | None,
) -> None:
    f64 = torch.float64
    n, mean, m2, n_inf = mom
    n1 = n.clamp(min=1.0)
    var = m2 / (n - 1).clamp(min=1.0)
    std = torch.where(n_inf > 0, torch.full_like(var, torch.inf), var.sqrt())
    zero = torch.zeros((), dtype=f64, device=L.device)

    def frac(cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            return zero
        if m is not None:
            cond = cond & m
        return torch.count_nonzero(cond).to(f64) / n1

    if w is None:
        ess = n
    else:
        wd = w.to(f64)
        if m is not None:
            wd = torch.where(m, wd, _zero(wd))
        s2 = (wd * wd).sum()
        ess = torch.where(s2 > 0, wd.sum() ** 2 / s2.clamp(min=1e-300), zero)
    if L.numel():
        lo, hi = torch.aminmax(L)  # masked entries hold 0
        max_abs = torch.maximum(-lo, hi).to(f64)
    else:
        max_abs = zero
    stats.update(
        n_tokens=n,
        mean=torch.where(n > 0, mean, zero),
        std=std,
        frac_clamped=frac(clipped),
        frac_value_clamped=frac(vclipped),
        frac_weight_clamped=frac(wclipped),
        max_abs_log_ratio=max_abs,
        ess=ess,
        n_infinite=n_inf,
    )


class _KLTerm(torch.autograd.Function):
    """The fused term. First-order backward multiplies by the saved g; under ``create_graph``
    (double backward: Hessian-vector products, TRPO) g is recomputed as a function of logp so
    that autograd differentiates it. ``setup_context`` style with a generated vmap rule, so
    ``torch.func.grad`` and ``vmap`` work (under a transform the forward runs out of place,
    with no host reads)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        logp: torch.Tensor,
        lp_c: torch.Tensor,
        ref: torch.Tensor,
        old: torch.Tensor | None,
        mask: torch.Tensor | None,
        scale: torch.Tensor | None,
        meta: tuple[Prepared, Spec, dict[str, torch.Tensor] | None],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # every tensor is an explicit input (not hidden in ``meta``), as vmap's rule needs
        prep0, spec, stats = meta
        prep = replace(prep0, logp=lp_c, ref_logp=ref, old_logp=old, mask=mask)
        wrapped = traced(logp, lp_c, ref, old, mask, scale)
        out, g = compute(prep, spec, scale, None if wrapped else stats, differentiable=wrapped)
        assert g is not None
        return out, g.detach()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        logp, _, ref, old, mask, scale, (prep0, spec, _) = inputs
        _, g = output
        ctx.mark_non_differentiable(g)
        ctx.save_for_backward(g, logp, ref, old, mask, scale)
        ctx.prep0, ctx.spec = prep0, spec

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, _grad_g: Any) -> tuple[Any, ...]:
        g, logp, ref, old, mask, scale = ctx.saved_tensors
        if torch.is_grad_enabled() and logp.requires_grad:  # create_graph: g as a function of logp
            prep = replace(
                ctx.prep0, logp=logp.to(ctx.prep0.dtype), ref_logp=ref, old_logp=old, mask=mask
            )
            _, g = compute(prep, ctx.spec, scale, None, differentiable=True)
            assert g is not None
        grad = (grad_out.to(g.dtype) * g).to(logp.dtype)
        return grad, None, None, None, None, None, None


def apply(
    logp: torch.Tensor,
    prep: Prepared,
    spec: Spec,
    scale: torch.Tensor | None,
    stats: dict[str, torch.Tensor] | None,
) -> torch.Tensor:
    """The fused term with autograd to ``logp`` (or a detached result for gradient "none")."""
    if spec.gradient == "none" or not (logp.requires_grad and torch.is_grad_enabled()):
        out, _ = compute(prep, spec, scale, stats, differentiable=prep.traced)
        return out
    out, _ = _KLTerm.apply(
        logp, prep.logp, prep.ref_logp, prep.old_logp, prep.mask, scale, (prep, spec, stats)
    )
    assert isinstance(out, torch.Tensor)
    return out
