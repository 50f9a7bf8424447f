r"""The exact gradient lab: which KL option of :mod:`klest.rl` follows which gradient, exactly.

A tiny autoregressive softmax policy π (vocabulary V, length T) is a table θ of logits, one row
per prefix (1 + V + … + V^{T-1} rows); the reference π_ref and an optional older sampling policy
μ are tables of the same shape. All N = V^T sequences are listed, so every expectation is a finite
sum, computed in float64 and vectorised over the sequences (no Python loop per sequence).

For each option (an estimator × a placement × on/off-policy weighting × an aggregation, or a
peer preset of :mod:`klest.rl.presets`) the lab calls klest.rl's own functions on all N
sequences at once, with a private copy of θ per sequence, so one backward pass gives every
per-sequence gradient g(y) (the "expand" trick: row n of the loss reads only copy n). From them:

.. math::
    \bar g = \sum_y s(y)\, g(y), \qquad
    \mathrm{tr\,Cov}_B = \frac{1}{B}\sum_y s(y)\,\lVert g(y) - \bar g\rVert^2

with s = π on-policy and s = μ off-policy. ḡ is compared (relative error ‖ḡ − g*‖/‖g*‖ and
cosine) with g* = ∇_θ KL(π‖π_ref) and ∇_θ KL(π_ref‖π) of whole sequences, computed independently
by autograd through the enumerated closed forms Σ_y π(y) Σ_t ℓ_t and Σ_y π_ref(y) Σ_t (−ℓ_t).

Aggregations: ``"seq-mean-token-sum"`` (each sequence's sum: the sequence objective) and
``"seq-mean-token-mean"`` (each sequence's mean, multiplied by T so that at fixed length the two
coincide; with ``eos`` the mean weights short sequences more).

:func:`train` runs exact gradient ascent on E_π[R] − β·KL with each option's expected KL
gradient in place of ∇KL, and records the true reverse KL and expected reward per step.
Torch is imported by the functions here (``import klest.lab`` does not import it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import KlestError
from .experiments import rows_to_csv, rows_to_json

if TYPE_CHECKING:
    import torch

__all__ = [
    "Batch",
    "Option",
    "ToyModel",
    "exact_gradients",
    "expected_gradient",
    "format_gradient_rows",
    "gradient_table",
    "options",
    "per_sequence_gradients",
    "plot_training",
    "run_gradients",
    "sequence_kl_gradients",
    "sequence_kl_value",
    "toy_model",
    "train",
]

Aggregation = Literal["seq-mean-token-sum", "seq-mean-token-mean"]
MAX_ELEMENTS = 20_000_000  # per-sequence gradients held at once: N × prefixes × V float64


@dataclass(frozen=True)
class ToyModel:
    """An autoregressive policy over V tokens and T steps, with every sequence listed.

    ``theta``/``ref``/``old``: logit tables [P, V] (P prefixes) of π, π_ref and the sampler μ
    (``old`` None: on-policy only). ``seqs`` [N, T]: every sequence; ``prefix`` [N, T]: the table
    row of y_<t; ``mask`` [N, T]: valid tokens (all, or up to and including the first token 0 when
    ``eos``); ``reward`` [N]: a reward per sequence.
    """

    V: int
    T: int
    theta: torch.Tensor
    ref: torch.Tensor
    old: torch.Tensor | None
    seqs: torch.Tensor
    prefix: torch.Tensor
    mask: torch.Tensor
    reward: torch.Tensor

    @property
    def n_sequences(self) -> int:
        return int(self.seqs.shape[0])

    def logp(self, table: torch.Tensor) -> torch.Tensor:
        """log π(y_t|y_<t) [N, T] of every sequence under the logit table [P, V]."""
        import torch

        return torch.log_softmax(table, dim=-1)[self.prefix, self.seqs]

    def seq_logprob(self, table: torch.Tensor) -> torch.Tensor:
        """log π(y) [N] (every step, so that the sequences after an end token share its mass)."""
        return self.logp(table).sum(dim=-1)


def toy_model(
    V: int = 4,
    T: int = 4,
    *,
    distance: float = 1.0,
    off_policy: float = 0.0,
    reward_scale: float = 1.0,
    eos: bool = False,
    seed: int = 0,
) -> ToyModel:
    """θ ~ N(0, 1) per logit; π_ref's logits θ + ``distance``·N(0, 1); μ's logits
    θ + ``off_policy``·N(0, 1) (``off_policy=0``: no sampler); reward ``reward_scale``·N(0, 1)
    per sequence. float64."""
    import torch

    if V < 2 or T < 1:
        raise KlestError(f"needs V >= 2 and T >= 1, got V={V}, T={T}", argument="V")
    n_prefix = sum(V**t for t in range(T))
    if V**T * n_prefix * V > MAX_ELEMENTS:
        raise KlestError(
            f"V={V}, T={T} lists {V**T} sequences with {n_prefix * V} parameters each: too many "
            f"per-sequence gradients (limit {MAX_ELEMENTS:.0e} numbers); use a smaller V or T",
            argument="T",
        )
    for name, v in (("distance", distance), ("off_policy", off_policy)):
        if not (math.isfinite(v) and v >= 0):
            raise KlestError("must be a finite number >= 0", argument=name, value=v)
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    theta = torch.randn(n_prefix, V, generator=g, dtype=f64)
    ref = theta + distance * torch.randn(n_prefix, V, generator=g, dtype=f64)
    noise = torch.randn(n_prefix, V, generator=g, dtype=f64)
    old = theta + off_policy * noise if off_policy > 0 else None
    seqs = torch.cartesian_prod(*[torch.arange(V)] * T).reshape(-1, T)
    prefix = torch.zeros_like(seqs)
    code = torch.zeros(len(seqs), dtype=torch.long)
    base = 0
    for t in range(1, T):  # prefix y_<t is row base_t + (y_1 … y_{t-1} read in base V)
        base += V ** (t - 1)
        code = code * V + seqs[:, t - 1]
        prefix[:, t] = base + code
    if eos:
        ended = (torch.cumsum((seqs == 0).long(), 1) - (seqs == 0).long()) > 0
        mask = ~ended
    else:
        mask = torch.ones_like(seqs, dtype=torch.bool)
    reward = reward_scale * torch.randn(len(seqs), generator=g, dtype=f64)
    return ToyModel(V, T, theta, ref, old, seqs, prefix, mask, reward)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """The lab's tensors are tiny ([N, T, V] with N = V^T): one thread avoids the cost of
    waking a pool for each small op (tens of times faster on a busy 2-core machine)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------- exact targets
