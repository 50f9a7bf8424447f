r"""Exact full-vocabulary KL between two softmaxes, streamed over row chunks (math.md §6).

With x, y the two (temperature-scaled) logit rows, X = softmax x, Y = softmax y,
m_x = max x, S_x = Σ e^{x - m_x} (likewise for y), c_x = log S_x:

.. math::

    \mathrm{KL}(X\|Y) = \frac{1}{S_x}\sum_v e^{x_v - m_x}\big((x_v - m_x) - (y_v - m_y)\big)
                        - \log S_x + \log S_y

(the shifts by the row maxima keep large logits from cancelling). Every log-probability is formed as
log X_v = (x_v − m_x) − c_x: the normaliser is kept *relative to the row maximum* (m_x, c_x), never
as the absolute log-sum-exp m_x + c_x, whose rounding loses c_x entirely when |m_x| ≫ c_x (a row of
−1e17 in float64, or finfo.min: log X_v would come out 0 instead of −log V). Backward recomputes X
and Y chunk by chunk from a few saved floats per row (m_x, m_y, c_x, c_y, KL):
∂KL/∂x = X ⊙ (log X − log Y − KL), ∂KL/∂y = Y − X.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import numpy as np
import torch

from .._config import claim_fast
from .._stream import ordered_map
from ._rows import Group, Plan, raise_bad_rows, safe_max
from ._twice import check_world, inf_rule, kl_rows, regrad, take, valid_index

__all__ = ["KLFunction"]

_NEG = -math.inf


def log_norm(p: torch.Tensor) -> torch.Tensor:
    """c = log Σ_v e^{x_v − m} (m = max x) from the softmax p: max_v p_v = 1/Σ e^{x − m} exactly
    (up to one rounding), so c = −log max p. In float64; NaN for an all −inf row."""
    return -torch.log(torch.amax(p, dim=-1).to(torch.float64))


def merge_norm(m: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M, C, rel) of a row split into S disjoint parts, from each part's (m_s, c_s) ([S, N],
    float64): M = max_s m_s, C = log Σ_s e^{(m_s − M) + c_s} (so log p_v = (x_v − M) − C), and
    rel_s = (m_s − M) + c_s − C = log of part s's share of the mass (−inf for a part with none).
    Only differences of maxima and the O(log V) c's are ever added: no absolute log-sum-exp."""
    M = torch.amax(m, 0)
    Ms = safe_max(M)
    e = torch.where(m == _NEG, torch.full_like(c, _NEG), (m - Ms) + c)
    C = torch.logsumexp(e, 0)
    return M, C, e - C


