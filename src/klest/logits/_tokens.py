r"""Log-probs of given tokens and the entropy per position, streamed over row chunks.

With x the (temperature-scaled) logit row, m = max x, c = log Σ_v e^{x_v − m}, p = softmax x:

.. math::

    \log p_t = (x_t - m) - c, \qquad H = -\sum_v p_v \log p_v,

    \frac{\partial \log p_t}{\partial x_v} = [v = t] - p_v, \qquad
    \frac{\partial H}{\partial x_v} = -p_v(\log p_v + H).

With several tokens per row (the top-k indices K) the same pass also gives the exact mass of
the rest, R = Σ_{v∉K} p_v (summed over the rest, not 1 − Σ_K p: no cancellation), with
∂ log R/∂x_v = p_v (1[v∉K]/R − 1).

The normaliser is kept relative to the row maximum (m, c), never as m + c, which rounds c away
when |m| ≫ c (:mod:`klest.logits._kl`). Forward saves m, c, H and R per row; backward recomputes
p chunk by chunk.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._kl import (
    apply_floor,
    buffers,
    gather,
    grad_buffer,
    local_norm,
    log_norm,
    merge_norm,
    softmax_rows,
    store,
    target,
    valid_rows,
)
from ._kl import scaled as _scaled
from ._rows import Group, Plan, raise_bad_rows, safe_max
from ._twice import check_world, regrad, take, token_rows, valid_index

__all__ = ["TokenFunction"]

_NEG = -math.inf


def local_stats(
    x: torch.Tensor,
    tok: torch.Tensor,
    bp: torch.Tensor,
    bq: torch.Tensor | None,
    offset: int,
    entropy: bool,
    rest: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(m, c, log p_K (float64, −inf where a token is on another shard), H, R, careful) of one
    chunk, this shard normalised on its own. ``tok`` [n, k]."""
    m = torch.amax(x, dim=-1)
    p = torch.softmax(x, -1, out=bp)
    c = log_norm(p)
    here, local = here_ids(tok, offset, x.shape[-1])
    ms = safe_max(m)
    f64 = torch.float64
    xt = (x.gather(1, local) - ms[:, None]).to(f64) - c[:, None]  # (x_t − m) − c
    xt = torch.where(here, xt, torch.full_like(xt, _NEG))
    careful = bool((m == _NEG).any())
    if careful:  # an all −inf row (on this shard): no mass here
        p.masked_fill_(x == _NEG, 0.0)
        c = torch.where(m == _NEG, torch.full_like(c, _NEG), c)
        xt = torch.where((m == _NEG)[:, None], torch.full_like(xt, _NEG), xt)
    H = torch.zeros_like(m)
    if entropy:
        assert bq is not None
        logp = torch.sub(x, ms[:, None], out=bq).sub_(c.to(x.dtype)[:, None])
        H = -torch.linalg.vecdot(p, logp)
        careful = careful or bool(torch.isnan(H).any())
        if careful:  # −inf logits: p_v log p_v = 0 there
            p.masked_fill_(x == _NEG, 0.0)
            logp.masked_fill_(x == _NEG, 0.0)
            H = -torch.linalg.vecdot(p, logp)
    R = torch.zeros_like(m)
    if rest:
        pk = p.gather(1, local)
        p.scatter_add_(1, local, torch.where(here, -pk, torch.zeros_like(pk)))  # p_K = 0 exactly
        R = p.sum(-1)
    return m, c, xt, H, R, careful


