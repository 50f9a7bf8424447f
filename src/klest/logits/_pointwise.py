r"""Generalised Jensen-Shannon and total variation between two softmaxes, streamed over rows.

P = softmax(y) (the reference π_ref), Q = softmax(x) (the policy π), t = log P − log Q.

**Total variation** TV = ½ Σ |P − Q|; with s = sign(Q − P) (0 where equal),
∂TV/∂x = ½ Q ⊙ (s − Σ Q s), ∂TV/∂y = −½ P ⊙ (s − Σ P s).

**Generalised JSD** (math.md §6), M = βP + (1 − β)Q,

.. math::

    D_\beta = \frac{\beta\,\mathrm{KL}(P\|M) + (1-\beta)\,\mathrm{KL}(Q\|M)}{\beta(1-\beta)}
            = -\frac{1}{1-\beta}\sum P\,v - \frac{1}{\beta}\sum Q\,u,

u = log(M/Q), v = log(M/P), h = −u/β, k = −v/(1 − β): D = Σ Q h + Σ P k,
∂D/∂x = Q ⊙ (h − Σ Q h), ∂D/∂y = P ⊙ (k − Σ P k). Nothing is divided by β: for β ≤ ½, with
z = β expm1(t) and φ(z) = log1p(z)/z (φ(0) = 1),

.. math::

    Q h = -(P - Q)\,\varphi(z), \qquad v = \log\big(\beta + (1-\beta)e^{-t}\big),

both bounded whatever β (1e-320 included: no 1/β overflows, no 0·∞); for t > 20, z is formed in
log space, log z = log β + log expm1(t), and φ = softplus(log z)·e^{−log z}. For β > ½ the same with
the roles of P and Q (and of β and 1 − β) exchanged. t is formed from logits shifted by their row
maxima, t = (y − m_y) − (x − m_x) − (c_y − c_x) (:mod:`klest.logits._kl`). Saved per row:
m_x, m_y, c_x, c_y, Σ Q h, Σ P k.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._kl import (
    buffers,
    gather,
    grad_buffer,
    local_norm,
    log_norm,
    merge_norm,
    read_pair,
    store,
    target,
)
from ._kl import valid_rows as _valid_rows
from ._mix import jsd_entries
from ._rows import Group, Plan, raise_bad_rows, safe_max
from ._twice import check_world, pointwise_rows, regrad, take, valid_index

__all__ = ["PointwiseFunction"]

_NEG = -math.inf


def _log_ratio(
    x: torch.Tensor,
    y: torch.Tensor,
    mx: torch.Tensor,
    my: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """t = log P − log Q = ((y − m_y) − (x − m_x)) − (c_y − c_x)."""
    mx, my = safe_max(mx), safe_max(my)
    torch.sub(y, my.to(y.dtype)[:, None], out=out)
    out.sub_(x - mx.to(x.dtype)[:, None])  # both shifted first: x − y alone loses digits
    return out.sub_((cy - cx).to(out.dtype)[:, None])


def _jsd_terms(
    x: torch.Tensor,
    y: torch.Tensor,
    Q: torch.Tensor,
    P: torch.Tensor,
    norms: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    beta: float,
    bt: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q h, P k) per entry (h = −u/β, k = −v/(1 − β)), 0 where the weight is 0 by a −inf
    logit."""
    mx, my, cx, cy = norms
    t = _log_ratio(x, y, mx, my, cx, cy, bt)
    return jsd_entries(t, x == _NEG, y == _NEG, Q, P, beta)


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
        bp, bq, bt = buffers(plan, a.shape[-1], cdt, dev, 3)
        given = _global_norm(a, b, plan, segs, inv_t, g, cdt, bp)
        norms = torch.zeros(4, N, dtype=f64, device=dev) if given is None else given
        sums = torch.zeros(N, 3, dtype=f64, device=dev)  # value, A = Σ Q h, B = Σ P k
        for c in plan.chunks:
            lo, hi = c
            n = hi - lo
            x, y = read_pair(plan, segs, c, cdt, inv_t, False)
            Q, P, nm = _probs(x, y, bp[:n], bq[:n], None if given is None else given[:, lo:hi])
            norms[:, lo:hi] = torch.stack(nm, 0)
            val, A, B = _row_terms(kind, x, y, Q, P, nm, beta, bt[:n])
            sums[lo:hi] = torch.stack([val, A, B], 1).to(f64)
        if given is None:
            raise_bad_rows("logits", a, norms[0], g)
            raise_bad_rows("ref_logits", b, norms[1], g)
        g.sum_(sums)
        val = sums[:, 0].clamp_min(0.0)
        if not plan.all_valid:
            val = torch.where(_valid_rows(plan, dev), val, torch.zeros_like(val))
        ctx.save_for_backward(a, b, norms, sums[:, 1].clone(), sums[:, 2].clone())
        ctx.plan, ctx.segs, ctx.kind, ctx.beta, ctx.inv_t, ctx.cdt, ctx.g = (
            plan,
            segs,
            kind,
            beta,
            inv_t,
            cdt,
            g,
        )
        return val.to(cdt)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        a, b, norms, A, B = ctx.saved_tensors
        plan: Plan = ctx.plan
        cdt = ctx.cdt
        beta = ctx.beta
        if torch.is_grad_enabled():  # create_graph: a differentiable recomputation
            check_world(ctx.g)
            idx = valid_index(plan, a.device)

            def value() -> list[torch.Tensor]:
                x = take(a, idx).to(cdt) * ctx.inv_t
                y = take(b, idx).to(cdt) * ctx.inv_t
                return [pointwise_rows(x, y, ctx.kind, beta)]

            need = ctx.needs_input_grad[:2]
            ga2, gb2 = regrad(value, [a, b], need, [take(grad.reshape(-1), idx)])
            return ga2, gb2, None, None, None, None, None, None, None
        ga = grad_buffer(a, plan) if ctx.needs_input_grad[0] else None
        gb = grad_buffer(b, plan) if ctx.needs_input_grad[1] else None
        scale = (grad.reshape(-1).to(torch.float64) * ctx.inv_t).to(cdt)
        bp, bq, bt = buffers(plan, a.shape[-1], cdt, a.device, 3)
        Ac, Bc = A.to(cdt), B.to(cdt)
        for c in plan.chunks:
            lo, hi = c
            n = hi - lo
            x, y = read_pair(plan, ctx.segs, c, cdt, ctx.inv_t, False)
            Q, P, nm = _probs(x, y, bp[:n], bq[:n], norms[:, lo:hi])
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
            qh, pk = _jsd_terms(x, y, Q, P, nm, beta, bt[:n])
            if ga is not None:  # Q ⊙ (h − A) = Q h − Q A
                out = target(ga, c, cdt)
                torch.mul(Q, Ac[lo:hi, None], out=out).neg_().add_(qh).mul_(s)
                store(ga, c, out)
            if gb is not None:  # P ⊙ (k − B)
                out = target(gb, c, cdt)
                torch.mul(P, Bc[lo:hi, None], out=out).neg_().add_(pk).mul_(s)
                store(gb, c, out)
        return ga, gb, None, None, None, None, None, None, None


