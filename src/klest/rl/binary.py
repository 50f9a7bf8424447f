r"""Trust-region divergences at the sampled token: "this token / any other" as two Bernoullis.

DPPO (arXiv 2602.04879) replaces PPO's ratio clip by a bound on a divergence between the old
and the new policy restricted to the sampled token y: the Bernoulli "y or not y", with
p = π_old(y) = e^{old_logp} and q = π(y) = e^{logp}:

.. math::
    \mathrm{KL}(\mathrm{Bern}(p)\,\|\,\mathrm{Bern}(q))
      = p \log\frac{p}{q} + (1 - p)\log\frac{1 - p}{1 - q}, \qquad
    \mathrm{TV} = |p - q|

(direction: old ‖ new, as verl 0.9.1's ``dppo_kl``). klest evaluates the KL as the sum of two
non-negative terms, p·k3(log q − log p) + (1 − p)·k3(log(1 − q) − log(1 − p)) with
k3(x) = e^x − 1 − x (the core's stable form; the two e^x − 1 parts add to q − p + (1 − q) −
(1 − p) = 0), and log(1 − p) = log1mexp(old_logp) (−expm1 for p near 1, log1p(−p) for small p):
no cancellation, exact at p = 1 − 1e-12 and p = 1e-30 alike, +inf when q = 1 > p, and the limit
−log q at p = 1. Gradients flow to both arguments, never NaN. TV is e^{max}·(−expm1(−|Δ|)).

``preset="verl@0.9.1"`` computes verl's formulas as written (input dtype,
p·(old − logp) + (1 − p)·log((1 − p + 1e-8)/(1 − q + 1e-8)); TV as |e^{logp} − e^{old}|, verl
compares the signed difference with its bounds). ``preset="openrlhf@0.11.2"`` (KL only) computes
OpenRLHF's gate statistic, with its probabilities clamped to [1e-6, 1 − 1e-6]; OpenRLHF passes
the rollout log-probs as ``old_logp``.
"""

from __future__ import annotations

from typing import Any

import torch

from .._config import get_options
from .._torch import tensor_arg
from ..errors import KlestError
from ._kernels import value as _estimator_value

__all__ = ["BINARY_PRESETS", "binary_kl", "binary_tv"]

BINARY_PRESETS = ("verl@0.9.1", "openrlhf@0.11.2")


def _inputs(old_logp: Any, logp: Any) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    a = tensor_arg("old_logp", old_logp)
    b = tensor_arg("logp", logp)
    for name, x in (("old_logp", a), ("logp", b)):
        if not x.is_floating_point():
            raise KlestError("log-probabilities must have a floating dtype", argument=name)
    if a.shape != b.shape:
        raise KlestError(
            f"shape {tuple(b.shape)} differs from old_logp's {tuple(a.shape)}", argument="logp"
        )
    dtype = torch.promote_types(a.dtype, b.dtype)
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    if get_options().validate:
        for name, x in (("old_logp", a), ("logp", b)):
            d = x.detach()
            bad = int((torch.isnan(d) | (d > 0)).sum())
            if bad:
                raise KlestError(
                    f"{bad} value(s) are NaN or > 0 (a log-probability is <= 0)", argument=name
                )
        if bool((a.detach() == -torch.inf).any()):
            raise KlestError(
                "is -inf: the old policy cannot give its own sample probability 0",
                argument="old_logp",
            )
    return a, b, dtype


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x <= 0: log(−expm1(x)) near 0, log1p(−e^x) below −log 2 (−inf at 0)."""
    near = x > -0.6931471805599453
    xn = torch.where(near, x, torch.full_like(x, -1.0))  # safe substitutes: no NaN in the grads
    xf = torch.where(near, torch.full_like(x, -1.0), x)
    return torch.where(near, torch.log(-torch.expm1(xn)), torch.log1p(-torch.exp(xf)))


def binary_kl(
    old_logp: torch.Tensor, logp: torch.Tensor, *, preset: str | None = None
) -> torch.Tensor:
    r"""KL(Bern(p) ‖ Bern(q)) per token, p = e^{old_logp}, q = e^{logp} (see the module docs).

    Output: the inputs' promoted dtype (float32 for float16/bfloat16), computed in float64;
    differentiable in both arguments.

    >>> import torch, klest.rl as rl
    >>> rl.binary_kl(torch.tensor([-1e-12]), torch.tensor([-2e-12], dtype=torch.float64))
    tensor([3.0685e-13], dtype=torch.float64)
    """
    a, b, dtype = _inputs(old_logp, logp)
    if preset is not None:
        return _binary_preset("kl", a, b, preset)
    out = _BinaryKL.apply(a.to(torch.float64), b.to(torch.float64))
    assert isinstance(out, torch.Tensor)
    return out.to(dtype)


def _parts(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p, log(1 − p), log(1 − q)) with p = e^a; at a = 0 log(1 − p) is −inf."""
    return torch.exp(a), _log1mexp(a), _log1mexp(b)