def row_dot(p: torch.Tensor, d: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """Σ_v p_v d_v per row; through ``scratch`` (a chunk buffer) when given, so that no
    chunk-sized temporary is allocated."""
    if scratch is None:
        return torch.linalg.vecdot(p, d)
    return torch.mul(p, d, out=scratch).sum(-1)


def _local_stats(
    x: torch.Tensor,
    y: torch.Tensor,
    bp: torch.Tensor,
    bq: torch.Tensor,
    scratch: torch.Tensor | None = None,
    q_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(m_x, m_y, c_x, c_y, KL, careful) of one chunk (this shard's part of the vocabulary
    normalised on its own), with softmax(x) left in ``bp``, log X − log Y in ``bq`` and, when
    ``q_out`` is given, softmax(y) in it. ``careful``: some row holds −inf logits (or is all
    −inf)."""
    mx = torch.amax(x, dim=-1)
    my = torch.amax(y, dim=-1)
    p = torch.softmax(x, -1, out=bp)
    q = torch.softmax(y, -1, out=bq if q_out is None else q_out)
    lx = log_norm(p)
    ly = log_norm(q)
    # log p − log q = (x − m_x) − (y − m_y) − (log S_x − log S_y): the shifted logits keep the
    # digits that x − y would lose to rounding when a logit is large (x_v = 1e4: 6e-4 of KL)
    d = log_ratio_rows(x, y, mx, my, lx, ly, bq, scratch)
    kl = row_dot(p, d, scratch)
    careful = bool(torch.isnan(kl).any())
    if careful:
        # −inf logits: p_v = 0 contributes 0 whatever y_v is; p_v > 0 with y_v = −inf is +inf.
        # A row that is −inf everywhere (on this shard) has no mass here: it contributes 0.
        dead = mx == _NEG
        lx = torch.where(dead, torch.full_like(lx, _NEG), lx)
        ly = torch.where(my == _NEG, torch.full_like(ly, _NEG), ly)
        p.masked_fill_(x == _NEG, 0.0)
        d.masked_fill_(x == _NEG, 0.0)
        if q_out is not None:
            q_out.masked_fill_(y == _NEG, 0.0)
        kl = row_dot(p, d, scratch)
        inf_rows = ((y == _NEG) & (x > _NEG)).any(-1)
        kl = torch.where(inf_rows, torch.full_like(kl, math.inf), kl)
        kl = torch.where(dead, torch.zeros_like(kl), kl)
    return mx, my, lx, ly, kl, careful


def log_ratio_rows(
    x: torch.Tensor,
    y: torch.Tensor,
    mx: torch.Tensor,
    my: torch.Tensor,
    lx: torch.Tensor,
    ly: torch.Tensor,
    out: torch.Tensor,
    scratch: torch.Tensor | None,
) -> torch.Tensor:
    """log X − log Y = (x − m_x) − (y − m_y) − (c_x − c_y) into ``out`` (m: a per-row reference,
    e.g. the row max; c = log Σ e^{x − m} relative to it, float64). The shifted logits keep the
    digits that x − y loses to rounding when a logit is large (x_v = 1e4 cost 6e-4 of the KL);
    an all −inf row's m counts as 0 (its entries are masked by the caller)."""
    mx, my = safe_max(mx), safe_max(my)
    u = torch.sub(y, my[:, None], out=scratch) if scratch is not None else y - my[:, None]
    d = torch.sub(x, mx[:, None], out=out)
    return d.sub_(u).sub_((lx - ly).to(d.dtype)[:, None])


def merge_kl(
    every: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole-row (m_x, c_x, m_y, c_y, KL) from S disjoint parts of the vocabulary, ``every``
    [S, 5, N] (float64) holding each part's own (m_x,s, c_x,s, m_y,s, c_y,s, KL_s) (each part
    normalised on its own), with rel_s = log of part s's share (:func:`merge_norm`):

    KL = Σ_s w_s (KL_s + rel_x,s − rel_y,s), w_s = e^{rel_x,s}."""
    MX, CX, ex = merge_norm(every[:, 0], every[:, 1])
    MY, CY, ey = merge_norm(every[:, 2], every[:, 3])
    w = torch.exp(ex)
    terms = torch.where(w > 0, w * (every[:, 4] + ex - ey), torch.zeros_like(w))
    return MX, CX, MY, CY, terms.sum(0)


def gather(g: Group, mine: torch.Tensor) -> torch.Tensor:
    """[world, *mine.shape]: every rank's ``mine`` (one all-gather)."""
    import torch.distributed as dist

    flat = mine.contiguous().reshape(1, -1)
    every = torch.empty((g.world, flat.shape[1]), dtype=mine.dtype, device=mine.device)
    dist.all_gather_into_tensor(every, flat, group=g.handle)
    return every.view(g.world, *mine.shape)


def local_norm(M: torch.Tensor, C: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The whole row's normaliser relative to this part's own maximum m: log p_v = (x_v − m) −
    (C + (M − m)); 0 where the part holds no mass (m = −inf; its entries are masked)."""
    md = m.to(torch.float64)
    return torch.where(md == _NEG, torch.zeros_like(C), C + (M - md))


def _combine(
    mx: torch.Tensor,
    my: torch.Tensor,
    lx: torch.Tensor,
    ly: torch.Tensor,
    kl: torch.Tensor,
    g: Group,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Whole-vocabulary (c_x, c_y, KL) from every shard's own, the c's relative to this shard's
    maxima (m_x, m_y), and the shard's weights w_x = its share of X's mass, w_y (None when the
    vocabulary is not sharded): one all-gather of 5 floats per row."""
    if g.world == 1:
        return lx, ly, kl, None, None
    f64 = torch.float64
    mine = torch.stack([mx.to(f64), lx.to(f64), my.to(f64), ly.to(f64), kl.to(f64)], 0)
    every = gather(g, mine)
    MX, CX, MY, CY, KL = merge_kl(every)
    _, _, relx = merge_norm(every[:, 0], every[:, 1])
    _, _, rely = merge_norm(every[:, 2], every[:, 3])
    cx, cy = local_norm(MX, CX, mx), local_norm(MY, CY, my)
    return cx, cy, KL, torch.exp(relx[g.rank]), torch.exp(rely[g.rank])


class KLFunction(torch.autograd.Function):
    """KL(softmax(x)‖softmax(y)) per row; (x, y) = (a, b)·inv_t, or (b, a)·inv_t when ``swap``.
    ``grad_mode``: whether autograd records the call (``torch.is_grad_enabled()`` at the caller;
    forward itself always runs without it)."""

    @staticmethod
    def forward(
        ctx: Any,
        a: torch.Tensor,
        b: torch.Tensor,
        plan: Plan,
        segs: tuple[list[tuple[int, torch.Tensor]], list[tuple[int, torch.Tensor]]],
        swap: bool,
        inv_t: float,
        g: Group,
        cdt: torch.dtype,
        grad_mode: bool = True,
        floors: Floors = None,
    ) -> torch.Tensor:
        ga = early_grad(ctx.needs_input_grad, a, plan, g, cdt) if grad_mode else None
        mx, my, lx, ly, kl, careful = chunk_pass(a, plan, segs, swap, inv_t, cdt, ga, floors)
        dev = a.device
        f64 = torch.float64
        names = ("ref_logits", "logits") if swap else ("logits", "ref_logits")
        raise_bad_rows(names[0], b if swap else a, mx, g)
        raise_bad_rows(names[1], a if swap else b, my, g)
        LX, LY, KL, wx, wy = _combine(mx, my, lx, ly, kl, g)
        KL = KL.to(f64).clamp_min(0.0)  # ≥ 0 exactly; rounding can leave −1e-8
        if not plan.all_valid:
            KL = torch.where(valid_rows(plan, dev), KL, torch.zeros_like(KL))
        ctx.save_for_backward(a, b, LX, LY, KL, mx, my)
        ctx.weights = (wx, wy)
        ctx.plan, ctx.segs, ctx.swap, ctx.inv_t, ctx.cdt = plan, segs, swap, inv_t, cdt
        ctx.g, ctx.floors = g, floors
        ctx.careful = careful
        ctx.early, ctx.early_path = ga, ga is not None
        return KL.to(cdt)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        a, b, LX, LY, KL, mx, my = ctx.saved_tensors
        plan: Plan = ctx.plan
        cdt = ctx.cdt
        wx, wy = ctx.weights
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():  # create_graph: a differentiable recomputation
            ctx.early = None
            return (*_kl_twice(ctx, a, b, KL, grad), *([None] * 8))
        if ctx.early_path:  # forward wrote ∂KL/∂a: only the upstream factor is left
            early, ctx.early = ctx.early, None
            if early is None:  # a second backward (retain_graph): forward's pass, bit for bit
                early = grad_buffer(a, plan)
                chunk_pass(a, plan, ctx.segs, ctx.swap, ctx.inv_t, cdt, early, ctx.floors)
            s = (grad.reshape(-1).to(torch.float64) * ctx.inv_t).to(cdt)[:, None]
            fix_inf_rows(early.view(-1, early.shape[-1]).mul_(s), torch.isinf(KL), s)
            return early, *([None] * 9)
        ga = grad_buffer(a, plan) if need_a else None
        gb = grad_buffer(b, plan) if need_b else None
        gx, gy = (gb, ga) if ctx.swap else (ga, gb)
        scale = (grad.reshape(-1).to(torch.float64) * ctx.inv_t).to(cdt)
        inf_rows = torch.isinf(KL)
        bp, bu = buffers(plan, a.shape[-1], cdt, a.device, 2)
        for c in plan.chunks:
            lo, hi = c
            x, y = read_pair(plan, ctx.segs, c, cdt, ctx.inv_t, ctx.swap, ctx.floors)
            careful = bool(ctx.careful[lo:hi].any())
            p = softmax_rows(x, bp[: hi - lo], None if wx is None else wx[lo:hi], careful)
            s = scale[lo:hi, None]
            if gx is not None:
                out = target(gx, c, cdt)  # X ⊙ (log X − log Y − KL)
                sl = slice(lo, hi)
                log_ratio_rows(x, y, mx[sl], my[sl], LX[sl], LY[sl], out, bu[: hi - lo])
                out.sub_(KL[sl].to(cdt)[:, None])
                if careful:
                    out.masked_fill_(x == _NEG, 0.0)
                out.mul_(p).mul_(s)
                fix_inf_rows(out, inf_rows[lo:hi], s)
                store(gx, c, out)
            if gy is not None:
                out = target(gy, c, cdt)
                softmax_rows(y, out, None if wy is None else wy[lo:hi], careful)
                out.sub_(p).mul_(s)
                fix_inf_rows(out, inf_rows[lo:hi], s)
                store(gy, c, out)
        return ga, gb, *([None] * 8)


def _kl_twice(
    ctx: Any, a: torch.Tensor, b: torch.Tensor, KL: torch.Tensor, grad: torch.Tensor
) -> list[torch.Tensor | None]:
    """Backward with ``create_graph``: the KL recomputed by differentiable torch ops on the
    computed rows whose value is finite (:mod:`klest.logits._twice`)."""
    check_world(ctx.g)
    plan: Plan = ctx.plan
    finite = torch.isfinite(KL)
    idx = valid_index(plan, a.device)
    keep = finite if idx is None else finite[idx]
    idx = torch.nonzero(finite).flatten() if idx is None else idx[keep]
    up = grad.reshape(-1)

    fa, fb = (None, None) if ctx.floors is None else ctx.floors

    def value() -> list[torch.Tensor]:
        xa = apply_floor(take(a, idx).to(ctx.cdt) * ctx.inv_t, take_floor(fa, idx))
        xb = apply_floor(take(b, idx).to(ctx.cdt) * ctx.inv_t, take_floor(fb, idx))
        return [kl_rows(xb, xa) if ctx.swap else kl_rows(xa, xb)]

    need = ctx.needs_input_grad[:2]
    out = regrad(value, [a, b], need, [up[idx]])
    return [inf_rule(o, ~finite, up) for o in out]


def take_floor(f: torch.Tensor | None, idx: torch.Tensor | None) -> torch.Tensor | None:
    return f if f is None or idx is None else f[idx]


def chunk_pass(
    a: torch.Tensor,
    plan: Plan,
    segs: tuple[list[tuple[int, torch.Tensor]], list[tuple[int, torch.Tensor]]],
    swap: bool,
    inv_t: float,
    cdt: torch.dtype,
    ga: torch.Tensor | None,
    floors: Floors = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward's pass over the chunks: per row (m_x, m_y, c_x, c_y, KL, careful) of this
    shard, and, when ``ga`` is given, ∂KL/∂a written into it (a = x, or y when ``swap``).

    float32 CPU rows go through the compiled pass of :mod:`klest.logits._fused` when
    ``klest[fast]`` is used (the same quantities, three passes per row in one loop); rows it
    leaves (a non-finite logit) and every other case take the torch ops below."""
    fused = None if floors is not None else _fused_pass(a, plan, segs, swap, inv_t, cdt, ga)
    if fused is not None:
        return fused
    return _torch_pass(a, plan, segs, swap, inv_t, cdt, ga, floors)


def _fused_pass(
    a: torch.Tensor,
    plan: Plan,
    segs: tuple[list[tuple[int, torch.Tensor]], list[tuple[int, torch.Tensor]]],
    swap: bool,
    inv_t: float,
    cdt: torch.dtype,
    ga: torch.Tensor | None,
) -> (
    tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None
):
    """:func:`chunk_pass` by the compiled kernel, or None where it does not apply (not CPU
    float32, rows not in one view with unit stride along the vocabulary, no numba)."""
    if cdt != torch.float32 or a.device.type != "cpu" or not plan.chunks:
        return None
    views = []
    for side in segs:
        if len(side) != 1 or side[0][0] != 0:
            return None
        v = side[0][1]
        if v.dtype != torch.float32 or v.ndim != 2 or v.stride(-1) != 1 or v.shape[0] < 1:
            return None
        views.append(v)
    work = sum(c[1] - c[0] for c in plan.chunks) * a.shape[-1]
    if not claim_fast(work) or importlib.util.find_spec("numba") is None:
        return None  # asked before importing anything: numba is not loaded when not wanted
    from . import _fused  # here, not above: it imports numba, which `import klest` must not

    xv, yv = (views[1], views[0]) if swap else (views[0], views[1])
    X, Y = xv.detach().numpy(), yv.detach().numpy()
    G = None if ga is None else ga.view(-1, ga.shape[-1]).numpy()
    N = plan.n_rows
    stats = np.zeros((N, 6))
    rows = np.concatenate([np.arange(lo, hi) for lo, hi in plan.chunks])
    blocks = [rows[i : i + 8] for i in range(0, rows.size, 8)]
    ordered_map(
        lambda r: _fused.kl_rows(X, Y, r, inv_t, G, swap, stats),
        blocks,
        torch.get_num_threads(),
    )
    f64 = torch.float64
    st = torch.from_numpy(stats)
    mx, my = st[:, 0].to(cdt), st[:, 1].to(cdt)
    lx, ly, kl = st[:, 2].clone(), st[:, 3].clone(), st[:, 4].to(f64)
    careful = torch.zeros(N, dtype=torch.bool)
    bad = np.flatnonzero(stats[:, 5])
    if bad.size:  # NaN, ±inf logits: the torch ops' rules (and errors) for those rows
        sub = Plan(N, [(int(r), int(r) + 1) for r in bad], plan.all_valid)
        smx, smy, slx, sly, skl, scare = _torch_pass(a, sub, segs, swap, inv_t, cdt, ga)
        idx = torch.from_numpy(bad)
        mx[idx], my[idx], lx[idx], ly[idx] = smx[idx], smy[idx], slx[idx], sly[idx]
        kl[idx], careful[idx] = skl[idx].to(f64), scare[idx]
    return mx, my, lx, ly, kl, careful


def _torch_pass(
    a: torch.Tensor,
    plan: Plan,
    segs: tuple[list[tuple[int, torch.Tensor]], list[tuple[int, torch.Tensor]]],
    swap: bool,
    inv_t: float,
    cdt: torch.dtype,
    ga: torch.Tensor | None,
    floors: Floors = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`chunk_pass` by torch ops, chunk by chunk."""
    dev = a.device
    N = plan.n_rows
    bq, br, *bp = buffers(plan, a.shape[-1], cdt, dev, 2 if ga is not None and not swap else 3)
    f64 = torch.float64
    mx = torch.zeros(N, dtype=cdt, device=dev)
    my = torch.zeros(N, dtype=cdt, device=dev)
    lx = torch.zeros(N, dtype=f64, device=dev)
    ly = torch.zeros(N, dtype=f64, device=dev)
    kl = torch.zeros(N, dtype=cdt, device=dev)
    careful = torch.zeros(N, dtype=torch.bool)
    for c in plan.chunks:
        lo, hi = c
        x, y = read_pair(plan, segs, c, cdt, inv_t, swap, floors)
        n = hi - lo
        mine = None if ga is None else target(ga, c, cdt)  # a's gradient rows
        p = bp[0][:n] if mine is None or swap else mine
        q = mine if swap else None
        mx[lo:hi], my[lo:hi], lx[lo:hi], ly[lo:hi], kl[lo:hi], care = _local_stats(
            x, y, p, bq[:n], br[:n], q
        )
        if care:
            careful[lo:hi] = True
        if q is not None:  # a = y: ∂KL/∂y = Y − X
            q.sub_(p)
        elif mine is not None:  # a = x: ∂KL/∂x = X ⊙ (log X − log Y) − X·KL, br = X ⊙ d
            torch.addcmul(br[:n], p, kl[lo:hi, None], value=-1.0, out=p)
    return mx, my, lx, ly, kl, careful


def early_grad(
    needs: tuple[bool, ...], a: torch.Tensor, plan: Plan, g: Group, cdt: torch.dtype
) -> torch.Tensor | None:
    """The buffer forward writes ∂KL/∂a into (the gradient's own memory: X ⊙ (log X − log Y −
    KL) when a is x, Y − X when a is y) when only a needs a gradient (the RL case), a is in the
    computation dtype and the vocabulary is on one rank: backward then only scales it by the
    upstream gradient instead of recomputing both softmaxes. None otherwise (backward
    recomputes from the three saved floats per row)."""
    if g.world != 1 or a.dtype != cdt or not needs[0] or needs[1]:
        return None
    return grad_buffer(a, plan)


def softmax_rows(
    x: torch.Tensor, out: torch.Tensor, w: torch.Tensor | None, careful: bool
) -> torch.Tensor:
    """softmax(x) into ``out``, times the shard weight w per row; 0 on all −inf rows."""
    p = torch.softmax(x, -1, out=out)
    if careful:
        p.masked_fill_(x == _NEG, 0.0)
    if w is not None:
        p.mul_(w.to(p.dtype)[:, None])
    return p


def buffers(
    plan: Plan, vocab: int, cdt: torch.dtype, dev: torch.device, k: int
) -> list[torch.Tensor]:
    rows = max((c[1] - c[0] for c in plan.chunks), default=1)
    return [torch.empty(rows, vocab, dtype=cdt, device=dev) for _ in range(k)]


def valid_rows(plan: Plan, dev: torch.device) -> torch.Tensor:
    valid = torch.zeros(plan.n_rows, dtype=torch.bool, device=dev)
    for c0, c1 in plan.chunks:
        valid[c0:c1] = True
    return valid


def read_pair(
    plan: Plan,
    segs: tuple[list[tuple[int, torch.Tensor]], list[tuple[int, torch.Tensor]]],
    c: tuple[int, int],
    cdt: torch.dtype,
    inv_t: float,
    swap: bool,
    floors: Floors = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's rows of both inputs in the computation dtype, scaled by 1/temperature
    (entries below ``floors`` of a and b set to −inf): (x, y) = (a, b), or (b, a) when
    ``swap``."""
    a = scaled(plan.block(segs[0], c), cdt, inv_t)
    b = scaled(plan.block(segs[1], c), cdt, inv_t)
    if floors is not None:
        fa, fb = floors
        a = apply_floor(a, None if fa is None else fa[c[0] : c[1]])
        b = apply_floor(b, None if fb is None else fb[c[0] : c[1]])
    return (b, a) if swap else (a, b)


def apply_floor(x: torch.Tensor, fl: torch.Tensor | None) -> torch.Tensor:
    """x with the entries below the row's threshold ``fl`` ([n]) set to −inf: the sampler's
    kept set (:mod:`klest.logits._process`). A new tensor; ``x`` itself when ``fl`` is None."""
    if fl is None:
        return x
    return torch.where(x >= fl.to(x.dtype)[:, None], x, torch.full_like(x, _NEG))


Floors = tuple[torch.Tensor | None, torch.Tensor | None] | None


def scaled(block: torch.Tensor, cdt: torch.dtype, inv_t: float) -> torch.Tensor:
    """``block`` in ``cdt`` times ``inv_t`` (a view when nothing changes; never written to)."""
    if inv_t == 1.0:
        return block.to(cdt)
    return torch.mul(block, inv_t) if block.dtype == cdt else block.to(cdt).mul_(inv_t)


_NUMPY_DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16"}
_HUGE_BYTES = 1 << 23  # gradients from 8 MiB up are allocated by NumPy on CPU (see below)


def grad_buffer(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    """The gradient w.r.t. ``x``: contiguous, x's dtype, zero on rows that are not computed.

    A large CPU gradient is allocated by NumPy and shared with torch (``torch.from_numpy``):
    NumPy asks Linux for transparent huge pages on large allocations (its default), so the first
    write into the fresh [N, V] buffer takes one page fault per 2 MiB instead of per 4 KiB. That
    first touch was 0.09 s of full_kl's 0.21 s at 512 × 151,936 float32 (torch's allocator asks
    for huge pages only under ``THP_MEM_ALLOC_ENABLE=1``)."""
    nbytes = x.numel() * x.element_size()
    if x.device.type == "cpu" and x.dtype in _NUMPY_DTYPES and nbytes >= _HUGE_BYTES:
        import numpy as np

        alloc = np.empty if plan.all_valid else np.zeros
        return torch.from_numpy(alloc(tuple(x.shape), dtype=_NUMPY_DTYPES[x.dtype]))
    if plan.all_valid:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return torch.zeros(x.shape, dtype=x.dtype, device=x.device)


def target(gbuf: torch.Tensor, c: tuple[int, int], cdt: torch.dtype) -> torch.Tensor:
    """Where a chunk's gradient is computed: the gradient's own rows when the dtypes agree."""
    rows = gbuf.view(-1, gbuf.shape[-1])[c[0] : c[1]]
    if gbuf.dtype == cdt:
        return rows
    return torch.empty(rows.shape, dtype=cdt, device=rows.device)


def store(gbuf: torch.Tensor, c: tuple[int, int], out: torch.Tensor) -> None:
    rows = gbuf.view(-1, gbuf.shape[-1])[c[0] : c[1]]
    if out.data_ptr() != rows.data_ptr():
        rows.copy_(out)


def fix_inf_rows(out: torch.Tensor, inf_rows: torch.Tensor, s: torch.Tensor) -> None:
    """Rows whose value is +inf have no gradient: NaN where the row's upstream gradient is
    nonzero, 0 where it is 0 (a masked or unused position)."""
    if bool(inf_rows.any()):
        fill = torch.where(s == 0, torch.zeros_like(s), torch.full_like(s, math.nan))
        out.copy_(torch.where(inf_rows[:, None], fill.expand_as(out), out))


class InfGuard(torch.autograd.Function):
    """Identity on values; a value of ±inf passes no gradient back: NaN where its upstream
    gradient is nonzero, 0 where it is 0 (the same rule as :class:`KLFunction`)."""

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(v)
        return v.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (v,) = ctx.saved_tensors
        bad = torch.isinf(v) & (grad != 0)
        return torch.where(bad, torch.full_like(grad, math.nan), grad)
