r"""The bias of each importance-weight correction, exactly (``klest gradients --mismatch D``).

The gradient lab's toy policy (:mod:`klest.lab.gradients`: a logit table θ per prefix,
vocabulary V, length T, every sequence listed) is sampled by a rollout policy μ that differs from
the trainer's policy π = softmax(θ) by a controlled amount:

.. math::
    \text{logits}(\mu) = \theta + s\,d, \qquad \mathrm{KL}(\mu\,\|\,\pi) =
    E_\mu\Big[\sum_t \log\mu(y_t|y_{<t}) - \log\pi(y_t|y_{<t})\Big] = D,

d a fixed N(0, 1) direction (the draw ``klest gradients --off-policy`` scales) and the scale
s >= 0 solved (bracketing and bisection) so that the sequence KL(μ‖π), in nats per sequence, is
D — the quantity ``klest.rl.mismatch(...).seq_kl`` estimates from a batch (D = 0: μ = π).

Each correction (a level × mode of :func:`klest.rl.importance_weights`, or a peer preset) is
called on the whole enumerated batch (all N = V^T sequences, train_logp = log π, rollout_logp =
log μ, float64) and gives a weight W_t(y) per token. Every sequence is then weighted by its
probability μ(y) (the sampler's), so expectations are exact. Two gradients:

.. math::
    g_{PG}(y) = \sum_t W_t(y)\, R(y)\, \nabla\log\pi(y_t|y_{<t}), \qquad
    g_{KL}(y) = \sum_t \nabla\log\pi(y_t|y_{<t}) \sum_{s \ge t} W_s(y)\,\ell_s(y)

(ℓ_s = log π − log π_ref). g_PG is how the peers apply a correction: the weight multiplies token
t's policy-gradient term, here REINFORCE with the lab's reward R (one N(0, 1) number per
sequence) as every token's advantage; target ∇_θ E_π[R]. g_KL is klest's sequence-level KL term
(``klest.rl.sequence_kl``, estimator k1, whose per-decision weighting multiplies each per-token
value ℓ_s by its weight before the reward-to-go sum), with the correction's weights in place of
w_{1:s}; target ∇_θ KL(π‖π_ref) of whole sequences. Both targets are computed independently by
autograd through the enumerated closed forms Σ_y π(y) R(y) and Σ_y π(y) Σ_t ℓ_t.

Reported: ‖ḡ − g*‖/‖g*‖ and the cosine, for ḡ = Σ_y μ(y) g(y); tr Cov of the mean gradient of a
batch of B samples of μ, (1/B) Σ_y μ(y)‖g(y) − ḡ‖²; and the normalised effective sample size
of the corrected weights, the large-batch limit of ``stats.ess_after``:

.. math::
    \mathrm{ESS} = \frac{(E_\mu[\sum_t W_t])^2}{E_\mu[n]\,E_\mu[\sum_t W_t^2]} \text{ (tokens)},
    \qquad \frac{E_\mu[W]^2}{E_\mu[W^2]} \text{ (sequence and geometric levels: one weight per
    sequence)}.

Which corrections are exact: with the whole-sequence weight ∏_t w_t (level "sequence", mode
"none") both gradients are unbiased; the per-decision weights w_{1:t} (level "prefix", mode
"none") are unbiased for the KL term (each ℓ_s depends on y_≤s only) but **not** for a policy
gradient whose reward depends on the whole sequence: E_μ[w_{1:t} R ∇log π_t] replaces the
continuation's distribution π(y_>t|y_≤t) by μ's. Everything else is biased wherever it changes a
weight.

``batch_normalize`` is off in every row: a sequence's weights then depend on that sequence only,
and the expectation over μ is exact. With it on, the weights are divided by a batch mean (a
ratio estimator whose expectation depends on B); the rows marked "normalised (B → ∞)" divide by
the exact mean E_μ[W] (per token, or per sequence at the sequence level), its large-batch limit.

Torch is imported by the functions here (``import klest.lab`` does not import it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import KlestError
from .experiments import rows_to_csv, rows_to_json
from .gradients import (
    Batch,
    Option,
    ToyModel,
    _compare,
    _num,
    _one_thread,
    _table,
    exact_gradients,
    sequence_kl_gradients,
    toy_model,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MISMATCH",
    "FLOOR",
    "SWEEP",
    "Correction",
    "MismatchSetting",
    "correction_gradients",
    "correction_weights",
    "corrections",
    "exact_ess",
    "format_mismatch_rows",
    "mismatch_model",
    "mismatch_table",
    "plot_mismatch",
    "policy_gradient",
    "run_mismatch",
    "sequence_mismatch_kl",
    "sweep_mismatch",
]

DEFAULT_MISMATCH = 0.5  # nats per sequence: the docs' table
SWEEP: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
EXACT_BELOW = 1e-12  # a relative error below this is float64 rounding (shown as "< 1e-12")
FLOOR = 1e-4  # the plot's floor: smaller relative errors are drawn on it


# ------------------------------------------------------------------------------ the sampler μ
@dataclass(frozen=True)
class MismatchSetting:
    """The toy model with ``model.old`` = μ's logits θ + ``scale``·d, at sequence
    KL(μ‖π) = ``D`` nats (``token_kl`` = D / E_μ[valid tokens])."""

    model: ToyModel
    D: float
    scale: float
    token_kl: float


def sequence_mismatch_kl(model: ToyModel, sampler: torch.Tensor) -> float:
    """KL(μ‖π) of whole sequences, exactly: Σ_y μ(y) Σ_t m_t (log μ_t − log π_t), for μ's logit
    table ``sampler`` [P, V] and π's ``model.theta``."""
    lm, lp = model.logp(sampler), model.logp(model.theta)
    m = model.mask.to(lm.dtype)
    return float((lm.sum(1).exp() * ((lm - lp) * m).sum(1)).sum())