Norms = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _probs(
    x: torch.Tensor,
    y: torch.Tensor,
    bp: torch.Tensor,
    bq: torch.Tensor,
    given: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, Norms]:
    """(Q, P, (m_x, m_y, c_x, c_y)): whole-vocabulary probabilities of this chunk, row maxima
    and normalisers relative to them (float64).

    ``given`` None: this shard is the whole vocabulary, the softmax normalises it."""
    if given is None:
        Q = torch.softmax(x, -1, out=bp)
        P = torch.softmax(y, -1, out=bq)
        mx = torch.amax(x, dim=-1).to(torch.float64)
        my = torch.amax(y, dim=-1).to(torch.float64)
        return Q, P, (mx, my, log_norm(Q), log_norm(P))
    mx, my, cx, cy = given.unbind(0)
    Q = torch.sub(x, safe_max(mx).to(x.dtype)[:, None], out=bp)
    Q.sub_(cx.to(x.dtype)[:, None]).exp_()
    P = torch.sub(y, safe_max(my).to(y.dtype)[:, None], out=bq)
    P.sub_(cy.to(y.dtype)[:, None]).exp_()
    return Q, P, (mx, my, cx, cy)


def _row_terms(
    kind: str,
    x: torch.Tensor,
    y: torch.Tensor,
    Q: torch.Tensor,
    P: torch.Tensor,
    nm: Norms,
    beta: float,
    bt: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(value, A, B) of one chunk's rows (this shard's part of the sums)."""
    if kind == "tv":
        s = torch.sub(Q, P, out=bt).sign_()
        A = torch.linalg.vecdot(Q, s)
        B = torch.linalg.vecdot(P, s)
        return 0.5 * (A - B), A, B
    qh, pk = _jsd_terms(x, y, Q, P, nm, beta, bt)
    A = qh.sum(-1)  # Σ Q h
    B = pk.sum(-1)  # Σ P k
    return A + B, A, B


def _global_norm(
    a: torch.Tensor,
    b: torch.Tensor,
    plan: Plan,
    segs: tuple[list[tuple[int, torch.Tensor]], list[tuple[int, torch.Tensor]]],
    inv_t: float,
    g: Group,
    cdt: torch.dtype,
    buf: torch.Tensor,
) -> torch.Tensor | None:
    """[4, N] float64 (m_x, m_y, c_x, c_y) of both rows, m this shard's maxima and c the
    whole-vocabulary normaliser relative to them, when the vocabulary is sharded (a first pass
    and one all-gather); None otherwise (the softmax of each chunk is already global)."""
    if g.world == 1:
        return None
    dev = a.device
    N = plan.n_rows
    f64 = torch.float64
    m = torch.zeros(2, N, dtype=f64, device=dev)
    c = torch.full((2, N), _NEG, dtype=f64, device=dev)
    for ch in plan.chunks:
        lo, hi = ch
        x, y = read_pair(plan, segs, ch, cdt, inv_t, False)
        for i, z in enumerate((x, y)):
            m[i, lo:hi] = torch.amax(z, dim=-1).to(f64)
            c[i, lo:hi] = log_norm(torch.softmax(z, -1, out=buf[: hi - lo]))  # NaN if all −inf
    raise_bad_rows("logits", a, m[0], g)
    raise_bad_rows("ref_logits", b, m[1], g)
    c = torch.where(m == _NEG, torch.full_like(c, _NEG), c)
    every = gather(g, torch.stack([m, c], 0))  # [S, 2, 2, N]
    out = torch.empty(4, N, dtype=f64, device=dev)
    for i in range(2):
        M, C, _ = merge_norm(every[:, 0, i], every[:, 1, i])
        out[i] = m[i]
        out[2 + i] = local_norm(M, C, m[i])
    return out