def sequence_kl_gradients(
    model: ToyModel, theta: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(∇KL(π‖π_ref), ∇KL(π_ref‖π)) of whole sequences [P, V], by autograd of the closed forms
    Σ_y π(y) Σ_t m_t (log π − log π_ref) and Σ_y π_ref(y) Σ_t m_t (log π_ref − log π)."""
    import torch

    th = (model.theta if theta is None else theta).detach().clone().requires_grad_(True)
    lq, lr = model.logp(th), model.logp(model.ref)
    m = model.mask.to(lq.dtype)
    rev = (lq.sum(1).exp() * ((lq - lr) * m).sum(1)).sum()
    fwd = (lr.sum(1).exp() * ((lr - lq) * m).sum(1)).sum()
    (g_rev,) = torch.autograd.grad(rev, th, retain_graph=True)
    (g_fwd,) = torch.autograd.grad(fwd, th)
    return g_rev, g_fwd


def sequence_kl_value(model: ToyModel, theta: torch.Tensor) -> float:
    """KL(π‖π_ref) of whole sequences, exactly."""
    lq, lr = model.logp(theta), model.logp(model.ref)
    return float((lq.sum(1).exp() * ((lq - lr) * model.mask).sum(1)).sum())


# ----------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Batch:
    """What an option sees: all N sequences as one batch [N, T] (logits [N, T, V])."""

    logits: torch.Tensor  # the policy's logits at each position (differentiable)
    logp: torch.Tensor  # log π(y_t|y_<t) (differentiable)
    ref_logits: torch.Tensor
    ref_logp: torch.Tensor
    old_logp: torch.Tensor | None  # the sampler's, off-policy options only
    mask: torch.Tensor
    aggregation: Aggregation


@dataclass(frozen=True)
class Option:
    """A KL option: ``loss(batch)`` is the scalar the trainer would add (the aggregate over the
    batch), built from klest.rl's functions; ``off_policy``: samples come from μ."""

    name: str
    estimator: str
    placement: str
    loss: Callable[[Batch], torch.Tensor]
    off_policy: bool = False
    aggregation: Aggregation = "seq-mean-token-sum"
    kind: str = "klest"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _agg(terms: torch.Tensor, b: Batch) -> torch.Tensor:
    import klest.rl as rl

    return rl.aggregate(terms, b.mask, b.aggregation)


def _full_kl(b: Batch) -> torch.Tensor:
    from klest.logits import full_kl

    return full_kl(b.logits, b.ref_logits, mask=b.mask)


def _per_token(**kw: Any) -> Callable[[Batch], torch.Tensor]:
    import klest.rl as rl

    def g(b: Batch) -> torch.Tensor:
        return _agg(rl.kl_per_token(b.logp, b.ref_logp, old_logp=b.old_logp, mask=b.mask, **kw), b)

    return g


def _in_reward(estimator: str, returns: bool) -> Callable[[Batch], torch.Tensor]:
    """REINFORCE with the detached penalty as (negative) reward: Σ_t log π_t · sg(G_t)."""
    import klest.rl as rl

    def f(b: Batch) -> torch.Tensor:
        pen = rl.kl_penalty(b.logp, b.ref_logp, mask=b.mask, estimator=estimator)
        coef = rl.reward_to_go(pen, b.mask) if returns else pen
        return _agg(b.logp * coef, b)

    return f


def _sequence(**kw: Any) -> Callable[[Batch], torch.Tensor]:
    import klest.rl as rl

    def f(b: Batch) -> torch.Tensor:
        needs_kl = kw.get("estimator", "full") in ("full", "mix")
        out = rl.sequence_kl(
            b.logp,
            b.ref_logp,
            kl=_full_kl(b) if needs_kl else None,
            old_logp=b.old_logp,
            mask=b.mask,
            **kw,
        )
        return _agg(out.terms, b)

    return f


def _pathwise_full(b: Batch) -> torch.Tensor:
    return _agg(_full_kl(b), b)


def _pathwise_full_forward(b: Batch) -> torch.Tensor:
    from klest.logits import full_kl

    return _agg(full_kl(b.logits, b.ref_logits, mask=b.mask, direction="forward"), b)


def _preset(name: str) -> Callable[[Batch], torch.Tensor]:
    from klest.rl import presets

    p = presets.get(name)

    def f(b: Batch) -> torch.Tensor:
        return _agg(p(b.logp, b.ref_logp, old_logp=b.old_logp, mask=b.mask), b)

    return f


def options(
    *, off_policy: bool = True, presets: bool = True, weight_clamp: float = 2.0
) -> list[Option]:
    """The options the lab compares (the mix's α is set by :func:`gradient_table`)."""
    on: list[Option] = [
        Option("k1 loss", "k1", "loss", _per_token(estimator="k1", gradient="as_written")),
        Option("k2 loss", "k2", "loss", _per_token(estimator="k2", gradient="as_written")),
        Option("k3 loss", "k3", "loss", _per_token(estimator="k3", gradient="as_written")),
        Option(
            "k3 value, reverse-KL gradient (klest default)",
            "k3",
            "loss",
            _per_token(estimator="k3", gradient="reverse_kl"),
        ),
        Option(
            "k3 value, forward-KL gradient",
            "k3",
            "loss",
            _per_token(estimator="k3", gradient="forward_kl"),
        ),
        Option(
            "forward_k3 loss",
            "forward_k3",
            "loss",
            _per_token(estimator="forward_k3", gradient="as_written"),
        ),
        Option(
            "forward_k3 × differentiable weight",
            "forward_k3",
            "loss",
            _per_token(estimator="forward_k3", gradient="as_written", weight="differentiable"),
        ),
        Option(
            "k1 × differentiable weight",
            "k1",
            "loss",
            _per_token(estimator="k1", gradient="as_written", weight="differentiable"),
        ),
        Option("k1 in reward", "k1", "reward", _in_reward("k1", False)),
        Option("k3 in reward", "k3", "reward", _in_reward("k3", False)),
        Option("k1 in reward, reward-to-go", "k1", "reward-to-go", _in_reward("k1", True)),
        Option("k3 in reward, reward-to-go", "k3", "reward-to-go", _in_reward("k3", True)),
        Option(
            "k3 value, sequence gradient",
            "k3",
            "reward-to-go",
            _per_token(estimator="k3", gradient="sequence_reverse_kl"),
        ),
        Option("full-vocabulary KL loss (no score term)", "full", "loss", _pathwise_full),
        Option("full-vocabulary forward KL loss", "full_forward", "loss", _pathwise_full_forward),
        Option("full-vocabulary + score (sequence_kl)", "full", "full", _sequence()),
        Option("sequence_kl k1", "k1", "full", _sequence(estimator="k1")),
        Option("mix α*·k1 + (1-α*)·full", "mix", "mix", _sequence(estimator="mix", alpha=0.0)),
        Option(
            "k3 default, per-token mean",
            "k3",
            "loss",
            _per_token(estimator="k3", gradient="reverse_kl"),
            aggregation="seq-mean-token-mean",
        ),
        Option(
            "full-vocabulary + score, per-token mean",
            "full",
            "full",
            _sequence(),
            aggregation="seq-mean-token-mean",
        ),
    ]
    off: list[Option] = []
    if off_policy:
        c = weight_clamp
        off = [
            Option(
                "k1 in reward, reward-to-go, no correction",
                "k1",
                "reward-to-go",
                _in_reward("k1", True),
                off_policy=True,
            ),
            Option(
                "k3 default, per-token detached weight",
                "k3",
                "loss",
                _per_token(estimator="k3", gradient="reverse_kl"),
                off_policy=True,
            ),
            Option(
                "k3 × differentiable weight (per token)",
                "k3",
                "loss",
                _per_token(estimator="k3", gradient="as_written", weight="differentiable"),
                off_policy=True,
            ),
            Option(
                "sequence_kl k1, per-decision weights",
                "k1",
                "full",
                _sequence(estimator="k1"),
                off_policy=True,
            ),
            Option(
                "sequence_kl full, per-decision weights",
                "full",
                "full",
                _sequence(),
                off_policy=True,
            ),
            Option(
                "sequence_kl full, sequence weight",
                "full",
                "full",
                _sequence(weighting="sequence"),
                off_policy=True,
            ),
            Option(
                "sequence_kl k1, per-token weights",
                "k1",
                "full",
                _sequence(estimator="k1", weighting="per_token"),
                off_policy=True,
            ),
            Option(
                f"sequence_kl full, per-decision weights clipped at {c:g}",
                "full",
                "full",
                _sequence(weight_clamp=c),
                off_policy=True,
            ),
        ]
    pre: list[Option] = []
    if presets:
        from klest.rl import presets as p

        for name in p.names():
            pre.append(Option(name, "preset", "preset", _preset(name), kind="preset"))
            if off_policy and p.get(name).uses_old_logp:
                pre.append(
                    Option(
                        name + " (off-policy)",
                        "preset",
                        "preset",
                        _preset(name),
                        off_policy=True,
                        kind="preset",
                    )
                )
    return on + off + pre


# ------------------------------------------------------------------------- exact enumeration
def _batch(
    model: ToyModel,
    theta: torch.Tensor,
    off_policy: bool,
    aggregation: Aggregation,
    row_weights: torch.Tensor | None = None,
) -> Batch:
    """All sequences as one batch; ``theta`` is [P, V] or a per-sequence copy [N, P, V].

    ``row_weights`` [N] multiplies the gradient flowing back from sequence n's logits (the value is
    unchanged): for a row-separable loss that is the gradient of Σ_n row_weights_n·row_n."""
    import torch

    rows = torch.arange(model.n_sequences)[:, None]
    logits = theta[model.prefix] if theta.ndim == 2 else theta[rows, model.prefix]
    if row_weights is not None:
        logits = _row_scale(logits, row_weights)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, model.seqs[..., None]).squeeze(-1)
    ref_logits = model.ref[model.prefix]
    old_logp = None
    if off_policy:
        if model.old is None:
            raise KlestError("an off-policy option needs a sampler (off_policy > 0)")
        old_logp = model.logp(model.old)
    return Batch(logits, logp, ref_logits, model.logp(model.ref), old_logp, model.mask, aggregation)


