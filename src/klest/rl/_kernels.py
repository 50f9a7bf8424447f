r"""Per-token values v(L) and slopes dv/dL of the estimators, on detached tensors.

``L = ref_logp - logp`` (log p - log q with q the policy); in RL notation ℓ = -L. Values that
cancel near L = 0 (k3, the forward control variate) are evaluated in float64 when the computation
dtype is float32 (so the float32 result is correct to a few ulp for |L| > 1e-8 and within 1e-24
absolutely below), and with the core's series-backed primitives when it is float64.
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import torch

from .. import _numerics as nm
from ..divergences import FDivergence, _check_derivative_forms, divergence_names, get_divergence
from ..errors import KlestError
from ..table import Estimator as TableEstimator
from ..table import check_values, get_estimator, is_builtin
from ._inputs import traced

__all__ = [
    "BUILTIN",
    "k3_blocks",
    "moments",
    "resolve",
    "slope",
    "v_minus_slope",
    "value",
]

_BLOCK = 1 << 17  # elements per float64 block in k3_blocks (1 MiB; measured fastest on CPU)

# builtin estimator -> what its value estimates
BUILTIN: dict[str, str] = {
    "k1": "KL(π‖π_ref), unbiased",
    "k2": "½E[ℓ²], equal to KL(π‖π_ref) to second order (biased for it)",
    "k3": "KL(π‖π_ref), unbiased",
    "abs": "E_π|ℓ| (not an estimate of any divergence; verl's 'abs')",
    "forward_k1": "KL(π_ref‖π), unbiased",
    "forward_k3": "KL(π_ref‖π), unbiased",
}
_BATCH_LEVEL = ("k_opt", "k_opt_crossfit")
_BUILTIN_DIVERGENCES = {n: get_divergence(n) for n in divergence_names()}  # as shipped

Estimator = str | FDivergence | TableEstimator


def resolve(estimator: Any) -> Estimator:
    """A builtin name, the :class:`klest.FDivergence` an ``fdiv:`` name refers to, or a record of
    the estimator table (``klest.register_estimator``): names are looked up in that one table."""
    if isinstance(estimator, FDivergence):
        if estimator.derivative_forms is not None and not _registered(estimator):
            _checked_forms(estimator)  # e.g. a dataclasses.replace of a built-in: stale forms?
        return estimator
    if isinstance(estimator, str) and estimator in BUILTIN:
        return estimator
    if not isinstance(estimator, (str, TableEstimator)):
        raise KlestError(
            "must be a name, a klest.Estimator or a klest.FDivergence", argument="estimator"
        )
    rec = get_estimator(estimator)
    if rec.batch:
        raise KlestError(
            f"{rec.name!r} fits a coefficient on the whole batch and has no per-token form; "
            "use 'k3' here (or klest.k_opt on detached log-ratios for logging)",
            argument="estimator",
        )
    if rec.name in BUILTIN:
        return rec.name
    if rec.name.startswith("fdiv:"):
        div = get_divergence(rec.target)
        shipped = {"reverse_kl": "k3", "forward_kl": "forward_k3"}  # the same values, fused
        if div.name in shipped and _BUILTIN_DIVERGENCES.get(div.name) is div:
            return shipped[div.name]
        return div
    return rec


def _registered(div: FDivergence) -> bool:
    try:
        return get_divergence(div.name) is div
    except KlestError:
        return False


_CHECKED: dict[int, FDivergence] = {}


def _checked_forms(div: FDivergence) -> None:
    """Check an unregistered divergence's ``derivative_forms`` against its value once (as
    :func:`klest.register_divergence` does); KlestError if they disagree."""
    if _CHECKED.get(id(div)) is div:
        return
    _check_derivative_forms(div)
    _CHECKED[id(div)] = div


def _xp(L: torch.Tensor) -> Any:
    return array_api_compat.array_namespace(L)


def _user_record(est: Estimator) -> TableEstimator | None:
    """The table record of an estimator whose functions are user code (a registered or
    unregistered :class:`klest.Estimator`, or a divergence klest does not ship), else None."""
    if isinstance(est, TableEstimator):
        return None if is_builtin(est) else est
    if isinstance(est, FDivergence) and _BUILTIN_DIVERGENCES.get(est.name) is not est:
        return get_estimator(est)
    return None


def _checked(est: Estimator, L: torch.Tensor, out: Any, part: Any = "value") -> torch.Tensor:
    """``out`` if user code returned one value per token, of a floating dtype at least as wide
    as L's, without NaN where L is not NaN (:func:`klest.table.check_values`: one pass, once per
    call and function); KlestError naming the estimator otherwise. klest's own forms pass
    unchecked. Under ``torch.func`` the NaN check is skipped (no host reads there)."""
    rec = _user_record(est)
    if rec is None:
        return out
    return check_values(rec, L, out, nan=not traced(L, out), part=part)


def _finite(L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    fin = L > -torch.inf
    return fin, torch.where(fin, L, torch.zeros_like(L))


def value(est: Estimator, L: torch.Tensor) -> torch.Tensor:
    """Per-token value; float64 for the cancelling forms when ``L`` is float32."""
    if est == "k1":
        return -L
    if est == "k2":
        return L * L * 0.5
    if est == "abs":
        return L.abs()
    if est == "k3":
        if L.dtype == torch.float32:  # float32 accuracy from the closed form in float64
            return nm.expm1mx_closed(_xp(L), L.double())
        return nm.expm1mx(_xp(L), L)
    if est == "forward_k1":
        return nm.xlogx(_xp(L), L)
    if est == "forward_k3":
        if L.dtype == torch.float32:
            return nm.lexpl_mexpm1_closed(_xp(L), L.double())
        return nm.lexpl_mexpm1(_xp(L), L)
    if isinstance(est, TableEstimator):
        return _checked(est, L, est.values(_xp(L), L))
    assert isinstance(est, FDivergence)
    return _checked(est, L, est.corrected(_xp(L), L))


Moments = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def moments(v: torch.Tensor, mask: torch.Tensor | None) -> Moments:
    """(n, mean, M2, n_inf) of ``v`` over the valid tokens (masked entries of v hold 0), float64.

    M2 = Σ (v - mean)² by two passes in float64 (never E[v²] - E[v]²)."""
    x = v.to(torch.float64)
    n = torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)
    if mask is not None:
        n = torch.count_nonzero(mask).to(torch.float64)
    mean = x.sum() / n.clamp(min=1.0)
    dev = x - mean
    if mask is not None:
        dev = dev.mul_(mask)
    return n, mean, dev.square_().sum(), torch.isinf(x).sum(dtype=torch.float64)


def k3_blocks(
    L: torch.Tensor, mask: torch.Tensor | None, want_moments: bool
) -> tuple[torch.Tensor, Moments | None]:
    """Σ_t k3(L_t) along the last axis (float64, shape L.shape[:-1] + (1,)), and optionally the
    moments of k3 over the valid tokens (masked entries of L must be 0).

    For float32 L this equals ``value("k3", L)`` reduced in float64, but works through cache-sized
    float64 buffers instead of materialising the whole float64 array; the moments are merged
    across blocks with Chan's formula.
    """
    if L.dtype != torch.float32 or L.ndim == 0 or L.numel() == 0:
        v = value("k3", L).to(torch.float64)
        return v.sum(dim=-1, keepdim=True), (moments(v, mask) if want_moments else None)
    flat = L.reshape(-1, L.shape[-1])
    xp = _xp(L)
    mflat = None if mask is None else mask.reshape(flat.shape)
    n_rows, width = flat.shape
    f64 = torch.float64
    out = torch.empty(n_rows, dtype=f64, device=L.device)
    step = max(1, _BLOCK // max(1, width))
    buf = torch.empty(min(step, n_rows), width, dtype=f64, device=L.device)
    parts: list[torch.Tensor] = []
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        b = buf[: stop - start]
        b.copy_(flat[start:stop])
        t = nm.expm1mx_closed(xp, b)  # k3 of this block, in float64
        torch.sum(t, dim=1, out=out[start:stop])
        if want_moments:
            mb = None if mflat is None else mflat[start:stop]
            n_b = (
                torch.tensor(float(t.numel()), dtype=f64, device=L.device)
                if mb is None
                else torch.count_nonzero(mb).to(f64)
            )
            mu_b = out[start:stop].sum() / n_b.clamp(min=1.0)
            # centred sum of squares over the valid tokens only: masked deviations are zeroed
            # (a bool multiply: faster than torch.where on CPU; -mu_b · 0 is NaN only when mu_b
            # is infinite, and std is then +inf anyway), never subtracted afterwards, which
            # cancels when few tokens are valid and |mu_b| is large
            dev = torch.sub(t, mu_b, out=b)
            if mb is not None:
                dev.mul_(mb)
            m2_b = dev.square_().sum()
            parts.append(torch.stack([n_b, mu_b, m2_b]))
    sums = out.reshape(*L.shape[:-1], 1)
    if not want_moments:
        return sums, None
    nb, mub, m2b = torch.stack(parts).unbind(1)
    n = nb.sum()
    mean = (nb * mub).sum() / n.clamp(min=1.0)
    m2 = m2b.sum() + (nb * (mub - mean) ** 2).sum()
    if bool(torch.isfinite(mean)):  # one host check instead of a pass over every block
        n_inf = torch.zeros((), dtype=f64, device=L.device)
    else:
        inf = (flat == -torch.inf) | (flat.double() > 709.78)  # where float64 k3 is +inf
        if mflat is not None:
            inf = inf & mflat
        n_inf = torch.count_nonzero(inf).to(f64)
    return sums, (n, mean, m2, n_inf)


# ------------------------------------------------------------------------------ derivatives
# v'(L) and v(L) - v'(L) come from the estimator's record: the table's ``derivative`` and
# ``value_minus_derivative`` for the built-ins and registered estimators, the divergence's
# ``derivative_forms`` for f-divergences (closed forms: autograd of a value gives NaN where e^L
# overflows, and v - v' as a difference cancels two terms of size ~r). Without them: autograd.
# "abs" (verl's, not an estimator of a divergence) is the one form kept here.


def _record(est: Estimator) -> TableEstimator | None:
    if isinstance(est, TableEstimator):
        return est
    if isinstance(est, str) and est != "abs":
        return get_estimator(est)
    return None


def v_minus_slope(est: Estimator, L: torch.Tensor) -> torch.Tensor:
    """v(L) - v'(L): the per-token coefficient of "score + pathwise" (a differentiable weight).

    Closed forms from the record avoid the cancellation of two terms of size e^L: k3 gives
    exactly -L (= ℓ), forward_k3 -expm1(L), forward_k1 -e^L.
    """
    if est == "abs":
        return L.abs() - torch.sign(L)
    if isinstance(est, FDivergence):
        gap = est.value_minus_slope(_xp(L), L)
        if gap is not None:
            return _checked(est, L, gap, "value_minus_derivative")
    rec = _record(est)
    if rec is not None and rec.value_minus_derivative is not None:
        return _checked(est, L, rec.value_minus_derivative(_xp(L), L), "value_minus_derivative")
    return value(est, L) - slope(est, L)


def slope(est: Estimator, L: torch.Tensor) -> torch.Tensor:
    """dv/dL, finite wherever L > -inf; at L = -inf its limit (or ∓inf for k2)."""
    if est == "abs":
        return torch.sign(L)
    if isinstance(est, FDivergence):
        d = est.slope(_xp(L), L)
        if d is not None:
            return _checked(est, L, d, "derivative")
    rec = _record(est)
    if rec is not None and rec.derivative is not None:
        return _checked(est, L, rec.derivative(_xp(L), L), "derivative")
    fin, Lf = _finite(L)
    if traced(L):  # under torch.func (grad, vmap): its own transform, composable with theirs
        d = torch.func.grad(lambda x: value(est, x).sum())(Lf)
    elif L.requires_grad:  # double backward: v' stays a function of L, so v'' is not dropped
        with torch.enable_grad():
            (d,) = torch.autograd.grad(value(est, Lf).sum(), Lf, create_graph=True)
    else:
        with torch.enable_grad():
            Lr = Lf.detach().requires_grad_(True)
            (d,) = torch.autograd.grad(value(est, Lr).sum(), Lr)
    return _checked(est, L, torch.where(fin, d, torch.zeros_like(d)), "derivative")
