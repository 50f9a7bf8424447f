r"""Sampler–trainer mismatch: is the policy that sampled the policy you train?

Samples come from the rollout policy μ (vLLM, SGLang); the trainer recomputes π on the same
tokens. Per valid token L = log π(y_t) − log μ(y_t) (``train_logp − rollout_logp``) and w = e^L.
Expectations are under μ (the sampler), so KL(μ‖π) = E_μ[−L] and χ²(π‖μ) = E_μ[w²] − 1.

:func:`mismatch` computes every diagnostic in one pass over the tokens (float64 accumulation,
no clamp), each mean with its standard error. ``report.as_dict()`` gives plain floats:

========================== =====================================================================
key                        value
========================== =====================================================================
``token_kl``               KL(μ‖π) per token: Σ k3(L) / N, k3(L) = e^L − 1 − L (stable form)
``token_kl_k1``            the same by k1: Σ (−L) / N
``token_forward_kl``       KL(π‖μ) per token: Σ (L e^L − (e^L − 1)) / N
``token_chi2``             χ²(π‖μ) per token: Σ w² / N − 1 (log space; +inf only if float64
                           overflows)
``seq_kl``                 KL(μ‖π) of whole sequences: mean over sequences of Σ_t k3(L_t)
``seq_chi2``               mean over sequences of (∏_t w_t)² − 1 (log space, no clamp)
``ess_token``, ``ess_seq`` normalised effective sample size (Σw)² / (n Σw²) of the token weights
                           and of the sequence weights ∏_t w_t (log space), in (0, 1]
``log_ppl_diff``           mean over sequences of mean_t L = log ppl_μ − log ppl_π (positive:
                           the trainer finds the samples more likely than the sampler did;
                           verl's and slime's ``log_ppl_diff`` is the negative of this;
                           ``names="verl@0.9.1"`` gives verl's sign)
``abs_log_ratio_max``      max |L|
``abs_log_ratio_p99``      the 0.99 quantile of |L| (linear interpolation, as numpy/torch)
``frac_ratio_above_2``     fraction of tokens with w > 2
``frac_ratio_below_half``  fraction of tokens with w < ½
``n_tokens``,              valid tokens N, and sequences (rows with at least one valid token)
``n_sequences``
========================== =====================================================================

``*_stderr`` keys (``token_kl``, ``token_kl_k1``, ``token_forward_kl``, ``seq_kl``,
``log_ppl_diff``) are standard errors. Tokens of one sequence are not independent, so the
token-level ones are cluster (by sequence) standard errors of the ratio Σ_b S_b / Σ_b n_b:
SE² = S/(S − 1) · Σ_b (S_b − r n_b)² / N² (S_b the row sum, n_b the row's tokens, r the ratio);
the sequence-level ones are sd/√S. Under fewer than 2 sequences a standard error is NaN (there is
no estimate of it). With no valid token at all, every value is NaN and ``n_tokens`` is 0.

**Infinite values.** ``train_logp = −inf`` at a valid token (π gives the sample probability 0)
makes KL(μ‖π) +inf: ``token_kl``, ``seq_kl`` and ``abs_log_ratio_*`` say +inf; the forward KL and
χ² stay finite. NaN anywhere valid, ``train_logp = +inf`` or a non-finite ``rollout_logp`` at a
valid token is refused (:class:`klest.KlestError`, with ``klest.options(validate=True)``).
Masked positions are never read.

**Data parallelism.** When ``torch.distributed`` is initialised (or ``group=`` is given) every
value is global over the group: sums and maxima are all-reduced, and the exact global p99 is the
interpolated quantile of the union of the ranks' top-K values of |L| (K = N − ⌊0.99 (N − 1)⌋,
about 1 % of the global token count, all-gathered). Every rank must call :func:`mismatch`.

**Cost.** One pass over cache-sized float64 blocks of L (no [B, T] float64 array is made for
float32 input; the threshold counts are taken there too), plus a few passes in the input's
precision (L, its extremes, |L| in place) and a threshold-and-select for the p99.

**Peers' metric sets** (``names=``): ``"verl@0.9.1"`` (``rollout_corr/...``,
``compute_offpolicy_metrics``), ``"slime@0.3.1"`` (``mis_...``, ``--get-mismatch-metrics``),
``"trl@1.16.0"`` (``sampling/...``; ``"trl@1.16.0:<vllm_importance_sampling_mode>"`` for another
mode than the default ``sequence_mask``): the peers' keys with the values their released code
computes, as written (its clamps, its dtype, its NaN). A key whose value a peer's clamp changed on
this batch is flagged: ``as_dict()`` then holds ``"<key>.clamped": 1.0`` (0.0 when it did not
bind), and ``report.clamped`` lists them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist

from .._config import get_options
from .._torch import check_mask, tensor_arg, world_size
from ..errors import KlestError
from ._inputs import logp_pair

__all__ = ["MISMATCH_NAMES", "MismatchReport", "mismatch"]

_BLOCK = 1 << 17  # float64 elements per block (1 MiB), as rl._kernels.k3_blocks
_LOG2 = math.log(2.0)
_Q = 0.99

_KEYS = (
    "token_kl",
    "token_kl_stderr",
    "token_kl_k1",
    "token_kl_k1_stderr",
    "token_forward_kl",
    "token_forward_kl_stderr",
    "token_chi2",
    "seq_kl",
    "seq_kl_stderr",
    "seq_chi2",
    "ess_token",
    "ess_seq",
    "log_ppl_diff",
    "log_ppl_diff_stderr",
    "abs_log_ratio_max",
    "abs_log_ratio_p99",
    "frac_ratio_above_2",
    "frac_ratio_below_half",
    "n_tokens",
    "n_sequences",
)


@dataclass(frozen=True)
class MismatchReport:
    """Every mismatch diagnostic as a float (see :mod:`klest.rl.mismatch` for the formulas).

    ``peer``: the peer's own keys and values when ``names=`` was given (``as_dict()`` then returns
    those); ``clamped``: the peer keys whose value the peer's clamp changed on this batch.
    """

    token_kl: float
    token_kl_stderr: float
    token_kl_k1: float
    token_kl_k1_stderr: float
    token_forward_kl: float
    token_forward_kl_stderr: float
    token_chi2: float
    seq_kl: float
    seq_kl_stderr: float
    seq_chi2: float
    ess_token: float
    ess_seq: float
    log_ppl_diff: float
    log_ppl_diff_stderr: float
    abs_log_ratio_max: float
    abs_log_ratio_p99: float
    frac_ratio_above_2: float
    frac_ratio_below_half: float
    n_tokens: float
    n_sequences: float
    names: str | None = None
    peer: dict[str, float] | None = field(default=None, repr=False)
    clamped: tuple[str, ...] = ()

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Plain floats: klest's keys, or the peer's keys (and ``<key>.clamped`` flags) when the
        report was made with ``names=``; ``prefix`` is prepended to every key."""
        if self.peer is not None:
            return {prefix + k: v for k, v in self.peer.items()}
        return {
            prefix + f.name: float(getattr(self, f.name)) for f in fields(self) if f.name in _KEYS
        }