def _row_scale(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x in the forward pass; the gradient of row n multiplied by w_n in the backward pass."""
    w = w.detach().reshape((-1,) + (1,) * (x.ndim - 1))
    return x.detach() + (x - x.detach()) * w


def _sampler(model: ToyModel, theta: torch.Tensor, off_policy: bool) -> torch.Tensor:
    table = model.old if off_policy and model.old is not None else theta
    return model.seq_logprob(table.detach()).exp()


def _scale(model: ToyModel, aggregation: Aggregation) -> float:
    """Undo the aggregation's 1/N (and 1/T for per-token means) to get per-sequence gradients."""
    return model.n_sequences * (model.T if aggregation == "seq-mean-token-mean" else 1)


def per_sequence_gradients(
    model: ToyModel, option: Option, theta: torch.Tensor | None = None
) -> torch.Tensor:
    """g(y) [N, P·V]: the gradient each single sequence contributes (scaled to a batch of one)."""
    import torch

    th = (model.theta if theta is None else theta).detach()
    copies = th.expand(model.n_sequences, *th.shape).clone().requires_grad_(True)
    b = _batch(model, copies, option.off_policy, option.aggregation)
    loss = option.loss(b)
    if not loss.requires_grad:
        return torch.zeros(model.n_sequences, th.numel(), dtype=th.dtype)
    (g,) = torch.autograd.grad(loss, copies)
    return g.reshape(model.n_sequences, -1) * _scale(model, option.aggregation)


def expected_gradient(
    model: ToyModel, option: Option, theta: torch.Tensor | None = None
) -> torch.Tensor:
    """E[g(y)] [P, V] under the option's sampler in one backward pass: the gradient of sequence
    n's logits is weighted by s(y_n) times the aggregation's 1/(its share of row n)."""
    import torch

    th = (model.theta if theta is None else theta).detach().clone().requires_grad_(True)
    s = _sampler(model, th, option.off_policy) * _scale(model, option.aggregation)
    loss = option.loss(_batch(model, th, option.off_policy, option.aggregation, s))
    if not loss.requires_grad:
        return torch.zeros_like(th)
    (g,) = torch.autograd.grad(loss, th)
    return g


def exact_gradients(
    model: ToyModel, option: Option, theta: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """(E[g] [P·V], tr Cov g for one sequence) under the option's sampler, exactly."""
    th = model.theta if theta is None else theta
    G = per_sequence_gradients(model, option, th)
    s = _sampler(model, th, option.off_policy)
    mean = s @ G
    centred = G - mean
    return mean, float(s @ (centred * centred).sum(dim=1))


def _optimal_alpha(model: ToyModel, theta: torch.Tensor, off_policy: bool) -> float:
    """α minimising tr Cov of α·g_k1 + (1-α)·g_full, exactly (the oracle the cross-fit aims at)."""
    k1 = Option("k1", "k1", "full", _sequence(estimator="k1"), off_policy=off_policy)
    full = Option("full", "full", "full", _sequence(), off_policy=off_policy)
    g1 = per_sequence_gradients(model, k1, theta)
    gf = per_sequence_gradients(model, full, theta)
    s = _sampler(model, theta, off_policy)
    d = g1 - gf
    dc, fc = d - s @ d, gf - s @ gf
    var = float(s @ (dc * dc).sum(1))
    return 0.0 if var == 0 else -float(s @ (fc * dc).sum(1)) / var


def _with_alpha(opt: Option, model: ToyModel, theta: torch.Tensor) -> Option:
    if opt.estimator != "mix":
        return opt
    a = _optimal_alpha(model, theta, opt.off_policy)
    return replace(
        opt,
        name=f"mix α*·k1 + (1-α*)·full, α* = {a:.3g}",
        loss=_sequence(estimator="mix", alpha=a),
        extra={**opt.extra, "alpha": a},
    )


#: The largest |log π(y) − log μ(y)| over the enumerated sequences that the off-policy rows
#: accept: their importance weights reach e^Δ and tr Cov their squares e^2Δ (float64: e^709).
MAX_OFF_POLICY_LOG_RATIO = 300.0


def _compare(
    g: torch.Tensor, target: torch.Tensor, noise: float, target_noise: float = 0.0
) -> tuple[float | None, float | None]:
    """(‖g − g*‖/‖g*‖, cosine). The relative error and the cosine are None (undefined, 0/0)
    where the target g* is zero (‖g*‖ at most ``target_noise``: π = π_ref, whose KL gradient is
    exactly 0); the cosine is None too when ‖g‖ is at the rounding level ``noise`` (e.g. k1 as a
    loss, whose expected gradient is exactly 0), and both are None where g is not finite."""
    nt, ng = float(target.norm()), float(g.norm())
    if not (nt > target_noise and math.isfinite(nt) and math.isfinite(ng)):
        return None, None
    rel = float((g - target).norm()) / nt
    cos = float(g @ target) / (ng * nt) if ng > noise else None
    return rel, cos


def _target_noise(model: ToyModel) -> float:
    """The rounding level of ∇KL between π and π_ref: 0 unless they are the same table (then
    the gradients are exactly 0 in mathematics; whatever is computed is rounding)."""
    import torch

    return math.inf if bool(torch.equal(model.ref, model.theta)) else 0.0


def _check_off_policy_range(model: ToyModel) -> None:
    """Refuse a sampler μ so far from π that the importance weights leave float64."""
    if model.old is None:
        return
    d = float((model.seq_logprob(model.theta) - model.seq_logprob(model.old)).abs().max())
    if d > MAX_OFF_POLICY_LOG_RATIO:
        raise KlestError(
            f"the sampler μ is too far from π: log π(y) − log μ(y) reaches {d:.4g} over the "
            f"enumerated sequences, and the importance weights (squared in tr Cov) leave float64 "
            f"beyond {MAX_OFF_POLICY_LOG_RATIO:g}; use a smaller off-policy distance",
            argument="off_policy",
        )


def gradient_table(
    model: ToyModel,
    opts: Sequence[Option] | None = None,
    *,
    B: int = 64,
) -> list[dict[str, Any]]:
    """One row per option: its exact expected gradient against ∇KL(π‖π_ref) and ∇KL(π_ref‖π) of
    whole sequences, and tr Cov of the batch-of-B gradient. Off-policy options need
    ``model.old``."""
    if B < 1:
        raise KlestError("must be >= 1", argument="B", value=B)
    if opts is None:
        opts = options(off_policy=model.old is not None)
    _check_off_policy_range(model)
    g_rev, g_fwd = (g.reshape(-1) for g in sequence_kl_gradients(model))
    zero = _target_noise(model)
    rows = []
    for opt0 in opts:
        opt = _with_alpha(opt0, model, model.theta)
        mean, var1 = exact_gradients(model, opt)
        noise = 1e-12 * math.sqrt(var1 + float(mean @ mean))  # rounding in Σ_y s(y) g(y)
        rr, cr = _compare(mean, g_rev, noise, zero)
        rf, cf = _compare(mean, g_fwd, noise, zero)
        rows.append(
            {
                "option": opt.name,
                "kind": opt.kind,
                "estimator": opt.estimator,
                "placement": opt.placement,
                "aggregation": opt.aggregation,
                "off_policy": opt.off_policy,
                "relative_error_reverse_kl": rr,
                "cosine_reverse_kl": cr,
                "relative_error_forward_kl": rf,
                "cosine_forward_kl": cf,
                "trace_variance": var1 / B if math.isfinite(var1) else None,
                "B": B,
                "V": model.V,
                "T": model.T,
                "alpha": opt.extra.get("alpha"),
            }
        )
    return rows


# ---------------------------------------------------------------------------------- training
def train(
    model: ToyModel,
    opts: Sequence[Option],
    *,
    beta: float = 0.5,
    steps: int = 150,
    lr: float = 2.0,
) -> dict[str, dict[str, list[float]]]:
    """Exact gradient ascent on E_π[R] − β·KL from θ, with each option's expected KL gradient in
    place of ∇KL (off-policy options sample from μ_t = θ_t + (μ − θ) at every step). Returns, per
    option and for ``"exact ∇KL(π‖π_ref)"``, the true sequence KL(π‖π_ref) and E_π[R] per step
    (steps + 1 values, the first at θ). An option whose gradient stops being finite (a value
    such as k3's π_ref/π beyond float64 once π has collapsed) stops there: its lists are
    shorter and ``"stopped"`` holds [the step] (:func:`run_gradients` reports it)."""
    import torch

    offset = None if model.old is None else model.old - model.theta

    def reward_grad(th: torch.Tensor) -> tuple[float, torch.Tensor]:
        t = th.detach().clone().requires_grad_(True)
        er = (model.seq_logprob(t).exp() * model.reward).sum()
        (g,) = torch.autograd.grad(er, t)
        return float(er.detach()), g

    def run(kl_grad: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, list[float]]:
        th = model.theta.clone()
        kls, rewards = [], []
        for step in range(steps + 1):
            er, gr = reward_grad(th)
            kls.append(sequence_kl_value(model, th))
            rewards.append(er)
            if step < steps:
                try:
                    gk = kl_grad(th)
                except KlestError:
                    gk = None
                if gk is None or not bool(torch.isfinite(gk).all()):
                    return {"reverse_kl": kls, "reward": rewards, "stopped": [float(step)]}
                th = th + lr * (gr - beta * gk)
        return {"reverse_kl": kls, "reward": rewards}

    out = {"exact ∇KL(π‖π_ref)": run(lambda th: sequence_kl_gradients(model, th)[0])}
    for opt0 in opts:
        opt = _with_alpha(opt0, model, model.theta)

        def kl_grad(th: torch.Tensor, opt: Option = opt) -> torch.Tensor:
            m = model if offset is None else replace(model, old=th + offset)
            return expected_gradient(m, opt, th)

        out[opt.name] = run(kl_grad)
    return out


def _groups(history: dict[str, dict[str, list[float]]]) -> list[list[str]]:
    """Options whose trajectories coincide (to 1e-6 relative at every step), in order."""
    groups: list[list[str]] = []
    for name, h in history.items():
        for g in groups:
            ref = history[g[0]]
            if all(
                abs(a - b) <= 1e-6 * (1 + abs(b))
                for key in ("reverse_kl", "reward")
                for a, b in zip(h[key], ref[key], strict=False)
            ) and len(h["reward"]) == len(ref["reward"]):
                g.append(name)
                break
        else:
            groups.append([name])
    return groups


def plot_training(history: dict[str, dict[str, list[float]]], path: str | Path) -> Path:
    """Two panels against the step: the true sequence KL(π‖π_ref) and E_π[R]; one line per
    distinct trajectory, labelled with every option that follows it (black: the exact gradient)."""
    from .plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    cmap = plt.get_cmap("tab10")
    for i, names in enumerate(_groups(history)):
        h = history[names[0]]
        exact = names[0].startswith("exact")
        label = "\n".join(
            names if len(names) <= 6 else [*names[:5], f"… and {len(names) - 5} more"]
        )
        style = {"color": "black", "lw": 3, "zorder": 5} if exact else {"color": cmap(i % 10)}
        ls = "-" if i <= 10 else "--"  # group 0 is black: ten colours, then dashed
        axes[0].plot(h["reverse_kl"], ls=ls, label=label, **style)
        axes[1].plot(h["reward"], ls=ls, **style)
    axes[0].set(xlabel="step", ylabel="true KL(π‖π_ref) of whole sequences", title="reverse KL")
    axes[1].set(xlabel="step", ylabel="E_π[R]", title="expected reward")
    fig.legend(loc="center right", fontsize=7, frameon=False, labelspacing=1.0)
    fig.suptitle("exact gradient ascent on E[R] − β·KL, each option's expected KL gradient")
    fig.tight_layout(rect=(0, 0, 0.68, 1))
    p = Path(path)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


# ------------------------------------------------------------------------------------ report
def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v == 0:
            return "0"
        if abs(v) < 1e-3 or abs(v) >= 1e5:
            return f"{v:.2e}"
        return f"{v:.4g}"
    return str(v)


_COLUMNS = [
    ("option", "option"),
    ("off_policy", "off-policy"),
    ("relative_error_reverse_kl", "rel.err ∇KL(π‖ref)"),
    ("cosine_reverse_kl", "cos"),
    ("relative_error_forward_kl", "rel.err ∇KL(ref‖π)"),
    ("cosine_forward_kl", "cos"),
    ("trace_variance", "tr Cov (batch B)"),
    ("final_reverse_kl", "KL after training"),
    ("final_reward", "E[R] after"),
]


def format_gradient_rows(rows: Sequence[dict[str, Any]], fmt: str = "table") -> str:
    """``table`` (aligned), ``markdown``, ``csv`` or ``json`` (one object per option)."""

    if fmt == "json":
        return rows_to_json(rows)
    if fmt == "csv":
        return rows_to_csv(rows).rstrip("\n")
    cols = [(k, h) for k, h in _COLUMNS if any(k in r for r in rows)]
    body = [[_num(r.get(k)) for k, _ in cols] for r in rows]
    heads = [h for _, h in cols]
    if rows:
        r0 = rows[0]
        note = (
            f"V = {r0['V']}, T = {r0['T']} ({r0['V'] ** r0['T']} sequences, all enumerated, "
            f"float64); tr Cov for a batch of B = {r0['B']} sequences; rel.err and cos compare "
            "the exact expected gradient with ∇ of the sequence KL; cos '-': zero gradient"
        )
        if any(r.get("relative_error_reverse_kl") is None for r in rows):
            note += "; rel.err and cos '-' where ∇KL is 0 (π = π_ref: 0/0, undefined)"
        if any(r.get("trace_variance") is None and r.get("kind") != "exact" for r in rows):
            note += "; tr Cov '-': beyond float64"
        stops = [r for r in rows if r.get("training_stopped_at") is not None]
        for r in stops:
            note += (
                f"\n{r['option']}: training stopped at step {r['training_stopped_at']}, where "
                "its KL gradient is no longer finite in float64 (after training '-')"
            )
    else:
        note = "no options"
    return _table(heads, body, note, fmt)


def _table(heads: list[str], body: list[list[str]], note: str, fmt: str, left: int = 1) -> str:
    """A markdown table, or aligned text columns, then a blank line and the note; the first
    ``left`` columns are left-aligned, the others (numbers) right-aligned."""
    if fmt == "markdown":
        out = ["| " + " | ".join(heads) + " |", "|" + "---|" * left + "---:|" * (len(heads) - left)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in b) + " |" for b in body]
        return "\n".join([*out, "", note])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(heads), "  ".join("-" * w for w in widths), *map(line, body), "", note])


