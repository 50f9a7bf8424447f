r"""Importance weights that correct for the sampler–trainer mismatch, in log space, with their cost.

Samples come from the rollout policy μ; the trainer's policy is π; per valid token
L = log π(y_t) − log μ(y_t). :func:`importance_weights` builds w from L at a ``level``:

=============== ==========================================================================
``level``       log-weight of token t of sequence b
=============== ==========================================================================
``"token"``     L_bt (each token its own ratio; biased at sequence level)
``"sequence"``  Σ_t L_bt (the product ∏_t w_bt, the same for every token of the row)
``"geometric"`` Σ_t L_bt / n_b (the geometric mean of the row's ratios)
``"prefix"``    Σ_{s<=t} L_bs (per-decision weights ∏_{s<=t} w_bs: the unbiased one for the
                sequence-level gradient, as in :func:`klest.rl.sequence_kl`)
=============== ==========================================================================

then corrects it by ``mode``: ``"truncate"`` min(w, high); ``"clip"`` clamp to [low, high]
(low = None means 0); ``"mask"`` 0 outside [low, high] (the token, or the whole sequence for the
sequence and geometric levels; low = None means no lower bound, high = None no upper bound);
``"none"`` w itself. ``batch_normalize=True`` then divides by the mean weight over the valid tokens
(token, prefix) or sequences (sequence, geometric), over the process group when
``torch.distributed`` is initialised (a batch whose weights are all 0 is left as it is).

**Numerics.** Everything is computed on log-weights in float64: products are sums, comparisons
with the bounds are made between log w and log(bound) (``low=0`` is log 0 = −inf, never an
error), and w = exp(log w) is formed once, at the end. ``.log_weights`` (float64, −inf where the
weight is 0) is exact; ``.weights`` is exp of it rounded to the output dtype (the input's, or
``dtype=``): 300 tokens at w = 0.7 give 0.7³⁰⁰ = 3.4e-47 in float64, but 0 in float32, whose
smallest number is 1.4e-45 (``stats.n_underflow`` counts such tokens; pass
``dtype=torch.float64`` or use ``.log_weights``). A weight too large for the output dtype is
refused (:class:`klest.KlestError` naming ``dtype``), never returned as inf. Weights are never
NaN, and exactly 0 at masked positions.

**Cost of the correction** (``.stats``, plain floats over this process's valid tokens): tokens and
sequences whose weight the truncation/clip changed or the mask removed, the fraction of the raw
weight mass Σw they carried, and the normalised effective sample size (Σw)²/(n Σw²) of the raw
and of the corrected weights (over tokens for the token and prefix levels, over sequences for the
others).

**Peers** (``preset=``): each framework's correction by its own name and release
(``IMPORTANCE_PRESETS``), computed with these numerics; where the peer's own code gives inf, NaN,
0 from an overflow or a ±20 clamp, klest gives the exact value (docs/mismatch.md lists each).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
import torch.distributed as dist

from .._config import get_options
from .._torch import check_mask, world_size
from ..errors import KlestError
from ._inputs import logp_pair
from ._kernels import value as _estimator_value

__all__ = [
    "IMPORTANCE_LEVELS",
    "IMPORTANCE_MODES",
    "IMPORTANCE_PRESETS",
    "ImportanceStats",
    "ImportanceWeights",
    "importance_weights",
]

Level = Literal["token", "sequence", "geometric", "prefix"]
Mode = Literal["truncate", "clip", "mask", "none"]
IMPORTANCE_LEVELS: tuple[str, ...] = ("token", "sequence", "geometric", "prefix")
IMPORTANCE_MODES: tuple[str, ...] = ("truncate", "clip", "mask", "none")


class _DefaultHigh(float):
    """The default ``high`` (2.0): a preset replaces it by the peer's default."""


_HIGH = _DefaultHigh(2.0)