def _nan_report(n: float, **peer: Any) -> MismatchReport:
    """A report whose every value is NaN (no valid token, or a peer's report), n tokens."""
    nan = math.nan
    return MismatchReport(
        token_kl=nan,
        token_kl_stderr=nan,
        token_kl_k1=nan,
        token_kl_k1_stderr=nan,
        token_forward_kl=nan,
        token_forward_kl_stderr=nan,
        token_chi2=nan,
        seq_kl=nan,
        seq_kl_stderr=nan,
        seq_chi2=nan,
        ess_token=nan,
        ess_seq=nan,
        log_ppl_diff=nan,
        log_ppl_diff_stderr=nan,
        abs_log_ratio_max=nan,
        abs_log_ratio_p99=nan,
        frac_ratio_above_2=nan,
        frac_ratio_below_half=nan,
        n_tokens=n,
        n_sequences=n,
        **peer,
    )


# ------------------------------------------------------------------------------------ inputs


def _prepare(
    train_logp: Any, rollout_logp: Any, mask: Any
) -> tuple[torch.Tensor, torch.Tensor | None, torch.dtype]:
    """L = train - rollout in the computation dtype (float64 if an input is, else float32), 0 at
    masked positions; the bool mask (None: every token valid)."""
    tr, ro = logp_pair(train_logp, rollout_logp)
    if ro.device != tr.device:
        raise KlestError(f"is on {ro.device}, train_logp on {tr.device}", argument="rollout_logp")
    m = check_mask(mask, tr.shape, tr.device)
    dtype = torch.float64 if torch.float64 in (tr.dtype, ro.dtype) else torch.float32
    tr_c = tr.detach().to(dtype)
    ro_c = ro.detach().to(dtype)
    if get_options().validate:
        _check_values(tr_c, ro_c, m)
    L = tr_c - ro_c
    if m is not None:  # in place: L is a new array
        torch.where(m, L, torch.zeros((), dtype=dtype, device=L.device), out=L)
    return L, m, dtype


