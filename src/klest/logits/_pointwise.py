r"""Generalised Jensen-Shannon and total variation between two softmaxes, streamed over rows.

P = softmax(y) (the reference π_ref), Q = softmax(x) (the policy π), t = log P − log Q.

**Total variation** TV = ½ Σ |P − Q|; with s = sign(Q − P) (0 where equal),
∂TV/∂x = ½ Q ⊙ (s − Σ Q s), ∂TV/∂y = −½ P ⊙ (s − Σ P s).

**Generalised JSD** (math.md §6), M = βP + (1 − β)Q,

.. math::

    D_\beta = \frac{\beta\,\mathrm{KL}(P\|M) + (1-\beta)\,\mathrm{KL}(Q\|M)}{\beta(1-\beta)}
            = -\frac{1}{1-\beta}\sum P\,v - \frac{1}{\beta}\sum Q\,u,

u = log(M/Q) = log1p(β expm1(t)), v = log(M/P) = u − t (for β > ½ v is computed first, by the
mirror formula, and u = v + t: the small side never cancels). ∂D/∂x = Q ⊙ (h − Σ Q h) with
h = −u/β; ∂D/∂y = P ⊙ (k − Σ P k) with k = −v/(1 − β). Saved per row: lse_x, lse_y, Σ Q h, Σ P k.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._kl import buffers, gather, grad_buffer, lse_from_softmax, read_pair, store, target
from ._kl import valid_rows as _valid_rows
from ._rows import Group, Plan, raise_bad_rows

__all__ = ["PointwiseFunction"]

_NEG = -math.inf
_T0 = 20.0  # above this log-ratio, e^t ≫ 1 and the logaddexp form is exact to rounding


def log_mix_ratio(t: torch.Tensor, w: float, out: torch.Tensor) -> torch.Tensor:
    """log((1 − w) + w e^t) without cancellation: log1p(w expm1(t)) for t ≤ 20, else
    log w + t + log1p((1 − w) e^{−t} / w). t = −inf gives log(1 − w); t = +inf gives +inf."""
    torch.clamp(t, max=_T0, out=out)
    out.expm1_().mul_(w).log1p_()
    big = t > _T0
    if bool(big.any()):
        hi = torch.logaddexp(torch.full_like(t, math.log1p(-w)), t + math.log(w))
        out.copy_(torch.where(big, hi, out))
    return out


def _probs(
    x: torch.Tensor,
    y: torch.Tensor,
    bp: torch.Tensor,
    bq: torch.Tensor,
    lse: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q, P, lse_x, lse_y): whole-vocabulary probabilities of this chunk (float64 lse).

    ``lse`` None: this shard is the whole vocabulary, the softmax normalises it."""
    if lse is None:
        Q = torch.softmax(x, -1, out=bp)
        P = torch.softmax(y, -1, out=bq)
        lx = lse_from_softmax(torch.amax(x, dim=-1), Q)
        ly = lse_from_softmax(torch.amax(y, dim=-1), P)
        return Q, P, lx, ly
    lx, ly = lse
    Q = torch.sub(x, lx.to(x.dtype)[:, None], out=bp).exp_()
    P = torch.sub(y, ly.to(y.dtype)[:, None], out=bq).exp_()
    return Q, P, lx, ly