def _canonical_reward(model: ToyModel) -> torch.Tensor:
    """The reward of the valid part of each sequence (with ``eos``, tokens after the end are not
    sampled by anything the gradient sees, so the reward must not depend on them)."""
    import torch

    if bool(model.mask.all()):
        return model.reward
    canon = torch.where(model.mask, model.seqs, torch.zeros_like(model.seqs))
    powers = model.V ** torch.arange(model.T - 1, -1, -1)
    index = (canon * powers).sum(1)  # cartesian_prod order: base-V digits, first most significant
    return model.reward[index]


def mismatch_model(
    V: int = 4,
    T: int = 4,
    *,
    mismatch: float = DEFAULT_MISMATCH,
    distance: float = 1.0,
    eos: bool = False,
    seed: int = 0,
) -> MismatchSetting:
    """π, π_ref and the reward of :func:`klest.lab.gradients.toy_model` (same seed), and μ with
    logits θ + s·d where s solves KL(μ‖π) = ``mismatch`` (nats per sequence) and d is the N(0, 1)
    draw that ``toy_model``'s ``off_policy`` scales. Refused (:class:`klest.KlestError` naming
    ``mismatch``) when D is negative, not finite, or beyond what the direction reaches (the KL
    tends to a finite limit as s grows: μ becomes deterministic)."""

    D = mismatch
    if isinstance(D, bool) or not isinstance(D, (int, float)) or not (math.isfinite(D) and D >= 0):
        raise KlestError("must be a finite number >= 0 (nats per sequence)", argument="mismatch")
    base = toy_model(V, T, distance=distance, off_policy=1.0, eos=eos, seed=seed)
    assert base.old is not None
    model = replace(base, reward=_canonical_reward(base))
    scale = _solve_scale(model, base.old - base.theta, float(D))
    if isinstance(scale, str):
        raise KlestError(scale, argument="mismatch")
    old = model.theta.clone() if scale == 0 else model.theta + scale * (base.old - base.theta)
    model = replace(model, old=old)
    n = (model.seq_logprob(old).exp() * model.mask.sum(1).to(old.dtype)).sum()
    return MismatchSetting(model, float(D), float(scale), float(D) / float(n))


def _solve_scale(model: ToyModel, d: torch.Tensor, D: float) -> float | str:
    """s >= 0 with KL(μ_s‖π) = D for μ_s = θ + s·d (bracket by doubling, then bisection to the
    last bit), or the reason there is none (D beyond the limit as s grows)."""

    def kl(s: float) -> float:
        return sequence_mismatch_kl(model, model.theta + s * d)

    if D == 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while kl(hi) < D:
        lo, hi = hi, 2.0 * hi
        if hi > 2.0**30:
            return (
                f"KL(μ‖π) = {D:g} nats is more than this direction reaches (about "
                f"{kl(hi):.4g} as μ becomes deterministic); use a smaller value"
            )
    for _ in range(200):  # bisection on a bracket [lo, hi] with kl(lo) < D <= kl(hi)
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if kl(mid) < D:
            lo = mid
        else:
            hi = mid
    return hi