@dataclass(frozen=True)
class ImportanceStats:
    """What the correction did, over this process's valid tokens (see the module docs)."""

    n_tokens: float
    n_sequences: float
    tokens_clipped: float
    tokens_masked: float
    sequences_clipped: float
    sequences_masked: float
    mass_clipped: float
    mass_masked: float
    ess_before: float
    ess_after: float
    n_underflow: float
    batch_norm_factor: float

    def as_dict(self, prefix: str = "is/") -> dict[str, float]:
        return {prefix + f.name: float(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class ImportanceWeights:
    """``weights`` [B, T] (detached, output dtype, 0 at masked and rejected tokens), ``keep``
    (bool [B, T]: valid and not rejected), ``log_weights`` (float64, exact, −inf where the weight
    is 0), ``stats`` (:class:`ImportanceStats`)."""

    weights: torch.Tensor
    keep: torch.Tensor
    log_weights: torch.Tensor
    stats: ImportanceStats
    level: str
    mode: str
    low: float | None
    high: float | None
    preset: str | None = None


# ------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class _Gate:
    """Reject (keep = False) the units whose statistic lies outside [lo, hi].

    ``stat``: "ratio" (log w at ``level``, bounds compared in log space), "ratio_max" (the row's
    largest token ratio), "any_token" (a row is rejected if any token ratio is outside),
    "k1"/"k2"/"k3" with ``agg`` ("token", "sum", "mean", "max"); ``k1_sign`` −1 for k1 = −L
    (verl), +1 for k1 = L (AReaL); ``k3_flip``: k3 of −L (AReaL's e^{−L} − 1 + L);
    ``log_bounds``: k1 bounds given as ratios and compared after a log (verl)."""

    stat: str
    level: str = "token"
    agg: str = "token"
    k1_sign: float = -1.0
    k3_flip: bool = False
    log_bounds: bool = False


@dataclass(frozen=True)
class _Spec:
    name: str
    weight_level: str  # token, sequence, geometric, prefix, one (weights 1: rejection only)
    weight_mode: str  # truncate, clip, none
    gate: _Gate | None
    low: float | None
    high: float | None
    clip_only_rejected: bool = False  # AReaL's sequence-level clamp: clip only rejected rows
    needs_high: bool = False  # the peer has no default threshold
    needs_low: bool = False
    low_is_inverse_high: bool = False  # verl rollout_rs k1: low defaults to 1/high
    description: str = ""


IMPORTANCE_PRESETS: dict[str, _Spec] = {}


def _add(spec: _Spec) -> None:
    IMPORTANCE_PRESETS[spec.name] = spec


# TRL 1.16.0 GRPOConfig.vllm_importance_sampling_mode, clip_max 3.0, clip_min None
for _m in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
    _lvl = "token" if _m.startswith("token") else "sequence"
    _add(
        _Spec(
            f"trl@1.16.0:{_m}",
            _lvl,
            "clip" if _m.endswith("truncate") else "none",
            None if _m.endswith("truncate") else _Gate("ratio", _lvl),
            None,
            3.0,
            description=f"TRL GRPOTrainer vllm_importance_sampling_mode={_m!r}",
        )
    )
# OpenRLHF 0.11.2 --algo.advantage.is_correction_{level,mode}, threshold [0.5, 5.0]
_add(_Spec("openrlhf@0.11.2:tis", "token", "clip", None, 0.5, 5.0, description="token clip"))
_add(
    _Spec(
        "openrlhf@0.11.2:icepop",
        "token",
        "none",
        _Gate("ratio"),
        0.5,
        5.0,
        description="token mask",
    )
)
_add(
    _Spec(
        "openrlhf@0.11.2:seq-mask-tis",
        "token",
        "none",
        _Gate("ratio", "geometric"),
        0.5,
        5.0,
        description="rows rejected by their geometric-mean ratio; kept rows keep token ratios",
    )
)
# NeMo-RL 0.7.0 loss_fn.truncated_importance_sampling_{type,ratio,ratio_min}: no defaults
_add(
    _Spec(
        "nemo_rl@0.7.0:tis", "token", "clip", None, None, None, needs_high=True, description="clip"
    )
)
_add(
    _Spec(
        "nemo_rl@0.7.0:icepop",
        "token",
        "none",
        _Gate("ratio"),
        None,
        None,
        needs_high=True,
        needs_low=True,
    )
)
_add(
    _Spec(
        "nemo_rl@0.7.0:seq-mask-tis",
        "token",
        "none",
        _Gate("ratio", "geometric"),
        None,
        None,
        needs_high=True,
        needs_low=True,
    )
)
# verl 0.9.1 algorithm.rollout_correction: rollout_is (threshold 2.0; "lower_upper" = IcePop)
for _lvl in ("token", "sequence"):
    _add(_Spec(f"verl@0.9.1:rollout_is:{_lvl}", _lvl, "truncate", None, None, 2.0))
# verl 0.9.1 rollout_rs: rejection by k1/k2/k3 (threshold required; k1 bounds are ratios)
for _opt in (
    "token_k1",
    "token_k2",
    "token_k3",
    "seq_sum_k1",
    "seq_sum_k2",
    "seq_sum_k3",
    "seq_mean_k1",
    "seq_mean_k2",
    "seq_mean_k3",
    "seq_max_k2",
    "seq_max_k3",
):
    _agg = "token" if _opt.startswith("token") else _opt.split("_")[1]
    _k = _opt[-2:]
    _add(
        _Spec(
            f"verl@0.9.1:rollout_rs:{_opt}",
            "one",
            "none",
            _Gate(_k, agg=_agg, log_bounds=_k == "k1"),
            None,
            None,
            needs_high=True,
            low_is_inverse_high=_k == "k1",
        )
    )
# SkyRL 0.3.0 trainer.algorithm.off_policy_correction
_add(_Spec("skyrl@0.3.0:token_tis", "token", "truncate", None, None, 2.0))
_add(_Spec("skyrl@0.3.0:sequence_tis", "sequence", "truncate", None, None, 5.0))
_add(_Spec("skyrl@0.3.0:geometric_mask", "one", "none", _Gate("ratio", "geometric"), 0.99, 1.01))
_add(_Spec("skyrl@0.3.0:product_mask", "one", "none", _Gate("ratio", "sequence"), 0.5, 2.0))
_add(
    _Spec(
        "skyrl@0.3.0:token_mask",
        "one",
        "none",
        _Gate("ratio"),
        None,
        None,
        needs_high=True,
        needs_low=True,
    )
)
_add(_Spec("skyrl@0.3.0:outlier_token_mask", "one", "none", _Gate("any_token"), None, None))
# AReaL 1.0.4 actor.rejection_sampling (RejectionSamplingConfig): upper 5.0, lower None
for _level in ("token", "sequence"):
    for _action in ("mask", "clamp"):
        for _metric in ("ratio", "kl_k1", "kl_k2", "kl_k3"):
            for _agg in ("sum", "mean", "max") if _level == "sequence" else ("token",):
                _suffix = f":{_agg}" if _level == "sequence" else ""
                _name = f"areal@1.0.4:{_level}:{_action}:{_metric}{_suffix}"
                _wl = "geometric" if (_level == "sequence" and _metric == "ratio") else "token"
                if _metric == "ratio":
                    _g = _Gate(
                        {"sum": "ratio", "mean": "ratio", "max": "ratio_max"}.get(_agg, "ratio"),
                        {"sum": "sequence", "mean": "geometric"}.get(_agg, "token"),
                    )
                else:
                    _g = _Gate(_metric[3:], agg=_agg, k1_sign=1.0, k3_flip=True)
                if _action == "mask":
                    _add(_Spec(_name, _wl, "none", _g, None, 5.0))
                elif _level == "token":  # the weight is clamped whatever the metric
                    _add(_Spec(_name, "token", "clip", None, None, 5.0))
                else:
                    _add(_Spec(_name, _wl, "clip", _g, None, 5.0, clip_only_rejected=True))


# ------------------------------------------------------------------------------------ inputs


def _prepare(
    train_logp: Any, rollout_logp: Any, mask: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """float64 L (0 at masked positions; −inf where π gives a valid token probability 0) and the
    bool validity mask; the input dtype."""
    tr, ro = logp_pair(train_logp, rollout_logp)
    m = check_mask(mask, tr.shape, tr.device)
    valid = torch.ones(tr.shape, dtype=torch.bool, device=tr.device) if m is None else m
    tr64 = tr.detach().to(torch.float64)
    ro64 = ro.detach().to(torch.float64)
    if get_options().validate:
        bad_ro = int((~torch.isfinite(ro64) & valid).sum())
        if bad_ro:
            raise KlestError(
                f"is NaN or ±inf at {bad_ro} valid token(s)", argument="rollout_logp", value=ro
            )
        bad_tr = int(((torch.isnan(tr64) | (tr64 == torch.inf)) & valid).sum())
        if bad_tr:
            raise KlestError(
                f"is NaN or +inf at {bad_tr} valid token(s)", argument="train_logp", value=tr
            )
    L = torch.where(valid, tr64 - ro64, torch.zeros((), dtype=torch.float64, device=tr.device))
    return L, valid, torch.promote_types(tr.dtype, ro.dtype)


def _log_bound(x: float | None, default: float) -> float:
    if x is None:
        return default
    return math.log(x) if x > 0 else -math.inf


def _row(L: torch.Tensor, valid: torch.Tensor, level: str) -> torch.Tensor:
    """log-weights [B, T] at ``level`` (L is 0 at masked positions)."""
    if level == "token":
        return L
    if level == "prefix":
        return torch.cumsum(L, dim=1)
    if level == "one":
        return torch.zeros_like(L)
    s = L.sum(dim=1, keepdim=True)
    if level == "geometric":
        s = s / valid.sum(dim=1, keepdim=True).clamp(min=1).to(L.dtype)
    return s.expand_as(L)


def _gate_keep(
    L: torch.Tensor, valid: torch.Tensor, gate: _Gate, low: float | None, high: float | None
) -> torch.Tensor:
    """Per-token bool: the unit passes the gate (rows broadcast)."""
    if gate.stat in ("ratio", "ratio_max", "any_token"):
        lo, hi = _log_bound(low, -math.inf), _log_bound(high, math.inf)
        if gate.stat == "ratio":
            x = _row(L, valid, gate.level)
            return (x >= lo) & (x <= hi)
        if gate.stat == "ratio_max":
            neg = torch.full_like(L, -math.inf)
            x = torch.where(valid, L, neg).amax(dim=1, keepdim=True)
            x = torch.where(valid.any(dim=1, keepdim=True), x, torch.zeros_like(x))
            return ((x >= lo) & (x <= hi)).expand_as(L)
        inside = ((L >= lo) & (L <= hi)) | ~valid  # any_token: every valid token inside
        return inside.all(dim=1, keepdim=True).expand_as(L)
    # k1 / k2 / k3 statistics
    if gate.stat == "k1":
        v = gate.k1_sign * L
    elif gate.stat == "k2":
        v = 0.5 * L * L
    else:
        v = _estimator_value("k3", -L if gate.k3_flip else L)  # e^L − 1 − L (or of −L), stable
    v = torch.where(valid, v, torch.zeros_like(v))
    if gate.agg == "sum":
        v = v.sum(dim=1, keepdim=True).expand_as(L)
    elif gate.agg == "mean":
        n = valid.sum(dim=1, keepdim=True).clamp(min=1).to(v.dtype)
        v = (v.sum(dim=1, keepdim=True) / n).expand_as(L)
    elif gate.agg == "max":
        x = torch.where(valid, v, torch.full_like(v, -math.inf)).amax(dim=1, keepdim=True)
        v = torch.where(valid.any(dim=1, keepdim=True), x, torch.zeros_like(x)).expand_as(L)
    if gate.log_bounds:
        lo, hi = _log_bound(low, -math.inf), _log_bound(high, math.inf)
    else:
        lo = -math.inf if low is None else low
        hi = math.inf if high is None else high
    return (v >= lo) & (v <= hi)


# ------------------------------------------------------------------------------------- main


def _resolve(
    preset: str | None, level: str, mode: str, low: float | None, high: float | None
) -> _Spec:
    explicit_high = not isinstance(high, _DefaultHigh)
    for name, v in (("low", low), ("high", high)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
            raise KlestError(
                f"must be a real number or None, got {type(v).__name__}", argument=name, value=v
            )
    if preset is None:
        if level not in IMPORTANCE_LEVELS:
            raise KlestError(
                f"must be one of {', '.join(map(repr, IMPORTANCE_LEVELS))}, got {level!r}",
                argument="level",
            )
        if mode not in IMPORTANCE_MODES:
            raise KlestError(
                f"must be one of {', '.join(map(repr, IMPORTANCE_MODES))}, got {mode!r}",
                argument="mode",
            )
        h = None if high is None else float(high)
        if mode == "truncate" and low is not None:
            raise KlestError(
                "truncate is min(w, high) and takes no lower bound; use mode='clip'",
                argument="low",
            )
        if mode == "truncate" and h is None:
            raise KlestError("truncate needs an upper bound", argument="high")
        if mode == "mask":
            return _Spec("", level, "none", _Gate("ratio", level), low, h)
        return _Spec("", level, mode, None, low, h)
    if not isinstance(preset, str) or preset not in IMPORTANCE_PRESETS:
        raise KlestError(
            f"unknown preset {preset!r}; known: {', '.join(sorted(IMPORTANCE_PRESETS))}",
            argument="preset",
        )
    spec = IMPORTANCE_PRESETS[preset]
    lo = spec.low if low is None else float(low)
    hi = float(high) if (explicit_high and high is not None) else spec.high
    if spec.needs_high and not explicit_high:
        raise KlestError(
            f"{preset} has no default threshold in the peer's release; pass high=",
            argument="high",
        )
    if spec.needs_low and low is None:
        raise KlestError(
            f"{preset} has no default lower threshold in the peer's release; pass low=",
            argument="low",
        )
    if spec.low_is_inverse_high and lo is None and hi is not None:
        lo = 1.0 / hi
    if preset.startswith("verl@") and ":rollout_is:" in preset and lo is not None:
        # verl's "lower_upper" threshold: IcePop, the raw weight kept inside [lower, upper]
        spec = replace(spec, weight_mode="none", gate=_Gate("ratio", spec.weight_level))
    return replace(spec, low=lo, high=hi)


def _check_bounds(low: float | None, high: float | None) -> None:
    for name, v in (("low", low), ("high", high)):
        if v is not None and not v >= 0.0:  # NaN fails too
            raise KlestError(f"must be a number >= 0, got {v}", argument=name)
    if low is not None and high is not None and not low < high:
        raise KlestError(f"bounds must satisfy low < high, got ({low}, {high})", argument="low")


def _lse(x: torch.Tensor) -> float:
    return float(torch.logsumexp(x, dim=0)) if x.numel() else -math.inf


def _ess(logw: torch.Tensor) -> float:
    """(Σw)²/(n Σw²) from log-weights (1-d); NaN when every weight is 0 or there is none."""
    n = logw.numel()
    if n == 0:
        return math.nan
    a, b = _lse(logw), _lse(2.0 * logw)
    if b == -math.inf:
        return math.nan
    return min(1.0, math.exp(2.0 * a - b - math.log(n)))


def importance_weights(
    train_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    level: Level = "token",
    mode: Mode = "truncate",
    low: float | None = None,
    high: float | None = _HIGH,
    batch_normalize: bool = False,
    preset: str | None = None,
    dtype: torch.dtype | None = None,
    group: Any = None,
    distributed: bool | None = None,
) -> ImportanceWeights:
    r"""Importance weights w ≈ π/μ for samples of the rollout policy μ, corrected by ``mode``.

    .. math::
        \log w_{bt} = \begin{cases} L_{bt} & \text{token} \\ \sum_s L_{bs} & \text{sequence} \\
        \tfrac{1}{n_b}\sum_s L_{bs} & \text{geometric} \\ \sum_{s \le t} L_{bs} & \text{prefix}
        \end{cases}, \qquad L = \log\pi - \log\mu

    then truncate (min(w, high)), clip (clamp to [low, high]), mask (0 outside [low, high]) or
    none, and optionally divide by the batch mean. ``preset=`` names a peer's correction
    (``IMPORTANCE_PRESETS``); with a preset, ``high``/``low`` left at their defaults take the
    peer's defaults. See :mod:`klest.rl.importance` for the numerics and ``.stats``.

    >>> import torch, klest.rl as rl
    >>> L = torch.tensor([[1.5, 0.0, -0.5]])
    >>> iw = rl.importance_weights(L, torch.zeros(1, 3), high=3.0)
    >>> iw.weights, iw.stats.tokens_clipped
    (tensor([[3.0000, 1.0000, 0.6065]]), 1.0)
    """
    if not isinstance(batch_normalize, bool):
        raise KlestError(
            f"must be True or False, got {type(batch_normalize).__name__}",
            argument="batch_normalize",
        )
    spec = _resolve(preset, level, mode, low, high)
    _check_bounds(spec.low, spec.high)
    L, valid, in_dtype = _prepare(train_logp, rollout_logp, mask)
    out_dtype = in_dtype if dtype is None else dtype
    if not out_dtype.is_floating_point:
        raise KlestError("must be a floating dtype", argument="dtype")
    has = valid.any(dim=1)
    raw = _row(L, valid, spec.weight_level)  # log w before the correction
    keep = valid.clone()
    if spec.gate is not None:
        keep &= _gate_keep(L, valid, spec.gate, spec.low, spec.high)
    logw = raw
    if spec.weight_mode in ("truncate", "clip"):
        lo = -math.inf if spec.weight_mode == "truncate" else _log_bound(spec.low, -math.inf)
        hi = _log_bound(spec.high, math.inf)
        clipped = raw.clamp(min=lo, max=hi)
        if spec.clip_only_rejected:  # AReaL: clamp only the rejected rows, reject none
            clipped = torch.where(keep, raw, clipped)
            keep = valid.clone()
        logw = clipped
    neg_inf = torch.full((), -math.inf, dtype=torch.float64, device=L.device)
    logw = torch.where(keep, logw, neg_inf)
    changed = valid & keep & (logw != raw)
    removed = valid & ~keep
    seq_units = spec.weight_level in ("sequence", "geometric")
    norm = 1.0
    if batch_normalize:
        if seq_units:  # one weight per sequence, read at its first valid token
            first = logw.gather(1, valid.to(torch.int64).argmax(dim=1, keepdim=True))[:, 0]
            units = first[has]
        else:
            units = logw[valid]
        grp_world = world_size(
            True if group is not None and distributed is None else distributed, group
        )
        lse = _lse(units)
        n_units = float(units.numel())
        if grp_world > 1:
            shift = torch.tensor([lse], dtype=torch.float64, device=L.device)
            dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
            sh = float(shift)
            part = torch.tensor(
                [math.exp(lse - sh) if math.isfinite(sh) and lse > -math.inf else 0.0, n_units],
                dtype=torch.float64,
                device=L.device,
            )
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
            lse = sh + math.log(float(part[0])) if float(part[0]) > 0 else -math.inf
            n_units = float(part[1])
        if lse > -math.inf and n_units > 0:
            log_mean = lse - math.log(n_units)
            logw = logw - log_mean
            norm = math.exp(log_mean)
    weights64 = torch.exp(logw)
    finfo = torch.finfo(out_dtype)
    too_big = bool((logw > math.log(finfo.max)).any())
    if too_big:
        big = float(logw.max())
        raise KlestError(
            f"a weight e^{big:.4g} exceeds the largest {out_dtype} ({finfo.max:.4g}); pass "
            "dtype=torch.float64 or read .log_weights (exact, float64), or bound it with "
            "mode='truncate'/'clip'",
            argument="dtype",
        )
    weights = weights64.to(out_dtype)
    n_under = float(((weights == 0) & keep & (logw > -math.inf)).sum())
    # ----- stats (this process)
    if seq_units:
        idx = valid.to(torch.int64).argmax(dim=1, keepdim=True)
        raw_u = raw.gather(1, idx)[:, 0][has]
        fin_u = logw.gather(1, idx)[:, 0][has]
        ch_u = changed.any(dim=1)[has]
        rm_u = removed.any(dim=1)[has]
    else:
        raw_u, fin_u = raw[valid], logw[valid]
        ch_u, rm_u = changed[valid], removed[valid]
    lse_all = _lse(raw_u)

    def mass(sel: torch.Tensor) -> float:
        if lse_all == -math.inf or not bool(sel.any()):
            return 0.0
        return math.exp(_lse(raw_u[sel]) - lse_all)

    stats = ImportanceStats(
        n_tokens=float(valid.sum()),
        n_sequences=float(has.sum()),
        tokens_clipped=float(changed.sum()),
        tokens_masked=float(removed.sum()),
        sequences_clipped=float((changed.any(dim=1) & has).sum()),
        sequences_masked=float((removed.any(dim=1) & has).sum()),
        mass_clipped=mass(ch_u),
        mass_masked=mass(rm_u),
        ess_before=_ess(L[valid] if spec.weight_level == "one" else raw_u),
        ess_after=_ess(fin_u),
        n_underflow=n_under,
        batch_norm_factor=norm,
    )
    return ImportanceWeights(
        weights=weights,
        keep=keep,
        log_weights=logw,
        stats=stats,
        level=spec.weight_level,
        mode=mode if preset is None else spec.weight_mode,
        low=spec.low,
        high=spec.high,
        preset=preset,
    )