def _check_values(tr: torch.Tensor, ro: torch.Tensor, m: torch.Tensor | None) -> None:
    def count(cond: torch.Tensor) -> int:
        return int((cond if m is None else cond & m).sum())

    # one reduction in the input's own dtype (no float64 copy): NaN or ±inf anywhere shows
    if not math.isfinite(float(ro.sum())):
        n = count(~torch.isfinite(ro))
        if n:
            raise KlestError(
                f"is NaN or ±inf at {n} valid token(s) (the sampler cannot give its own sample "
                "probability 0)",
                argument="rollout_logp",
            )
    if not math.isfinite(float(tr.sum())):
        n = count(torch.isnan(tr) | (tr == torch.inf))
        if n:
            raise KlestError(f"is NaN or +inf at {n} valid token(s)", argument="train_logp")


# ------------------------------------------------------------------------------- reductions


class _Group:
    """Sums, maxima and gathers over the process group (identities in one process)."""

    def __init__(self, distributed: bool | None, group: Any) -> None:
        if group is not None and distributed is None:
            distributed = True
        self.world = world_size(distributed, group)
        self.group = group

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def max(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return x
        out = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(out, x.contiguous(), group=self.group)
        return torch.cat(out)


def _token_pass(
    L: torch.Tensor, m: torch.Tensor | None, shift: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row float64 sums [3, B] of L, k3(L) and forward_k3(L), and the float64 scalars
    [a, b, n_above, n_below] over the valid tokens, w = e^L: with ``shift`` None (the fast path,
    used when 0 <= max L <= 300) a = Σ (w − 1) and b = Σ (w − 1)², else a = Σ w e^{-s} and
    b = Σ w² e^{-2s} (s = ``shift``); n_above, n_below count L > log 2 and L < −log 2.
    L holds 0 at masked positions and no -inf.

    Cache-sized float64 blocks of rows, in three preallocated buffers. e = expm1(L); k3 = e − L
    (the core's closed form :func:`klest._numerics.expm1mx_closed`); the forward control variate
    L e^L − (e^L − 1) = L·e − k3 (two non-negative terms: it loses at most log2|L| bits; +inf
    when e^L overflows); w = e + 1. Masked tokens have L = k3 = e = 0 and add nothing to these
    sums. In the fast path Σw = a + n and Σw² = b + 2a + n are accurate to n·1e-16 against
    Σw >= e^{max L} >= 1, and Σ (w² − 1) = b + 2a has no cancellation against n; else
    w e^{-s} = exp(L − s) directly, masked.
    """
    B, T = L.shape
    f64 = torch.float64
    dev = L.device
    rows = torch.zeros(3, B, dtype=f64, device=dev)
    acc = torch.zeros(4, dtype=f64, device=dev)
    if B == 0 or T == 0:
        return rows, acc
    step = max(1, _BLOCK // T)
    x_buf = torch.empty(min(step, B), T, dtype=f64, device=dev)
    e_buf = torch.empty_like(x_buf)
    t_buf = torch.empty_like(x_buf)
    b_buf = torch.empty(x_buf.shape, dtype=torch.bool, device=dev)
    for start in range(0, B, step):
        stop = min(start + step, B)
        n = stop - start
        x, e, t, flags = x_buf[:n], e_buf[:n], t_buf[:n], b_buf[:n]
        x.copy_(L[start:stop])
        torch.sum(x, dim=1, out=rows[0, start:stop])
        torch.expm1(x, out=e)
        torch.sub(e, x, out=t)  # k3 = expm1(L) − L
        torch.sum(t, dim=1, out=rows[1, start:stop])
        torch.mul(x, e, out=t)  # L·expm1(L); − Σ k3 below
        torch.sum(t, dim=1, out=rows[2, start:stop])
        acc[2] += torch.gt(x, _LOG2, out=flags).sum()
        acc[3] += torch.lt(x, -_LOG2, out=flags).sum()
        if shift is None:
            flat = e.reshape(-1)
        else:
            w = torch.exp(x.sub_(shift), out=e)
            if m is not None:
                w.mul_(m[start:stop])
            flat = w.reshape(-1)
        acc[0] += flat.sum()
        acc[1] += torch.dot(flat, flat)
    # e^L overflowed (L > 709.78): Σ k3 and Σ L·e are +inf, and so is the forward KL
    rows[2] = torch.where(rows[1] == math.inf, rows[1], rows[2] - rows[1])
    return rows, acc


def _row_counts(m: torch.Tensor) -> torch.Tensor:
    """True entries per row, float64, by blocks of rows (a row count of a whole bool [B, T]
    array makes torch convert it to int64 first: 8 bytes a token)."""
    B, T = m.shape
    step = max(1, _BLOCK // max(T, 1))
    out = torch.empty(B, dtype=torch.float64, device=m.device)
    for start in range(0, B, step):
        out[start : start + step] = torch.count_nonzero(m[start : start + step], dim=1)
    return out


def _masked_max(L: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """max of L over the True entries of m (−inf if none), by blocks of rows (no [B, T] copy)."""
    B, T = L.shape
    step = max(1, _BLOCK // max(T, 1))
    neg = torch.tensor(-math.inf, dtype=L.dtype, device=L.device)
    out = neg.clone()
    for start in range(0, B, step):
        blk = torch.where(m[start : start + step], L[start : start + step], neg)
        out = torch.maximum(out, blk.max())
    return out


def _top_k(a: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest entries of the 1-d ``a`` (descending), exactly: a threshold from a strided
    sample selects a small candidate set, checked to hold at least k entries (else a full topk)."""
    n = a.numel()
    k = min(k, n)
    if k <= 0:
        return a[:0]
    if 16 * k >= n:
        return torch.topk(a, k).values
    stride = max(1, n // (1 << 16))  # a sample of about 65536 entries
    sample = a[::stride]
    ks = k * sample.numel() / n
    j = min(sample.numel(), int(1.5 * ks + 3.0 * math.sqrt(ks) + 10))
    t = torch.topk(sample, j).values[-1]
    cand = a[a >= t]
    if cand.numel() < k:  # the sample misled us (structured data): the exact slow way
        return torch.topk(a, k).values
    return torch.topk(cand, k).values


def _quantile_from_top(top: torch.Tensor, n: int, q: float) -> float:
    """The q quantile (linear interpolation) of n values whose largest entries are ``top``
    (descending, at least n - floor(q (n - 1)) of them)."""
    h = q * (n - 1)
    lo = math.floor(h)
    frac = h - lo
    v_lo = float(top[n - 1 - lo])
    if frac == 0.0 or lo + 1 > n - 1:
        return v_lo
    v_hi = float(top[n - 2 - lo])
    if v_hi == v_lo:
        return v_lo
    return v_lo + frac * (v_hi - v_lo)


# ------------------------------------------------------------------------------------- main


def mismatch(
    train_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    group: Any = None,
    distributed: bool | None = None,
    names: str | None = None,
) -> MismatchReport:
    r"""Every sampler–trainer mismatch diagnostic of a batch, with standard errors.

    ``train_logp`` (log π) and ``rollout_logp`` (log μ, the sampler's) are [B, T] log-probs of the
    sampled tokens, any float dtype (L formed in float32 for 16/32-bit inputs, then every function
    of it and every sum in float64; float64 inputs stay float64);
    ``mask`` (bool or 0/1) marks valid tokens. With L = log π − log μ per valid token:

    .. math::
        \text{token\_kl} = \frac{1}{N}\sum (e^L - 1 - L), \quad
        \text{token\_chi2} = \frac{1}{N}\sum e^{2L} - 1, \quad
        \text{seq\_kl} = \frac{1}{S}\sum_b \sum_t (e^{L_{bt}} - 1 - L_{bt})

    (all keys and their standard errors: :mod:`klest.rl.mismatch`). ``names=`` gives a peer's
    metric set instead (``MISMATCH_NAMES``).

    >>> import torch, klest.rl as rl
    >>> rollout = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -0.7]])
    >>> train = rollout + torch.tensor([[0.1, -0.2, 0.0], [0.05, 0.0, -0.1]])
    >>> r = rl.mismatch(train, rollout)
    >>> round(r.token_kl, 6), round(r.token_kl_k1, 6), r.n_tokens
    (0.005002, 0.025, 6.0)
    """
    if names is not None:
        return _peer_report(train_logp, rollout_logp, mask, names)
    L, m, _ = _prepare(train_logp, rollout_logp, mask)
    grp = _Group(distributed, group)
    B = L.shape[0]
    dev = L.device
    f64 = torch.float64
    n_b = (
        torch.full((B,), float(L.shape[1]), dtype=f64, device=dev) if m is None else _row_counts(m)
    )
    has = n_b > 0
    # maxima over the group: of L (its -inf tokens, the log-space shift) and of -L. Masked
    # entries of L are 0, so L.max() is the valid maximum whenever it is > 0
    if L.numel():
        lo_hi = torch.aminmax(L)
        hi_lo = torch.stack([lo_hi.max, -lo_hi.min]).to(f64)
    else:
        hi_lo = torch.full((2,), -math.inf, dtype=f64, device=dev)
    hi_lo = grp.max(hi_lo)
    l_max, l_min = float(hi_lo[0]), -float(hi_lo[1])
    if not l_max > 0.0 and m is not None and L.numel():  # every valid L <= 0: look closer
        l_max = float(grp.max(_masked_max(L, m).to(f64).reshape(1)))
    neg_inf = l_min == -math.inf
    n_neg_inf_b = torch.zeros(B, dtype=f64, device=dev)
    Lw = L
    mw: torch.Tensor | None = m
    if neg_inf:  # π gives some sample probability 0: count those tokens, compute on the rest
        at = L == -math.inf
        n_neg_inf_b = _row_counts(at)
        Lw = torch.where(at, torch.zeros((), dtype=L.dtype, device=dev), L)
        mw = ~at if m is None else (m & ~at)
    fast = 0.0 <= l_max <= 300.0
    shift = None if fast else (l_max if math.isfinite(l_max) else 0.0)
    rows, acc = _token_pass(Lw, mw, shift)
    sum_L_b, sum_k3_b, sum_fwd_b = rows[0], rows[1], rows[2]
    inf_rows = n_neg_inf_b > 0
    if neg_inf:
        # k3 and k1 are +inf at those tokens; the forward term r log r - (r - 1) -> 1 at r = 0
        sum_L_b = torch.where(inf_rows, torch.full_like(sum_L_b, -math.inf), sum_L_b)
        sum_k3_b = torch.where(inf_rows, torch.full_like(sum_k3_b, math.inf), sum_k3_b)
        sum_fwd_b = sum_fwd_b + n_neg_inf_b
    mean_L_b = torch.where(has, sum_L_b / n_b.clamp(min=1.0), torch.zeros_like(sum_L_b))
    sums = grp.sum(
        torch.stack(
            [
                n_b.sum(),
                has.sum(dtype=f64),
                sum_k3_b.sum(),
                sum_L_b.sum(),
                sum_fwd_b.sum(),
                acc[0],
                acc[1],
                acc[2],
                acc[3],
                torch.where(has, sum_k3_b, torch.zeros_like(sum_k3_b)).sum(),
                mean_L_b.sum(),
                n_neg_inf_b.sum(),
            ]
        )
    )
    N, S, t_k3, t_L, t_fwd, a, b, n_above, n_below, t_seqk3, t_mean_L, n_zero = (
        float(v) for v in sums
    )
    n_below += n_zero  # w = 0 < 1/2 at the tokens where π gives probability 0
    # sequence log-weights Σ_t L: their maximum for the log-space sums
    seq_logw = sum_L_b[has]
    local_max = seq_logw.max() if seq_logw.numel() else torch.tensor(-math.inf, dtype=f64)
    seq_max = float(grp.max(local_max.reshape(1).to(device=dev, dtype=f64)))
    if N == 0:
        return _nan_report(n=0.0)
    r_k3, r_L, r_fwd = t_k3 / N, t_L / N, t_fwd / N
    seq_k3_mean = t_seqk3 / S
    ppl_mean = t_mean_L / S
    # second pass (B values per rank): centred sums for the standard errors, sequence weights
    sh = seq_max if math.isfinite(seq_max) else 0.0
    zero = torch.zeros((), dtype=f64, device=dev)

    def centred(x: torch.Tensor, c: float, n: torch.Tensor | None = None) -> torch.Tensor:
        if not math.isfinite(c):
            return torch.tensor(math.inf, dtype=f64, device=dev)
        d = x - c * n if n is not None else x - c
        return torch.where(has, d * d, zero).sum()

    ew = torch.where(has, torch.exp(sum_L_b - sh), zero)
    # Σ (W_b² − 1) directly when no W_b² overflows: no cancellation against S for small mismatch
    direct = 2.0 * seq_max <= 700.0
    em1 = torch.where(has, torch.expm1(2.0 * sum_L_b), zero).sum() if direct else zero
    second = grp.sum(
        torch.stack(
            [
                centred(sum_k3_b, r_k3, n_b),
                centred(sum_L_b, r_L, n_b),
                centred(sum_fwd_b, r_fwd, n_b),
                centred(sum_k3_b, seq_k3_mean),
                centred(mean_L_b, ppl_mean),
                ew.sum(),
                torch.dot(ew, ew),
                em1,
            ]
        )
    )
    c_k3, c_L, c_fwd, c_seq, c_ppl, e1, e2, e_m1 = (float(v) for v in second)
    cl = S / (S - 1) if S >= 2 else math.nan

    def cluster_se(c: float, r: float) -> float:
        if S < 2:
            return math.nan
        if not math.isfinite(r):
            return math.inf
        return math.sqrt(cl * c) / N

    def seq_se(c: float, mean: float) -> float:
        if S < 2:
            return math.nan
        if not math.isfinite(mean):
            return math.inf
        return math.sqrt(c / (S - 1) / S)

    # token weights (the -inf tokens have w = 0 and count in N)
    log_n = math.log(N)
    if shift is None:  # a = Σ (w − 1), b = Σ (w − 1)² over the N − n_zero tokens with w > 0
        n_pos = N - n_zero
        s1, s2 = a + n_pos, b + 2.0 * a + n_pos  # Σw, Σw² >= 1 (some L >= 0)
        token_chi2 = (b + 2.0 * a - n_zero) / N  # mean (w² − 1), no cancellation against N
        ess_token = s1 * s1 / (N * s2)
    elif b > 0:  # a = Σ w e^{-shift}, b = Σ w² e^{-2 shift}
        log_m2 = 2.0 * shift + math.log(b) - log_n  # log mean w²
        token_chi2 = math.expm1(log_m2) if log_m2 < 709.0 else math.inf
        ess_token = math.exp(2.0 * math.log(a) - math.log(b) - log_n)
    else:  # every valid token has w = 0 (train_logp = -inf): mean w² = 0
        token_chi2, ess_token = -1.0, math.nan
    if direct:
        seq_chi2 = e_m1 / S
        ess_seq = math.exp(2.0 * math.log(e1) - math.log(e2) - math.log(S)) if e2 > 0 else math.nan
    elif e2 > 0:
        log_m2s = 2.0 * sh + math.log(e2) - math.log(S)
        seq_chi2 = math.expm1(log_m2s) if log_m2s < 709.0 else math.inf
        ess_seq = math.exp(2.0 * math.log(e1) - math.log(e2) - math.log(S))
    else:
        seq_chi2, ess_seq = -1.0, math.nan
    abs_max, p99 = _abs_tail(L, m, int(N), grp)
    return MismatchReport(
        token_kl=r_k3,
        token_kl_stderr=cluster_se(c_k3, r_k3),
        token_kl_k1=0.0 - r_L,  # never -0.0
        token_kl_k1_stderr=cluster_se(c_L, r_L),
        token_forward_kl=r_fwd,
        token_forward_kl_stderr=cluster_se(c_fwd, r_fwd),
        token_chi2=token_chi2,
        seq_kl=seq_k3_mean,
        seq_kl_stderr=seq_se(c_seq, seq_k3_mean),
        seq_chi2=seq_chi2,
        ess_token=min(ess_token, 1.0),
        ess_seq=min(ess_seq, 1.0),
        log_ppl_diff=ppl_mean,
        log_ppl_diff_stderr=seq_se(c_ppl, ppl_mean),
        abs_log_ratio_max=abs_max,
        abs_log_ratio_p99=p99,
        frac_ratio_above_2=n_above / N,
        frac_ratio_below_half=n_below / N,
        n_tokens=N,
        n_sequences=S,
    )


def _abs_tail(L: torch.Tensor, m: torch.Tensor | None, n: int, grp: _Group) -> tuple[float, float]:
    """max |L| and the exact 0.99 quantile of |L| over the valid tokens of the whole group."""
    # masked entries of L are 0 = |0|: the top-k multiset of |L| over valid tokens and zeros
    # equals that over the valid tokens alone (N >= k valid values, all >= 0)
    a = L.abs_().reshape(-1)  # L is mismatch's own array, not read after this
    k = n - math.floor(_Q * (n - 1))
    top = _top_k(a, k)
    if grp.world > 1:
        pad = torch.full((k,), -1.0, dtype=top.dtype, device=top.device)
        pad[: top.numel()] = top
        top = torch.topk(grp.gather(pad), k).values
    return float(top[0]), _quantile_from_top(top, n, _Q)


# ------------------------------------------------------------------------------------ peers

MISMATCH_NAMES = (
    "verl@0.9.1",
    "slime@0.3.1",
    "trl@1.16.0",
    "trl@1.16.0:token_truncate",
    "trl@1.16.0:token_mask",
    "trl@1.16.0:sequence_truncate",
    "trl@1.16.0:sequence_mask",
)
_LATEST = {"verl": "verl@0.9.1", "slime": "slime@0.3.1", "trl": "trl@1.16.0"}


def _peer_report(train_logp: Any, rollout_logp: Any, mask: Any, names: str) -> MismatchReport:
    if not isinstance(names, str):
        raise KlestError("must be a peer's name (str)", argument="names", value=names)
    fw, sep, option = names.partition(":")
    full = (_LATEST.get(fw, fw) + (sep + option if sep else "")) if "@" not in fw else names
    if full not in MISMATCH_NAMES:
        raise KlestError(
            f"unknown metric set {names!r}; known: {', '.join(MISMATCH_NAMES)}", argument="names"
        )
    tr = tensor_arg("train_logp", train_logp).detach()
    ro = tensor_arg("rollout_logp", rollout_logp).detach()
    if tr.shape != ro.shape or tr.ndim != 2:
        raise KlestError("train_logp and rollout_logp must both be [batch, seq]", argument="names")
    m = check_mask(mask, tr.shape, tr.device)
    dtype = torch.promote_types(tr.dtype, ro.dtype)
    tr, ro = tr.to(dtype), ro.to(dtype)
    mf = torch.ones_like(tr) if m is None else m.to(dtype)
    if full == "verl@0.9.1":
        peer, clamped = _verl(tr, ro, mf)
    elif full == "slime@0.3.1":
        peer, clamped = _slime(tr, ro, mf)
    else:
        mode = option if sep and option else "sequence_mask"
        peer, clamped = _trl(tr, ro, mf, mode)
    return _nan_report(n=math.nan, names=full, peer=peer, clamped=clamped)


_SAFETY = 20.0  # verl's and slime's SAFETY_BOUND on log-ratios before exp


def _flag(peer: dict[str, float], key: str, changed: bool, clamped: list[str]) -> None:
    peer[key + ".clamped"] = 1.0 if changed else 0.0
    if changed:
        clamped.append(key)


def _verl(
    tr: torch.Tensor, ro: torch.Tensor, mf: torch.Tensor
) -> tuple[dict[str, float], tuple[str, ...]]:
    """verl 0.9.1 ``trainer/ppo/rollout_corr_helper.py::compute_offpolicy_metrics`` (old_log_prob
    = train, rollout_log_prob = rollout), prefixed ``rollout_corr/`` as
    ``compute_rollout_corr_metrics_from_logprobs`` does. verl_F.masked_mean(v, m, axis) =
    Σ where(m, v, 0)·m / (Σ m + 1e-8); masked_sum the numerator."""
    mb = mf.bool()

    def msum(v: torch.Tensor, axis: int | None = None) -> torch.Tensor:
        return (
            (torch.where(mb, v, 0.0) * mf).sum(dim=axis)
            if axis is not None
            else (torch.where(mb, v, 0.0) * mf).sum()
        )

    def mmean(v: torch.Tensor, axis: int | None = None) -> torch.Tensor:
        den = mf.sum(dim=axis) if axis is not None else mf.sum()
        return msum(v, axis) / (den + 1e-8)

    out: dict[str, float] = {}
    clamped: list[str] = []
    mlp_tr = mmean(tr, -1)
    out["training_ppl"] = float(torch.exp(-mlp_tr).mean())
    out["training_log_ppl"] = float((-mlp_tr).mean())
    out["kl"] = float(mmean(ro - tr))
    L = tr - ro
    out["k3_kl"] = float(mmean(torch.exp(L) - L - 1))
    mlp_ro = mmean(ro, -1)
    out["rollout_ppl"] = float(torch.exp(-mlp_ro).mean())
    out["rollout_log_ppl"] = float((-mlp_ro).mean())
    d = mlp_ro - mlp_tr
    out["log_ppl_diff"] = float(d.mean())
    out["log_ppl_abs_diff"] = float(d.abs().mean())
    out["log_ppl_diff_max"] = float(d.max())
    out["log_ppl_diff_min"] = float(d.min())
    out["ppl_ratio"] = float(torch.exp(d).mean())
    Ls = torch.clamp(L, -_SAFETY, _SAFETY)
    out["chi2_token"] = float(mmean(torch.exp(Ls).square()) - 1.0)
    _flag(out, "chi2_token", bool(((Ls != L) & mb).any()), clamped)
    S = msum(L, -1)
    Ss = torch.clamp(S, -_SAFETY, _SAFETY)
    out["chi2_seq"] = float(torch.exp(2.0 * Ss).mean() - 1.0)
    _flag(out, "chi2_seq", bool((Ss != S).any()), clamped)
    peer = {"rollout_corr/" + k: v for k, v in out.items()}
    return peer, tuple("rollout_corr/" + k for k in clamped)


def _slime(
    tr: torch.Tensor, ro: torch.Tensor, mf: torch.Tensor
) -> tuple[dict[str, float], tuple[str, ...]]:
    """slime v0.3.1 ``examples/train_infer_mismatch_helper/mis.py::add_ppl_metrics`` (keys
    ``mis_<name>`` as ``compute_mis_weights_with_cp`` names them) and
    ``backends/megatron_utils/loss.py``'s ``train_rollout_logprob_abs_diff``, each reduced as
    slime's ``sum_of_sample_mean`` (per row Σ x·m / max(Σ m, 1)) and averaged over the B rows.
    The row masked sum is Σ x·m, so a NaN or inf in padding reaches the value (as in slime)."""
    B = tr.shape[0]
    n = mf.sum(dim=-1).clamp(min=1)

    def row_mean(x: torch.Tensor) -> torch.Tensor:  # per row, x [B, T]
        return (x * mf).sum(dim=-1) / n

    def report(per_row: torch.Tensor) -> float:
        # sum_of_sample_mean of a row-constant tensor: v_b·Σm/max(Σm, 1); then / B
        has = (mf.sum(dim=-1) > 0).to(per_row.dtype)
        return float((per_row * has).sum() / B)

    out: dict[str, float] = {}
    clamped: list[str] = []
    mlp_tr = row_mean(tr)
    mlp_ro = row_mean(ro)
    out["training_log_ppl"] = report(-mlp_tr)
    out["training_ppl"] = report(torch.exp(-mlp_tr))
    out["rollout_log_ppl"] = report(-mlp_ro)
    out["rollout_ppl"] = report(torch.exp(-mlp_ro))
    out["kl"] = float(row_mean(ro - tr).sum() / B)
    L = tr - ro
    out["k3_kl"] = float(row_mean(torch.exp(L) - L - 1).sum() / B)
    d = mlp_ro - mlp_tr
    out["log_ppl_diff"] = report(d)
    out["log_ppl_abs_diff"] = report(d.abs())
    out["ppl_ratio"] = report(torch.exp(d))
    Ls = torch.clamp(L, -_SAFETY, _SAFETY)
    out["chi2_token"] = report(row_mean(torch.exp(Ls).square()) - 1.0)
    _flag(out, "chi2_token", bool(((Ls != L) & mf.bool()).any()), clamped)
    S = (L * mf).sum(dim=-1)
    Ss = torch.clamp(S, -_SAFETY, _SAFETY)
    out["chi2_seq"] = report(torch.exp(2.0 * Ss) - 1.0)
    _flag(out, "chi2_seq", bool((Ss != S).any()), clamped)
    peer = {"mis_" + k: v for k, v in out.items()}
    peer["train_rollout_logprob_abs_diff"] = float(row_mean((tr - ro).abs()).sum() / B)
    return peer, tuple("mis_" + k for k in clamped)


def _trl(
    tr: torch.Tensor, ro: torch.Tensor, mf: torch.Tensor, mode: str
) -> tuple[dict[str, float], tuple[str, ...]]:
    """TRL 1.16.0 ``GRPOTrainer._generate_and_score_completions`` metrics with
    ``vllm_importance_sampling_correction`` on, clip_max 3.0 and clip_min None (the defaults):
    ``sampling/sampling_logp_difference/{mean,max}`` (|train − rollout| over valid, non-NaN
    tokens) and ``sampling/importance_sampling_ratio/{min,mean,max}`` of the corrected ratio
    (over valid tokens for token modes, over all B rows for sequence modes), in one process."""
    clip_max, clip_min = 3.0, None
    out: dict[str, float] = {}
    clamped: list[str] = []
    mb = mf.bool()
    delta = (tr - ro).abs()
    delta = delta[mb & ~torch.isnan(delta)]
    out["sampling/sampling_logp_difference/mean"] = float(delta.mean()) if delta.numel() else 0.0
    out["sampling/sampling_logp_difference/max"] = float(delta.max()) if delta.numel() else 0.0
    diff = torch.nan_to_num((tr - ro) * mf, nan=0.0)
    seq = mode.startswith("sequence")
    logd = diff.sum(dim=-1, keepdim=True) if seq else diff
    raw = torch.exp(logd)
    if mode.endswith("truncate"):
        ratio = torch.clamp(raw, min=clip_min, max=clip_max)
    else:
        lo = clip_min if clip_min is not None else -math.inf
        hi = clip_max if clip_max is not None else math.inf
        ratio = raw.masked_fill((raw < lo) | (raw > hi), 0.0)
    flat = ratio.flatten() if seq else ratio[mb]
    raw_flat = raw.flatten() if seq else raw[mb]
    changed = bool((flat != raw_flat).any())
    for stat in ("min", "mean", "max"):
        key = f"sampling/importance_sampling_ratio/{stat}"
        out[key] = float(getattr(flat, stat)()) if flat.numel() else 0.0
        _flag(out, key, changed, clamped)
    return out, tuple(clamped)