class _BinaryKL(torch.autograd.Function):
    """Value p·k3(b − a) + (1 − p)·k3(log(1 − q) − log(1 − p)); derivatives in closed form,
    ∂/∂a = p·((a − b) + log((1 − q)/(1 − p))) (two terms of one sign) and
    ∂/∂b = (q − p)/(1 − q) = p·expm1(b − a)/(−expm1(b)): autograd of the value would cancel two
    terms of size (1 − q)/(1 − p) next to p = 1."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        p, l1p, l1q = _parts(a, b)
        first = p * _estimator_value("k3", b - a)  # p·k3(log q − log p)
        at_one = a == 0.0  # p = 1: the second term's limit is 1 − q
        safe_l1p = torch.where(at_one, torch.zeros_like(l1p), l1p)
        second = -torch.expm1(a) * _estimator_value("k3", l1q - safe_l1p)
        second = torch.where(at_one, -torch.expm1(b), second)
        ctx.save_for_backward(a, b)
        return first + second

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = ctx.saved_tensors
        p, l1p, l1q = _parts(a, b)
        da = p * ((a - b) + (l1q - l1p))
        db = p * torch.expm1(b - a) / (0.0 - torch.expm1(b))  # 1 − q = +0 at q = 1: +inf
        # p = q is the minimum: both derivatives are 0 (the formulas give 0/0 and −inf + inf
        # at p = q = 1, e.g. float32 log-probs that rounded to 0 on both sides)
        same = a == b
        zero = torch.zeros((), dtype=da.dtype, device=da.device)
        return g * torch.where(same, zero, da), g * torch.where(same, zero, db)


def binary_tv(
    old_logp: torch.Tensor, logp: torch.Tensor, *, preset: str | None = None
) -> torch.Tensor:
    r"""Total variation |p − q| of the two Bernoullis, p = e^{old_logp}, q = e^{logp}.

    Computed as e^{max(a, b)}·(−expm1(−|a − b|)): exact when both are near 1 or both tiny.

    >>> import torch, klest.rl as rl
    >>> rl.binary_tv(torch.tensor([-1e-12], dtype=torch.float64), torch.tensor([-3e-12]))
    tensor([2.0000e-12], dtype=torch.float64)
    """
    a, b, dtype = _inputs(old_logp, logp)
    if preset is not None:
        return _binary_preset("tv", a, b, preset)
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    hi = torch.maximum(a64, b64)
    d = (a64 - b64).abs()
    return (torch.exp(hi) * -torch.expm1(-d)).to(dtype)


def _binary_preset(kind: str, a: torch.Tensor, b: torch.Tensor, preset: str) -> torch.Tensor:
    if preset not in BINARY_PRESETS or (kind == "tv" and preset != "verl@0.9.1"):
        known = BINARY_PRESETS if kind == "kl" else ("verl@0.9.1",)
        raise KlestError(f"unknown preset {preset!r}; known: {', '.join(known)}", argument="preset")
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype), b.to(dtype)
    p, q = torch.exp(a), torch.exp(b)
    if kind == "tv":  # verl core_algos.compute_policy_loss_dppo_tv: prob - old_prob
        return (q - p).abs()
    if preset == "verl@0.9.1":  # verl core_algos.compute_policy_loss_dppo_kl, as written
        return p * (a - b) + (1 - p) * torch.log((1.0 - p + 1e-8) / (1.0 - q + 1e-8))
    # OpenRLHF models/loss.py PolicyLoss, is_correction_gating="binary_kl"
    pc, qc = p.clamp(1e-6, 1 - 1e-6), q.clamp(1e-6, 1 - 1e-6)
    return pc * (pc / qc).log() + (1 - pc) * ((1 - pc) / (1 - qc)).log()