def run_gradients(
    *,
    V: int = 4,
    T: int = 4,
    B: int = 64,
    distance: float = 1.0,
    off_policy: float = 0.5,
    seed: int = 0,
    presets: bool = True,
    steps: int = 150,
    beta: float = 0.5,
    eos: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, list[float]]]]:
    """What ``klest gradients`` prints: the table (presets included when ``presets``), plus a
    training run per klest option (presets are not trained, to keep the default run short);
    ``steps=0`` skips training."""
    model = toy_model(V, T, distance=distance, off_policy=off_policy, eos=eos, seed=seed)
    opts = options(off_policy=model.old is not None, presets=presets)
    history: dict[str, dict[str, list[float]]] = {}
    with _one_thread():
        rows = gradient_table(model, opts, B=B)
        if steps > 0:
            history = train(model, [o for o in opts if o.kind != "preset"], beta=beta, steps=steps)
        g_rev, g_fwd = (g.reshape(-1) for g in sequence_kl_gradients(model))
    zero = _target_noise(model)
    rf, cf = _compare(g_rev, g_fwd, 0.0, zero)
    reference: dict[str, Any] = {
        "option": "exact ∇KL(π‖π_ref) (reference)",
        "kind": "exact",
        "estimator": "-",
        "placement": "-",
        "aggregation": "-",
        "off_policy": False,
        "relative_error_reverse_kl": 0.0 if math.isfinite(zero) else None,
        "cosine_reverse_kl": 1.0 if math.isfinite(zero) else None,
        "relative_error_forward_kl": rf,
        "cosine_forward_kl": cf,
        "trace_variance": None,
        "B": B,
        "V": V,
        "T": T,
        "alpha": None,
    }
    rows.insert(0, reference)
    if history:
        exact = history.pop("exact ∇KL(π‖π_ref)")
        history = {reference["option"]: exact, **history}
        for r in rows:
            h = history.get(r["option"])
            if h is not None:
                stopped = h.pop("stopped", None)
                r["final_reverse_kl"] = None if stopped else h["reverse_kl"][-1]
                r["final_reward"] = None if stopped else h["reward"][-1]
                if stopped:
                    r["training_stopped_at"] = int(stopped[0])
    return rows, history