def policy_gradient(model: ToyModel) -> torch.Tensor:
    """∇_θ E_π[R] [P·V] by autograd of Σ_y π(y) R(y) (the target of the policy-gradient rows)."""
    import torch

    th = model.theta.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad((model.seq_logprob(th).exp() * model.reward).sum(), th)
    return g.reshape(-1)


# ----------------------------------------------------------------------------- corrections
@dataclass(frozen=True)
class Correction:
    """One row: ``importance_weights(level=, mode=, low=, high=)`` or ``preset=`` (with ``low``
    and ``high`` passed when not None); ``kind`` "none" (weights 1), "klest" or "preset";
    ``normalise``: divide by the exact E_μ[W] (batch normalisation, large-batch limit)."""

    name: str
    kind: str
    level: str | None = None
    mode: str | None = None
    low: float | None = None
    high: float | None = None
    preset: str | None = None
    normalise: bool = False


_BAND = (0.5, 2.0)  # the generic rows' bounds: truncate at 2, clip and mask to [0.5, 2]
# thresholds for the presets that have no default in the peer's release (shown in the table)
_RS_HIGH = {"k1": 2.0, "k2": 0.2, "k3": 0.2}  # verl rollout_rs: k1 bound a ratio, k2/k3 a KL


def corrections(*, presets: bool = True, T: int = 4) -> list[Correction]:
    """The rows: no correction; every level × mode of ``importance_weights`` (truncate at 2,
    clip and mask to [0.5, 2]); the peers' presets (their defaults; where a release has none,
    bounds [0.5, 2] for ratios and 0.2 per token for k2/k3 statistics, T·0.2 for sums; AReaL's
    k2 metric, whose default bound 5.0 is meant for ratios, also at 0.2)."""
    lo, hi = _BAND
    out = [Correction("no correction (weights 1)", "none")]
    names = {
        "token": "token",
        "prefix": "prefix (per-decision)",
        "sequence": "sequence (product)",
        "geometric": "geometric mean",
    }
    for level in ("token", "prefix", "sequence", "geometric"):
        for mode, low, high in (
            ("none", None, None),
            ("truncate", None, hi),
            ("clip", lo, hi),
            ("mask", lo, hi),
        ):
            out.append(Correction(f"{names[level]} × {mode}", "klest", level, mode, low, high))
    if not presets:
        return out
    pre: list[tuple[str, float | None, float | None]] = []
    pre += [(f"trl@1.16.0:{m}", None, None) for m in ("token_truncate", "token_mask")]
    pre += [(f"trl@1.16.0:{m}", None, None) for m in ("sequence_truncate", "sequence_mask")]
    pre += [(f"openrlhf@0.11.2:{m}", None, None) for m in ("tis", "icepop", "seq-mask-tis")]
    pre += [(f"nemo_rl@0.7.0:{m}", 0.5, 5.0) for m in ("tis", "icepop", "seq-mask-tis")]
    pre += [(f"verl@0.9.1:rollout_is:{m}", None, None) for m in ("token", "sequence")]
    for opt in (
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
        h = _RS_HIGH[opt[-2:]]
        if opt.startswith("seq_sum"):
            h = h if opt.endswith("k1") else h * T
        pre.append((f"verl@0.9.1:rollout_rs:{opt}", None, h))
    pre += [(f"skyrl@0.3.0:{m}", None, None) for m in ("token_tis", "sequence_tis")]
    pre += [(f"skyrl@0.3.0:{m}", None, None) for m in ("geometric_mask", "product_mask")]
    pre += [(f"skyrl@0.3.0:{m}", lo, hi) for m in ("token_mask", "outlier_token_mask")]
    pre += [
        (f"areal@1.0.4:{m}", None, None)
        for m in (
            "token:mask:ratio",
            "token:clamp:ratio",
            "sequence:mask:ratio:mean",
            "sequence:mask:ratio:sum",
            "sequence:clamp:ratio:mean",
        )
    ]
    pre.append(("areal@1.0.4:sequence:mask:kl_k2:mean", None, _RS_HIGH["k2"]))
    out += [Correction(p, "preset", preset=p, low=lo_, high=hi_) for p, lo_, hi_ in pre]
    for lvl in ("token", "sequence"):
        p = f"verl@0.9.1:rollout_is:{lvl}"
        out.append(Correction(p + " normalised (B → ∞)", "preset", preset=p, normalise=True))
    return out


def correction_weights(model: ToyModel, c: Correction) -> tuple[torch.Tensor, bool, Any]:
    """(W [N, T] float64, one weight per sequence?, the ImportanceWeights or None): the real
    ``klest.rl.importance_weights`` on all N sequences (train_logp = log π, rollout_logp = log μ),
    ``batch_normalize=False``; normalised rows then divide by the exact μ-mean."""
    import torch

    import klest.rl as rl

    if model.old is None:
        raise KlestError("the model needs a sampler μ (model.old)", argument="model")
    m = model.mask
    if c.kind == "none":
        return m.to(torch.float64), False, None
    kw: dict[str, Any] = {}
    if c.preset is not None:
        kw["preset"] = c.preset
        if c.low is not None:
            kw["low"] = c.low
        if c.high is not None:
            kw["high"] = c.high
    else:
        kw.update(level=c.level, mode=c.mode, low=c.low, high=c.high)
    try:
        iw = rl.importance_weights(
            model.logp(model.theta), model.logp(model.old), m, dtype=torch.float64, **kw
        )
    except KlestError as e:
        if e.argument != "dtype":
            raise
        # μ nearly deterministic: some sequence's weight π/μ is beyond float64 (the exact
        # expectations are finite, but these weights cannot be formed); not the user's dtype
        raise KlestError(
            f"the weights of '{c.name}' overflow float64 at this mismatch (some token or "
            "sequence has μ < e^-709·π); use a smaller value",
            argument="mismatch",
        ) from None
    seq_units = iw.level in ("sequence", "geometric")
    W = iw.weights
    if c.normalise:
        s = model.seq_logprob(model.old).exp()
        if seq_units:
            first = W.gather(1, m.to(torch.int64).argmax(1, keepdim=True))[:, 0]
            mean = s @ first
        else:
            mean = (s @ W.sum(1)) / (s @ m.sum(1).to(W.dtype))
        if float(mean) > 0:
            W = W / mean
    return W, seq_units, iw


def exact_ess(model: ToyModel, W: torch.Tensor, seq_units: bool) -> float:
    """The normalised ESS of the weights W [N, T] under μ, exactly (module docs); NaN when every
    weight is 0."""
    import torch

    assert model.old is not None
    s = model.seq_logprob(model.old).exp()
    m = model.mask
    if seq_units:
        w = W.gather(1, m.to(torch.int64).argmax(1, keepdim=True))[:, 0]
        num, den = float(s @ w) ** 2, float(s @ (w * w))
    else:
        num = float(s @ W.sum(1)) ** 2
        den = float(s @ m.sum(1).to(W.dtype)) * float(s @ (W * W).sum(1))
    return num / den if den > 0 else math.nan


def _pg_loss(W: torch.Tensor, R: torch.Tensor) -> Any:
    import klest.rl as rl

    def f(b: Batch) -> torch.Tensor:
        return rl.aggregate(W * R[:, None] * b.logp, b.mask, "seq-mean-token-sum")

    return f


def _kl_loss(W: torch.Tensor) -> Any:
    import klest.rl as rl

    def f(b: Batch) -> torch.Tensor:
        ell = rl.kl_penalty(b.logp, b.ref_logp, mask=b.mask, estimator="k1")  # detached ℓ_t
        returns = rl.reward_to_go(W * ell, b.mask)  # Σ_{s>=t} W_s ℓ_s
        return rl.aggregate(b.logp * returns, b.mask, "seq-mean-token-sum")

    return f


def correction_gradients(
    model: ToyModel, W: torch.Tensor
) -> tuple[torch.Tensor, float, torch.Tensor, float]:
    """(E_μ[g_PG], tr Cov g_PG, E_μ[g_KL], tr Cov g_KL) for one sequence, exactly, with the
    weights W [N, T] (module docs), through the gradient lab's per-sequence autograd."""
    pg = Option("pg", "-", "-", _pg_loss(W, model.reward), off_policy=True)
    kl = Option("kl", "k1", "reward-to-go", _kl_loss(W), off_policy=True)
    m_pg, v_pg = exact_gradients(model, pg)
    m_kl, v_kl = exact_gradients(model, kl)
    return m_pg, v_pg, m_kl, v_kl


def _bounds(c: Correction, iw: Any) -> str:
    if c.kind == "none":
        return "-"
    low, high = (iw.low, iw.high) if iw is not None else (c.low, c.high)
    mode = iw.mode if iw is not None else c.mode
    if mode == "none" and c.preset is None:
        return "-"
    if low is None and high is None:
        return "-"
    if low is None:
        return f"≤ {high:g}"
    if high is None:
        return f"≥ {low:g}"
    return f"[{low:g}, {high:g}]"


def mismatch_table(
    setting: MismatchSetting, corr: Sequence[Correction] | None = None, *, B: int = 64
) -> list[dict[str, Any]]:
    """One row per correction (module docs); keys ``relative_error_policy_gradient``,
    ``cosine_policy_gradient``, ``relative_error_kl_gradient``, ``cosine_kl_gradient``,
    ``trace_variance_policy_gradient``, ``trace_variance_kl_gradient`` (batch of B), ``ess``."""
    if B < 1:
        raise KlestError("must be >= 1", argument="B", value=B)
    model = setting.model
    if corr is None:
        corr = corrections(T=model.T)
    g_pg = policy_gradient(model)
    g_kl = sequence_kl_gradients(model)[0].reshape(-1)
    rows = []
    for c in corr:
        W, seq_units, iw = correction_weights(model, c)
        m_pg, v_pg, m_kl, v_kl = correction_gradients(model, W)
        ess = exact_ess(model, W, seq_units)
        rp, cp = _compare(m_pg, g_pg, 1e-12 * math.sqrt(v_pg + float(m_pg @ m_pg)))
        rk, ck = _compare(m_kl, g_kl, 1e-12 * math.sqrt(v_kl + float(m_kl @ m_kl)))
        rows.append(
            {
                "correction": c.name,
                "kind": c.kind,
                "level": iw.level if iw is not None else "-",
                "mode": iw.mode if iw is not None else "-",
                "preset": c.preset,
                "bounds": _bounds(c, iw),
                "low": iw.low if iw is not None else None,
                "high": iw.high if iw is not None else None,
                "batch_normalize": "B → ∞" if c.normalise else "no",
                "relative_error_policy_gradient": rp,
                "cosine_policy_gradient": cp,
                "relative_error_kl_gradient": rk,
                "cosine_kl_gradient": ck,
                "trace_variance_policy_gradient": v_pg / B,
                "trace_variance_kl_gradient": v_kl / B,
                "ess": None if math.isnan(ess) else ess,  # None: every weight is 0
                "ess_units": "sequences" if seq_units else "tokens",
                "mismatch_kl": setting.D,
                "mismatch_token_kl": setting.token_kl,
                "scale": setting.scale,
                "B": B,
                "V": model.V,
                "T": model.T,
            }
        )
    return rows


def run_mismatch(
    mismatch: float = DEFAULT_MISMATCH,
    *,
    V: int = 4,
    T: int = 4,
    B: int = 64,
    distance: float = 1.0,
    seed: int = 0,
    presets: bool = True,
    eos: bool = False,
) -> list[dict[str, Any]]:
    """What ``klest gradients --mismatch D`` prints (D = ``mismatch``, nats per sequence)."""
    with _one_thread():
        setting = mismatch_model(V, T, mismatch=mismatch, distance=distance, eos=eos, seed=seed)
        return mismatch_table(setting, corrections(presets=presets, T=T), B=B)


_PLOTTED = (
    "no correction (weights 1)",
    "token × none",
    "token × truncate",
    "token × mask",
    "prefix (per-decision) × none",
    "prefix (per-decision) × truncate",
    "sequence (product) × none",
    "sequence (product) × truncate",
    "geometric mean × mask",
    "trl@1.16.0:sequence_mask",
    "openrlhf@0.11.2:icepop",
)


def sweep_mismatch(
    values: Sequence[float] = SWEEP,
    *,
    V: int = 4,
    T: int = 4,
    B: int = 64,
    distance: float = 1.0,
    seed: int = 0,
    names: Sequence[str] = _PLOTTED,
    eos: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """For each correction named in ``names``: its rows at each D of ``values`` (increasing;
    the values beyond what the direction of μ reaches, see :func:`mismatch_model`, are left
    out)."""
    corr = [c for c in corrections(presets=True, T=T) if c.name in names]
    out: dict[str, list[dict[str, Any]]] = {c.name: [] for c in corr}
    with _one_thread():
        for D in sorted(values):
            base = toy_model(V, T, distance=distance, off_policy=1.0, eos=eos, seed=seed)
            assert base.old is not None
            if isinstance(_solve_scale(base, base.old - base.theta, float(D)), str):
                break  # beyond reach, and so are the larger values
            setting = mismatch_model(V, T, mismatch=D, distance=distance, eos=eos, seed=seed)
            for r in mismatch_table(setting, corr, B=B):
                out[r["correction"]].append(r)
    return out


def plot_mismatch(sweep: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """Three panels against D (log axis): the relative error of the expected policy gradient, of
    the expected KL gradient (log axes; an error below ``FLOOR``, exact up to rounding or a
    correction that changes no weight, is drawn on the floor line), and the ESS; one line per
    correction."""
    from .plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    cmap = plt.get_cmap("tab10")
    for i, (name, rows) in enumerate(sweep.items()):
        pts = [r for r in rows if r["mismatch_kl"] > 0]
        x = [r["mismatch_kl"] for r in pts]
        style = {"color": cmap(i % 10), "marker": "o", "ms": 3, "ls": "-" if i < 10 else "--"}
        for ax, key in zip(
            axes[:2], ("relative_error_policy_gradient", "relative_error_kl_gradient"), strict=True
        ):
            y = [max(r[key], FLOOR) for r in pts]
            ax.plot(x, y, label=name if ax is axes[0] else None, **style)
        axes[2].plot(x, [r["ess"] for r in pts], **style)
    for ax, title in zip(
        axes,
        ("policy gradient ∇E_π[R]", "KL gradient ∇KL(π‖π_ref) (sequence_kl k1)", "ESS"),
        strict=True,
    ):
        ax.set_xscale("log")
        ax.set(xlabel="D = KL(μ‖π) of whole sequences (nats)", title=title)
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes[:2]:
        ax.set(yscale="log", ylim=(FLOOR / 2, None))
        ax.axhline(FLOOR, color="grey", lw=0.8, ls=":")
    axes[0].set(ylabel=f"‖E_μ[g] − g*‖ / ‖g*‖ (on the dotted line: < {FLOOR:g}, unbiased)")
    axes[2].set(ylabel="normalised effective sample size", ylim=(0, 1.02))
    fig.legend(loc="center right", fontsize=8, frameon=False)
    fig.suptitle("bias of each importance-weight correction, by exact enumeration")
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    p = Path(path)
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p


# ---------------------------------------------------------------------------------- report
_COLUMNS = [
    ("correction", "correction"),
    ("bounds", "bounds"),
    ("relative_error_policy_gradient", "rel.err ∇E[R]"),
    ("cosine_policy_gradient", "cos"),
    ("relative_error_kl_gradient", "rel.err ∇KL(π‖ref)"),
    ("cosine_kl_gradient", "cos"),
    ("trace_variance_policy_gradient", "tr Cov PG"),
    ("trace_variance_kl_gradient", "tr Cov KL"),
    ("ess", "ESS"),
]


def _cell(key: str, v: Any) -> str:
    if key.startswith("relative_error") and isinstance(v, float) and v < EXACT_BELOW:
        return f"< {EXACT_BELOW:.0e}"
    return _num(v)


def format_mismatch_rows(rows: Sequence[dict[str, Any]], fmt: str = "table") -> str:
    """``table`` (aligned), ``markdown``, ``csv`` or ``json`` (one object per correction, every
    number as computed)."""

    if fmt == "json":
        return rows_to_json(rows)
    if fmt == "csv":
        return rows_to_csv(rows).rstrip("\n")
    heads = [h for _, h in _COLUMNS]
    body = [[_cell(k, r.get(k)) for k, _ in _COLUMNS] for r in rows]
    if rows:
        r0 = rows[0]
        note = (
            f"V = {r0['V']}, T = {r0['T']} ({r0['V'] ** r0['T']} sequences, all enumerated, "
            f"float64); sampler μ: logits θ + s·d with s = {r0['scale']:.4g}, so that "
            f"KL(μ‖π) = {r0['mismatch_kl']:g} nats per sequence "
            f"({r0['mismatch_token_kl']:.4g} per token); rel.err and cos: E_μ of the corrected "
            "gradient against ∇E_π[R] and ∇KL(π‖π_ref) of whole sequences "
            f"(< {EXACT_BELOW:.0e}: exact up to float64 rounding); tr Cov for a batch of "
            f"B = {r0['B']} samples of μ; ESS: normalised, exact (tokens, or sequences at the "
            "sequence and geometric levels); batch_normalize off except the rows marked B → ∞"
        )
    else:
        note = "no corrections"
    return _table(heads, body, note, fmt, left=2)