def here_ids(tok: torch.Tensor, offset: int, vocab_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which ids fall in [offset, offset + vocab_local), and their local index (0 for others)."""
    local = tok - offset
    here = (local >= 0) & (local < vocab_local)
    return here, torch.where(here, local, torch.zeros_like(local))


class TokenFunction(torch.autograd.Function):
    """(log p_K [N, k], H [N], log R [N]) per row of x = a·inv_t."""

    @staticmethod
    def forward(
        ctx: Any,
        a: torch.Tensor,
        tokens: torch.Tensor,
        plan: Plan,
        segs: list[tuple[int, torch.Tensor]],
        inv_t: float,
        g: Group,
        cdt: torch.dtype,
        entropy: bool,
        rest: bool,
        floor: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = a.device
        N = plan.n_rows
        bufs = buffers(plan, a.shape[-1], cdt, dev, 2 if entropy else 1)
        bp, bq = bufs[0], (bufs[1] if entropy else None)
        f64 = torch.float64
        m = torch.zeros(N, dtype=cdt, device=dev)
        lse = torch.zeros(N, dtype=f64, device=dev)
        xt = torch.zeros(tokens.shape, dtype=f64, device=dev)
        H = torch.zeros(N, dtype=cdt, device=dev)
        R = torch.ones(N, dtype=cdt, device=dev)
        careful = torch.zeros(N, dtype=torch.bool)
        for c in plan.chunks:
            lo, hi = c
            x = apply_floor(_scaled(plan.block(segs, c), cdt, inv_t), _part(floor, c))
            n = hi - lo
            out = local_stats(
                x, tokens[lo:hi], bp[:n], None if bq is None else bq[:n], g.offset, entropy, rest
            )
            m[lo:hi], lse[lo:hi], xt[lo:hi], H[lo:hi], R[lo:hi], care = out
            if care:
                careful[lo:hi] = True
        raise_bad_rows("logits", a, m, g)
        LSE, lp, HH, RR, w = _combine(m, lse, xt, H, R, g)
        HH = HH.to(f64).clamp_min(0.0) + 0.0  # ≥ 0 exactly, and +0 (not -0) for a one-hot row
        RR = RR.to(f64)
        if not plan.all_valid:
            valid = valid_rows(plan, dev)
            lp = torch.where(valid[:, None], lp, torch.zeros_like(lp))
            HH = torch.where(valid, HH, torch.zeros_like(HH))
            RR = torch.where(valid, RR, torch.ones_like(RR))
        ctx.save_for_backward(a, tokens, m, LSE, HH, RR)
        ctx.outside = lp == _NEG if floor is not None else None
        ctx.w = w
        ctx.plan, ctx.segs, ctx.inv_t, ctx.cdt, ctx.g = plan, segs, inv_t, cdt, g
        ctx.careful, ctx.entropy, ctx.rest, ctx.floor = careful, entropy, rest, floor
        outs = (lp.to(cdt), HH.to(cdt), torch.log(RR).to(cdt))
        if not entropy:
            ctx.mark_non_differentiable(outs[1])
        if not rest:
            ctx.mark_non_differentiable(outs[2])
        return outs

    @staticmethod
    def backward(
        ctx: Any, g_lp: torch.Tensor, g_h: torch.Tensor | None, g_r: torch.Tensor | None
    ) -> tuple[Any, ...]:
        a, tokens, M, LSE, HH, RR = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 10
        if torch.is_grad_enabled():  # create_graph: a differentiable recomputation
            ga2 = _token_twice(ctx, a, tokens, g_lp, g_h, g_r)
            return ga2, *([None] * 9)
        plan: Plan = ctx.plan
        cdt = ctx.cdt
        g: Group = ctx.g
        inv_t = ctx.inv_t
        f64 = torch.float64
        gl = g_lp.to(f64)
        if ctx.floor is not None:  # a token outside the kept set: log-prob −inf whatever x is
            gl = torch.where(ctx.outside, torch.zeros_like(gl), gl)
        gh = None if (g_h is None or not ctx.entropy) else g_h.reshape(-1).to(cdt)
        gr = None if (g_r is None or not ctx.rest) else g_r.reshape(-1).to(f64)
        # out = p ⊙ (c1 − g_H (log p + H)) − (g_R/R) p 1[v∈K] + Σ_j g_j 1[v = K_j],
        # c1 = −Σ_j g_j − g_R + g_R/R (the last term only off K)
        G = gl.sum(-1)
        over_r = None
        if gr is not None:
            G = G + gr
            over_r = torch.where(gr == 0, torch.zeros_like(gr), gr / RR)
        c1 = (-G if over_r is None else over_r - G).to(cdt)
        over_rc = None if over_r is None else over_r.to(cdt)
        glc = gl.to(cdt)
        ga = grad_buffer(a, plan)
        (bp,) = buffers(plan, a.shape[-1], cdt, a.device, 1)
        lse = LSE.to(cdt)
        M = safe_max(M)
        H = HH.to(cdt)
        w = ctx.w
        for c in plan.chunks:
            lo, hi = c
            x = apply_floor(_scaled(plan.block(ctx.segs, c), cdt, inv_t), _part(ctx.floor, c))
            careful = bool(ctx.careful[lo:hi].any())
            out = target(ga, c, cdt)
            wc = None if w is None else w[lo:hi]
            if gh is None:
                p = softmax_rows(x, out, wc, careful)
                pk = p.gather(1, here_ids(tokens[lo:hi], g.offset, x.shape[-1])[1])
                out.mul_(c1[lo:hi, None])
            else:
                p = softmax_rows(x, bp[: hi - lo], wc, careful)
                pk = p.gather(1, here_ids(tokens[lo:hi], g.offset, x.shape[-1])[1])
                torch.sub(x, M[lo:hi, None], out=out)
                out.sub_(lse[lo:hi, None]).add_(H[lo:hi, None])
                if careful:
                    out.masked_fill_(x == _NEG, 0.0)
                out.mul_(-gh[lo:hi, None]).add_(c1[lo:hi, None]).mul_(p)
            here, local = here_ids(tokens[lo:hi], g.offset, x.shape[-1])
            add = glc[lo:hi]
            if over_rc is not None:
                add = add - over_rc[lo:hi, None] * pk
            out.scatter_add_(1, local, torch.where(here, add, torch.zeros_like(add)))
            if inv_t != 1.0:
                out.mul_(inv_t)
            store(ga, c, out)
        return ga, *([None] * 9)


def _part(f: torch.Tensor | None, c: tuple[int, int]) -> torch.Tensor | None:
    return None if f is None else f[c[0] : c[1]]


def _token_twice(
    ctx: Any,
    a: torch.Tensor,
    tokens: torch.Tensor,
    g_lp: torch.Tensor,
    g_h: torch.Tensor | None,
    g_r: torch.Tensor | None,
) -> torch.Tensor | None:
    """Backward with ``create_graph`` (:mod:`klest.logits._twice`)."""
    check_world(ctx.g)
    idx = valid_index(ctx.plan, a.device)
    gh = g_h if ctx.entropy else None
    gr = g_r if ctx.rest else None

    fl = None if ctx.floor is None or idx is None else ctx.floor[idx]
    fl = ctx.floor if idx is None else fl

    def value() -> list[torch.Tensor | None]:
        x = apply_floor(take(a, idx).to(ctx.cdt) * ctx.inv_t, fl)
        tok = tokens if idx is None else tokens[idx]
        return list(token_rows(x, tok, ctx.entropy, ctx.rest))

    g_lp = g_lp if ctx.outside is None else torch.where(ctx.outside, 0.0, g_lp)
    ups = [None if u is None else take(u, idx) for u in (g_lp, gh, gr)]
    return regrad(value, [a], [True], ups)[0]


def merge_tokens(
    every: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole-row (M, C, log p_K, H, R, rel) from S disjoint parts of the vocabulary, ``every``
    [S, N, k + 4] holding each part's (m_s, c_s, log p_K,s, H_s, R_s), each normalised on its
    own (log p_K,s = −inf for a token not in the part), rel_s = log of part s's share of the
    mass (:func:`merge_norm`): log p_K = max_s (log p_K,s + rel_s) (one part holds the token),
    H = Σ_s w_s (H_s − rel_s), R = Σ_s w_s R_s, w_s = e^{rel_s}."""
    M, C, e = merge_norm(every[:, :, 0], every[:, :, 1])
    wr = torch.exp(e)
    zero = torch.zeros_like(wr)
    Hs = torch.where(wr > 0, wr * (every[:, :, 2 + k] - e), zero).sum(0)
    Rs = torch.where(wr > 0, wr * every[:, :, 3 + k], zero).sum(0)
    lpk = torch.amax(every[:, :, 2 : 2 + k] + e[:, :, None], 0)
    return M, C, lpk, Hs, Rs, e


def pack_tokens(
    m: torch.Tensor, c: torch.Tensor, lpk: torch.Tensor, H: torch.Tensor, R: torch.Tensor
) -> torch.Tensor:
    """[N, k + 4] float64 rows (m, c, log p_K, H, R) for :func:`merge_tokens`."""
    f64 = torch.float64
    cols = [m.to(f64)[:, None], c.to(f64)[:, None], lpk.to(f64), H.to(f64)[:, None]]
    return torch.cat([*cols, R.to(f64)[:, None]], 1)


def _combine(
    m: torch.Tensor,
    c: torch.Tensor,
    lpk: torch.Tensor,
    H: torch.Tensor,
    R: torch.Tensor,
    g: Group,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Whole-vocabulary (c relative to this shard's max m, log p_K, H, R) from each shard's, and
    this shard's share of the mass (None when the vocabulary is not sharded)."""
    if g.world == 1:
        return c, lpk, H, R, None
    M, C, LPK, HH, RR, e = merge_tokens(gather(g, pack_tokens(m, c, lpk, H, R)), lpk.shape[1])
    return local_norm(M, C, m), LPK, HH, RR, torch.exp(e[g.rank])
