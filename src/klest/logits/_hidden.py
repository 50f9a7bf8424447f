r"""The output layer fused in: logits = hidden @ weightᵀ computed block by block, never [N, V].

Rows are taken in chunks of ``chunk_size`` positions and the vocabulary in chunks of
``vocab_chunk_size`` entries; each block of logits [rows, vocab chunk] is reduced to a few floats
per row (its own lse and KL, or lse, token logit and entropy) and the blocks of a row are merged
exactly as the shards of a vocabulary-parallel row are (:func:`merge_kl`, :func:`merge_tokens`).
Backward recomputes each block, forms its gradient w.r.t. the logits and accumulates
∂/∂hidden += G · weight_block and ∂/∂weight_block += Gᵀ · hidden_chunk.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._kl import _combine as _combine_kl
from ._kl import _local_stats, merge_kl, valid_rows
from ._rows import Group, Plan, raise_bad_rows, safe_max
from ._tokens import _combine as _combine_tokens
from ._tokens import here_ids, local_stats, merge_tokens, pack_tokens
from ._twice import check_world, inf_rule, kl_rows, regrad, take, token_rows, valid_index

__all__ = ["KLHiddenFunction", "TokenHiddenFunction"]

_NEG = -math.inf


class _Blocks:
    """Scratch buffers for blocks of at most ``rows`` × ``cols`` elements, viewed contiguously."""

    def __init__(self, rows: int, cols: int, k: int, cdt: torch.dtype, dev: torch.device) -> None:
        self.bufs = [torch.empty(rows * cols, dtype=cdt, device=dev) for _ in range(k)]

    def get(self, i: int, n: int, v: int) -> torch.Tensor:
        return self.bufs[i][: n * v].view(n, v)


def _logits(
    h: torch.Tensor, W: torch.Tensor, inv_t: float, cdt: torch.dtype, out: torch.Tensor
) -> torch.Tensor:
    """(h @ Wᵀ) · inv_t in ``cdt``, into ``out``."""
    torch.matmul(h.to(cdt), W.to(cdt).T, out=out)
    if inv_t != 1.0:
        out.mul_(inv_t)
    return out


def _logits_g(h: torch.Tensor, W: torch.Tensor, inv_t: float, cdt: torch.dtype) -> torch.Tensor:
    """(h @ Wᵀ) · inv_t in ``cdt``, out of place (differentiable)."""
    return (h.to(cdt) @ W.to(cdt).T) * inv_t


def _vchunks(V: int, vc: int) -> list[tuple[int, int]]:
    return [(s, min(s + vc, V)) for s in range(0, V, vc)]


def _rows_max(plan: Plan) -> int:
    return max((c[1] - c[0] for c in plan.chunks), default=1)


class KLHiddenFunction(torch.autograd.Function):
    """KL(softmax(x)‖softmax(y)) per row, x = h Wᵀ·inv_t, y = h_r W_rᵀ·inv_t (swapped when
    ``swap``)."""

    @staticmethod
    def forward(
        ctx: Any,
        h: torch.Tensor,
        W: torch.Tensor,
        hr: torch.Tensor,
        Wr: torch.Tensor,
        plan: Plan,
        swap: bool,
        inv_t: float,
        g: Group,
        cdt: torch.dtype,
        vc: int,
    ) -> torch.Tensor:
        dev = h.device
        N = plan.n_rows
        V = W.shape[0]
        (hx, Wx), (hy, Wy) = ((hr, Wr), (h, W)) if swap else ((h, W), (hr, Wr))
        f64 = torch.float64
        bl = _Blocks(_rows_max(plan), min(vc, V), 4, cdt, dev)
        mx = torch.zeros(N, dtype=f64, device=dev)
        my = torch.zeros(N, dtype=f64, device=dev)
        LX = torch.zeros(N, dtype=f64, device=dev)
        LY = torch.zeros(N, dtype=f64, device=dev)
        KL = torch.zeros(N, dtype=f64, device=dev)
        for lo, hi in plan.chunks:
            n = hi - lo
            parts = []
            for vs, ve in _vchunks(V, vc):
                x = _logits(hx[lo:hi], Wx[vs:ve], inv_t, cdt, bl.get(0, n, ve - vs))
                y = _logits(hy[lo:hi], Wy[vs:ve], inv_t, cdt, bl.get(1, n, ve - vs))
                a, b, lx, ly, kl, _ = _local_stats(
                    x, y, bl.get(2, n, ve - vs), bl.get(3, n, ve - vs)
                )
                parts.append(torch.stack([a.to(f64), lx, b.to(f64), ly, kl.to(f64)], 0))
            mx[lo:hi], LX[lo:hi], my[lo:hi], LY[lo:hi], KL[lo:hi] = merge_kl(torch.stack(parts, 0))
        names = ("ref_hidden", "hidden") if swap else ("hidden", "ref_hidden")
        raise_bad_rows(names[0], hx, mx, g)
        raise_bad_rows(names[1], hy, my, g)
        LX, LY, KL, _, _ = _combine_kl(mx, my, LX, LY, KL, g)
        KL = KL.clamp_min(0.0)
        if not plan.all_valid:
            KL = torch.where(valid_rows(plan, dev), KL, torch.zeros_like(KL))
        ctx.save_for_backward(h, W, hr, Wr, LX, LY, KL, safe_max(mx), safe_max(my))
        ctx.plan, ctx.swap, ctx.inv_t, ctx.cdt, ctx.vc = plan, swap, inv_t, cdt, vc
        ctx.g = g
        return KL.to(cdt)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        h, W, hr, Wr, LX, LY, KL, MX, MY = ctx.saved_tensors
        plan: Plan = ctx.plan
        if torch.is_grad_enabled():  # create_graph: a differentiable recomputation
            check_world(ctx.g)
            finite = torch.isfinite(KL)
            idx = valid_index(plan, h.device)
            idx = torch.nonzero(finite).flatten() if idx is None else idx[finite[idx]]
            up = grad.reshape(-1)

            def value() -> list[torch.Tensor]:
                x = _logits_g(take(h, idx), W, ctx.inv_t, ctx.cdt)
                y = _logits_g(take(hr, idx), Wr, ctx.inv_t, ctx.cdt)
                return [kl_rows(y, x) if ctx.swap else kl_rows(x, y)]

            out = regrad(value, [h, W, hr, Wr], ctx.needs_input_grad[:4], [up[idx]])
            rows_bad = ~finite
            out = [inf_rule(o, rows_bad, up) if i in (0, 2) else o for i, o in enumerate(out)]
            return (*out, None, None, None, None, None, None)
        cdt, inv_t, vc = ctx.cdt, ctx.inv_t, ctx.vc
        need = ctx.needs_input_grad[:4]
        tensors = (h, W, hr, Wr)
        acc = [torch.zeros(t.shape, dtype=cdt, device=t.device) if n else None
               for t, n in zip(tensors, need, strict=True)]  # fmt: skip
        # x side = (h, W) unless swapped
        ix = (2, 3) if ctx.swap else (0, 1)
        iy = (0, 1) if ctx.swap else (2, 3)
        need_x = need[ix[0]] or need[ix[1]]
        need_y = need[iy[0]] or need[iy[1]]
        (hx, Wx), (hy, Wy) = (tensors[ix[0]], tensors[ix[1]]), (tensors[iy[0]], tensors[iy[1]])
        V = W.shape[0]
        scale = (grad.reshape(-1).to(torch.float64) * inv_t).to(cdt)
        shift = (LX - LY + KL).to(cdt)  # log X − log Y − KL = (x − m_x) − (y − m_y) − shift
        lx, ly = LX.to(cdt), LY.to(cdt)
        mx, my = MX.to(cdt), MY.to(cdt)
        bl = _Blocks(_rows_max(plan), min(vc, V), 4, cdt, h.device)
        for lo, hi in plan.chunks:
            n = hi - lo
            s = scale[lo:hi, None]
            hxc, hyc = hx[lo:hi].to(cdt), hy[lo:hi].to(cdt)
            for vs, ve in _vchunks(V, vc):
                m = ve - vs
                x = _logits(hxc, Wx[vs:ve], inv_t, cdt, bl.get(0, n, m))
                y = _logits(hyc, Wy[vs:ve], inv_t, cdt, bl.get(1, n, m))
                x.sub_(mx[lo:hi, None])  # shifted by the row maxima from here on
                y.sub_(my[lo:hi, None])
                p = torch.sub(x, lx[lo:hi, None], out=bl.get(2, n, m)).exp_()
                if need_x:  # G = p ⊙ ((x − m_x) − (y − m_y) − shift) · s
                    G = torch.sub(x, y, out=bl.get(3, n, m))
                    G.sub_(shift[lo:hi, None]).mul_(p).mul_(s)
                    _accumulate(acc, ix, G, hxc, Wx[vs:ve], lo, hi, vs, ve, cdt)
                if need_y:  # G = (q − p) · s
                    G = torch.sub(y, ly[lo:hi, None], out=bl.get(3, n, m)).exp_()
                    G.sub_(p).mul_(s)
                    _accumulate(acc, iy, G, hyc, Wy[vs:ve], lo, hi, vs, ve, cdt)
        grads = [None if a is None else a.to(t.dtype) for a, t in zip(acc, tensors, strict=True)]
        return (*grads, None, None, None, None, None, None)


def _accumulate(
    acc: list[torch.Tensor | None],
    idx: tuple[int, int],
    G: torch.Tensor,
    hc: torch.Tensor,
    Wv: torch.Tensor,
    lo: int,
    hi: int,
    vs: int,
    ve: int,
    cdt: torch.dtype,
) -> None:
    """∂/∂hidden[lo:hi] += G · W_v and ∂/∂W_v += Gᵀ · hidden[lo:hi] (the logits' inv_t is in G)."""
    gh, gW = acc[idx[0]], acc[idx[1]]
    if gh is not None:
        gh[lo:hi].addmm_(G, Wv.to(cdt))
    if gW is not None:
        gW[vs:ve].addmm_(G.T, hc)


class TokenHiddenFunction(torch.autograd.Function):
    """(log p_t, H) per row of x = h Wᵀ·inv_t."""

    @staticmethod
    def forward(
        ctx: Any,
        h: torch.Tensor,
        W: torch.Tensor,
        tokens: torch.Tensor,
        plan: Plan,
        inv_t: float,
        g: Group,
        cdt: torch.dtype,
        entropy: bool,
        vc: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dev = h.device
        N = plan.n_rows
        V = W.shape[0]
        f64 = torch.float64
        bl = _Blocks(_rows_max(plan), min(vc, V), 3, cdt, dev)
        m = torch.zeros(N, dtype=f64, device=dev)
        LSE = torch.zeros(N, dtype=f64, device=dev)
        XT = torch.zeros(N, 1, dtype=f64, device=dev)
        HH = torch.zeros(N, dtype=f64, device=dev)
        for lo, hi in plan.chunks:
            n = hi - lo
            parts = []
            for vs, ve in _vchunks(V, vc):
                x = _logits(h[lo:hi], W[vs:ve], inv_t, cdt, bl.get(0, n, ve - vs))
                mm, lse, xt, H, R, _ = local_stats(
                    x,
                    tokens[lo:hi],
                    bl.get(1, n, ve - vs),
                    bl.get(2, n, ve - vs),
                    g.offset + vs,
                    entropy,
                    False,
                )
                parts.append(pack_tokens(mm, lse, xt, H, R))
            m[lo:hi], LSE[lo:hi], XT[lo:hi], HH[lo:hi], _, _ = merge_tokens(
                torch.stack(parts, 0), 1
            )
        raise_bad_rows("hidden", h, m, g)
        LSE, XT, HH, _, _ = _combine_tokens(m, LSE, XT, HH, torch.ones_like(HH), g)
        lp = XT[:, 0]
        HH = HH.clamp_min(0.0)
        if not plan.all_valid:
            valid = valid_rows(plan, dev)
            lp = torch.where(valid, lp, torch.zeros_like(lp))
            HH = torch.where(valid, HH, torch.zeros_like(HH))
        ctx.save_for_backward(h, W, tokens, safe_max(m), LSE, HH)
        ctx.plan, ctx.inv_t, ctx.cdt, ctx.g, ctx.entropy, ctx.vc = plan, inv_t, cdt, g, entropy, vc
        outs = (lp.to(cdt), HH.to(cdt))
        if not entropy:
            ctx.mark_non_differentiable(outs[1])
        return outs

    @staticmethod
    def backward(ctx: Any, g_lp: torch.Tensor, g_h: torch.Tensor | None) -> tuple[Any, ...]:
        h, W, tokens, M, LSE, HH = ctx.saved_tensors
        plan: Plan = ctx.plan
        if torch.is_grad_enabled():  # create_graph: a differentiable recomputation
            check_world(ctx.g)
            idx = valid_index(plan, h.device)
            gH = g_h if ctx.entropy else None

            def value() -> list[torch.Tensor | None]:
                x = _logits_g(take(h, idx), W, ctx.inv_t, ctx.cdt)
                tok = tokens if idx is None else tokens[idx]
                lpk, H, _ = token_rows(x, tok, ctx.entropy, False)
                return [lpk[:, 0], H]

            ups = [take(g_lp.reshape(-1), idx), None if gH is None else take(gH.reshape(-1), idx)]
            out = regrad(value, [h, W], ctx.needs_input_grad[:2], ups)
            return (*out, None, None, None, None, None, None, None)
        cdt, inv_t, vc, g = ctx.cdt, ctx.inv_t, ctx.vc, ctx.g
        need_h, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh_acc = torch.zeros(h.shape, dtype=cdt, device=h.device) if need_h else None
        gW_acc = torch.zeros(W.shape, dtype=cdt, device=W.device) if need_W else None
        acc = [gh_acc, gW_acc]
        gl = g_lp.reshape(-1).to(cdt)
        gH = None if (g_h is None or not ctx.entropy) else g_h.reshape(-1).to(cdt)
        lse, H, mc = LSE.to(cdt), HH.to(cdt), M.to(cdt)
        V = W.shape[0]
        bl = _Blocks(_rows_max(plan), min(vc, V), 2, cdt, h.device)
        for lo, hi in plan.chunks:
            n = hi - lo
            hc = h[lo:hi].to(cdt)
            for vs, ve in _vchunks(V, vc):
                mcols = ve - vs
                x = _logits(hc, W[vs:ve], inv_t, cdt, bl.get(0, n, mcols))
                G = torch.sub(x, mc[lo:hi, None], out=bl.get(1, n, mcols))
                G.sub_(lse[lo:hi, None])  # log p = (x − m) − c
                if gH is None:  # −g_l p
                    G.exp_().mul_(-gl[lo:hi, None])
                else:  # −p ⊙ (g_l + g_H (log p + H))
                    x.copy_(G).exp_()  # p (x is no longer needed)
                    G.add_(H[lo:hi, None]).mul_(gH[lo:hi, None]).add_(gl[lo:hi, None])
                    G.mul_(x).neg_()
                here, local = here_ids(tokens[lo:hi], g.offset + vs, mcols)
                add = torch.where(here, gl[lo:hi, None], torch.zeros_like(gl[lo:hi, None]))
                G.scatter_add_(1, local, add)
                if inv_t != 1.0:
                    G.mul_(inv_t)
                _accumulate(acc, (0, 1), G, hc, W[vs:ve], lo, hi, vs, ve, cdt)
        grads = [None if a is None else a.to(t.dtype) for a, t in zip(acc, (h, W), strict=True)]
        return (*grads, None, None, None, None, None, None, None)
