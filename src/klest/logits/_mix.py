r"""Elementwise terms of the generalised Jensen-Shannon divergence, without dividing by β.

For M = β P + (1 − β) Q, t = log P − log Q, u = log(M/Q), v = log(M/P), h = −u/β,
k = −v/(1 − β): D_β = Σ Q h + Σ P k (:mod:`klest.logits._pointwise`). For β ≤ ½, with
z = β expm1(t) and φ(z) = log1p(z)/z (φ(0) = 1),

.. math::

    Q h = -(P - Q)\,\varphi(z), \qquad v = \log\big(\beta + (1-\beta)e^{-t}\big),

both bounded whatever β (1e-320 included: no 1/β overflows, no 0·∞); for t > 20, z is formed in
log space, log z = log β + log expm1(t), and φ = softplus(log z)·e^{−log z}. For β > ½ the same with
P and Q (and β and 1 − β) exchanged. Out-of-place torch ops only: the streaming passes and the
twice-differentiable recomputation (:mod:`klest.logits._twice`) share them.
"""

from __future__ import annotations

import math

import torch

__all__ = ["jsd_entries", "mix_terms"]

_T0 = 20.0  # above this log-ratio, z is formed in log space


def _phi_small(z: torch.Tensor) -> torch.Tensor:
    """φ(z) = log1p(z)/z for z ≥ −½, φ(0) = 1; by its series 1 − z/2 + z²/3 − z³/4 for
    |z| < 1e-4 (error < z⁴/5; log1p of a subnormal z is not exact in torch's vector code)."""
    tiny = z.abs() < 1e-4
    zs = torch.where(tiny, torch.ones_like(z), z)
    series = 1.0 - z * (0.5 - z * (1.0 / 3.0 - 0.25 * z))
    return torch.where(tiny, series, torch.log1p(zs) / zs)


def _phi_log(L: torch.Tensor) -> torch.Tensor:
    """φ(e^L) = log1p(e^L)·e^{−L} for any L (−inf … +inf), without overflow."""
    Ls = L.clamp(min=-15.0)
    big = torch.exp(torch.log(torch.nn.functional.softplus(Ls)) - Ls)
    e = torch.exp(L.clamp(max=-15.0))
    small = 1.0 - e * (0.5 - e / 3.0)  # 1 − z/2 + z²/3, |error| < z³/4 < 1e-20
    return torch.where(L <= -15.0, small, big)


def mix_terms(
    t: torch.Tensor, w: float, s: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For M = w S + (1 − w) B (0 < w ≤ ½) and t = log S − log B: (B log(M/B) / w,
    log(M/S)), the first as (S − B)·φ(w expm1(t)) (bounded: no division by w), the second as
    log(w + (1 − w) e^{−t}) (log1p(w expm1(t)) − t while t ≤ 20). ``s``, ``b``: the
    probabilities S, B. Entries where S or B is 0 by a −inf logit are left to the caller."""
    tc = t.clamp(max=_T0)
    z = torch.expm1(tc) * w
    phi = _phi_small(z)
    log_ms = torch.log1p(z) - tc
    big = t > _T0
    if bool(big.any()):  # out-of-place ops throughout: also used under autograd (_twice)
        tb = t.clamp(min=_T0)
        L = torch.log1p(-torch.exp(-tb)) + tb + math.log(w)  # log(w expm1(t))
        phi = torch.where(big, _phi_log(L), phi)
        hi = torch.logaddexp(torch.full_like(tb, math.log(w)), math.log1p(-w) - tb)
        log_ms = torch.where(big, hi, log_ms)
    return (s - b) * phi, log_ms


def jsd_entries(
    t: torch.Tensor,
    xd: torch.Tensor,
    yd: torch.Tensor,
    Q: torch.Tensor,
    P: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q h, P k) from t = log P − log Q and where x, y are −inf (out-of-place torch ops: also
    differentiated twice by :mod:`klest.logits._twice`)."""
    zero = torch.zeros((), dtype=t.dtype, device=t.device)
    t = torch.where(xd | yd, zero, t)  # no NaN or inf inside (the masked entries are set below)
    if beta <= 0.5:  # the small weight β is on P
        bw, log_mp = mix_terms(t, beta, P, Q)  # Q log(M/Q)/β, log(M/P)
        qh = -bw
        pk = log_mp * P * (-1.0 / (1.0 - beta))
    else:  # the small weight 1 − β is on Q: t → −t
        bw, log_mq = mix_terms(-t, 1.0 - beta, Q, P)  # P log(M/P)/(1 − β), log(M/Q)
        pk = -bw
        qh = log_mq * Q * (-1.0 / beta)
    # one side 0 by a −inf logit: M = β P where Q = 0 (log(M/P) = log β, Q h = 0), M = (1 − β) Q
    # where P = 0 (log(M/Q) = log(1 − β), P k = 0); both 0: nothing
    pk = torch.where(xd, P * (-math.log(beta) / (1.0 - beta)), pk)
    qh = torch.where(yd, Q * (-math.log1p(-beta) / beta), qh)
    qh = torch.where(xd, zero, qh)
    pk = torch.where(yd, zero, pk)
    return qh, pk