def _log_ratio(
    x: torch.Tensor, y: torch.Tensor, lx: torch.Tensor, ly: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """t = log P − log Q = (y − x) − (lse_y − lse_x)."""
    torch.sub(y, x, out=out)
    return out.sub_((ly - lx).to(out.dtype)[:, None])


def _jsd_terms(
    x: torch.Tensor,
    y: torch.Tensor,
    Q: torch.Tensor,
    P: torch.Tensor,
    lx: torch.Tensor,
    ly: torch.Tensor,
    beta: float,
    bt: torch.Tensor,
    bu: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v) with zeros where Q = 0 (in u) and where P = 0 (in v): each is only ever multiplied
    by its own weight."""
    t = _log_ratio(x, y, lx, ly, bt)
    if beta <= 0.5:
        u = log_mix_ratio(t, beta, bu)
        v = torch.sub(u, t, out=bt)
    else:
        t.neg_()  # log Q − log P
        v = log_mix_ratio(t, 1.0 - beta, bu)
        u = torch.sub(v, t, out=bt)
    # one side masks a token the other gives mass: t = ±inf and u − t or v + t is inf − inf;
    # the limits are v = log(M/P) = log β where Q = 0 and u = log(M/Q) = log(1 − β) where P = 0
    v.masked_fill_(x == _NEG, math.log(beta))
    u.masked_fill_(y == _NEG, math.log1p(-beta))
    u.masked_fill_(x == _NEG, 0.0)
    v.masked_fill_(y == _NEG, 0.0)
    return u, v


class PointwiseFunction(torch.autograd.Function):
    """Per-row ``kind`` ∈ {"jsd", "tv"} between Q = softmax(a·inv_t) and P = softmax(b·inv_t)."""

    @staticmethod
    def forward(
        ctx: Any,
        a: torch.Tensor,
        b: torch.Tensor,
        plan: Plan,
        segs: tuple[list[tuple[int, torch.Tensor]], list[tuple[int, torch.Tensor]]],
        kind: str,
        beta: float,
        inv_t: float,
        g: Group,
        cdt: torch.dtype,
    ) -> torch.Tensor:
        dev = a.device
        N = plan.n_rows
        f64 = torch.float64
        bp, bq, bt, bu = buffers(plan, a.shape[-1], cdt, dev, 4)
        lse = _global_lse(a, b, plan, segs, inv_t, g, cdt, bp)
        LX = torch.zeros(N, dtype=f64, device=dev)
        LY = torch.zeros(N, dtype=f64, device=dev)
        sums = torch.zeros(N, 3, dtype=f64, device=dev)  # value, A = Σ Q h, B = Σ P k
        maxima = torch.zeros(2, N, dtype=cdt, device=dev)
        for c in plan.chunks:
            lo, hi = c
            n = hi - lo
            x, y = read_pair(plan, segs, c, cdt, inv_t, False)
            given = None if lse is None else (lse[0][lo:hi], lse[1][lo:hi])
            Q, P, lx, ly = _probs(x, y, bp[:n], bq[:n], given)
            LX[lo:hi], LY[lo:hi] = lx, ly
            if lse is None:
                maxima[0, lo:hi] = torch.amax(x, dim=-1)
                maxima[1, lo:hi] = torch.amax(y, dim=-1)
            if kind == "tv":
                s = torch.sub(Q, P, out=bt[:n]).sign_()
                A = torch.linalg.vecdot(Q, s)
                B = torch.linalg.vecdot(P, s)
                val = 0.5 * (A - B)
            else:
                u, v = _jsd_terms(x, y, Q, P, lx, ly, beta, bt[:n], bu[:n])
                A = -torch.linalg.vecdot(Q, u) / beta  # Σ Q h
                B = -torch.linalg.vecdot(P, v) / (1.0 - beta)  # Σ P k
                val = A + B
            sums[lo:hi] = torch.stack([val, A, B], 1).to(f64)
        if lse is None:
            raise_bad_rows("logits", a, maxima[0], g)
            raise_bad_rows("ref_logits", b, maxima[1], g)
        else:
            LX, LY = lse
        g.sum_(sums)
        val = sums[:, 0].clamp_min(0.0)
        if not plan.all_valid:
            val = torch.where(_valid_rows(plan, dev), val, torch.zeros_like(val))
        ctx.save_for_backward(a, b, LX, LY, sums[:, 1].clone(), sums[:, 2].clone())
        ctx.plan, ctx.segs, ctx.kind, ctx.beta, ctx.inv_t, ctx.cdt = (
            plan,
            segs,
            kind,
            beta,
            inv_t,
            cdt,
        )
        ctx.sharded = lse is not None
        return val.to(cdt)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        a, b, LX, LY, A, B = ctx.saved_tensors
        plan: Plan = ctx.plan
        cdt = ctx.cdt
        beta = ctx.beta
        ga = grad_buffer(a, plan) if ctx.needs_input_grad[0] else None
        gb = grad_buffer(b, plan) if ctx.needs_input_grad[1] else None
        scale = (grad.reshape(-1).to(torch.float64) * ctx.inv_t).to(cdt)
        bp, bq, bt, bu = buffers(plan, a.shape[-1], cdt, a.device, 4)
        Ac, Bc = A.to(cdt), B.to(cdt)
        for c in plan.chunks:
            lo, hi = c
            n = hi - lo
            x, y = read_pair(plan, ctx.segs, c, cdt, ctx.inv_t, False)
            Q, P, lx, ly = _probs(x, y, bp[:n], bq[:n], (LX[lo:hi], LY[lo:hi]))
            s = scale[lo:hi, None]
            if ctx.kind == "tv":
                sg = torch.sub(Q, P, out=bt[:n]).sign_()
                if ga is not None:
                    out = target(ga, c, cdt)
                    torch.sub(sg, Ac[lo:hi, None], out=out).mul_(Q).mul_(0.5 * s)
                    store(ga, c, out)
                if gb is not None:
                    out = target(gb, c, cdt)
                    torch.sub(sg, Bc[lo:hi, None], out=out).mul_(P).mul_(-0.5 * s)
                    store(gb, c, out)
                continue
            u, v = _jsd_terms(x, y, Q, P, lx, ly, beta, bt[:n], bu[:n])
            if ga is not None:  # Q ⊙ (−u/β − A)
                out = target(ga, c, cdt)
                torch.mul(u, -1.0 / beta, out=out).sub_(Ac[lo:hi, None]).mul_(Q).mul_(s)
                store(ga, c, out)
            if gb is not None:  # P ⊙ (−v/(1−β) − B)
                out = target(gb, c, cdt)
                torch.mul(v, -1.0 / (1.0 - beta), out=out).sub_(Bc[lo:hi, None]).mul_(P).mul_(s)
                store(gb, c, out)
        return ga, gb, None, None, None, None, None, None, None


def _global_lse(
    a: torch.Tensor,
    b: torch.Tensor,
    plan: Plan,
    segs: tuple[list[tuple[int, torch.Tensor]], list[tuple[int, torch.Tensor]]],
    inv_t: float,
    g: Group,
    cdt: torch.dtype,
    buf: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Whole-vocabulary lse of both rows (float64) when the vocabulary is sharded (a first pass
    and one all-gather); None otherwise (the softmax of each chunk is already global)."""
    if g.world == 1:
        return None
    dev = a.device
    N = plan.n_rows
    m = torch.zeros(2, N, dtype=cdt, device=dev)
    lse = torch.full((2, N), _NEG, dtype=torch.float64, device=dev)
    for c in plan.chunks:
        lo, hi = c
        x, y = read_pair(plan, segs, c, cdt, inv_t, False)
        for i, z in enumerate((x, y)):
            m[i, lo:hi] = torch.amax(z, dim=-1)
            p = torch.softmax(z, -1, out=buf[: hi - lo])
            lse[i, lo:hi] = lse_from_softmax(m[i, lo:hi], p)  # NaN on an all −inf shard row
    raise_bad_rows("logits", a, m[0], g)
    raise_bad_rows("ref_logits", b, m[1], g)
    lse = torch.where(m == _NEG, torch.full_like(lse, _NEG), lse)
    L = torch.logsumexp(gather(g, lse), 0)
    return L[0], L[1]
