r"""The estimator table: one record per estimator, read by every consumer.

A record (:class:`Estimator`) says what an estimator is: its name, the divergence it is measured
against (``target``) and the direction, its per-sample value ``v(xp, L)`` on the log-ratio
``L = log p - log q`` of samples x ~ q, its derivative dv/dL, whether it needs the whole batch
(``k_opt`` fits λ̂ over the reduction), and optionally a fused ``kernel`` that reduces a chunk of L
to the moments of v. :func:`klest.estimate`, the lab's engine and ground truth, :mod:`klest.rl` and
the CLI all look estimators up here, so adding one is one :func:`register_estimator` call.

Names. The built-ins are k1, k2, k3, forward_k1, forward_k3, k_opt and k_opt_crossfit. The
tangent-corrected estimator of any f-divergence is addressed explicitly as ``"fdiv:<divergence>"``
(``"fdiv:chi2"``, ``"fdiv:alpha:0.5"``; :func:`klest.divergence_names`). A bare divergence name
(``"chi2"``) is still accepted as an alias of its ``fdiv:`` form, except where it is one letter
from another estimator's name: ``"forward_kl"`` (next to ``"forward_k1"``, a different estimator)
raises "did you mean 'fdiv:forward_kl' or 'forward_k1'?".
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from . import _numerics as nm
from ._backend import Array
from .divergences import FDivergence, divergence_names, get_divergence
from .errors import KlestError

__all__ = [
    "Estimator",
    "get_estimator",
    "known_estimator_names",
    "register_estimator",
    "unregister_estimator",
]

PerSample = Callable[[Any, Array], Array]  # (xp, L) -> one value per element of L
#: A fused kernel: 1-D float32/float64 L (clamped, masked entries removed, non-empty) ->
#: (mean, m2, min, max) of the per-sample values, accumulated in float64.
Kernel = Callable[[np.ndarray], tuple[float, float, float, float]]
Direction = Literal["reverse", "forward", "f-divergence"]

FDIV_PREFIX = "fdiv:"


@dataclass(frozen=True)
class Estimator:
    r"""One estimator: a function of L = log p(x) - log q(x), x ~ q, whose mean estimates a target.

    ``value(xp, L)``: per-sample values (any array namespace; None for whole-batch estimators).
    ``derivative(xp, L)``: dv/dL (None: obtained by automatic differentiation where needed).
    ``value_minus_derivative(xp, L)``: v - dv/dL in a form without the cancellation of the
    difference (None: the difference is used), the coefficient of :mod:`klest.rl`'s
    "score + pathwise" gradients.
    ``target``: the divergence name the estimator is measured against (``"reverse_kl"`` =
    KL(q‖p), ``"forward_kl"`` = KL(p‖q), or any :func:`klest.divergence_names` / ``alpha:<a>``).
    ``unbiased``: whether E_q[v] equals the target exactly (k2 is biased for the reverse KL).
    ``batch``: the value needs the whole reduction (k_opt: λ̂ fitted on it, see
    :func:`klest.k_opt`); ``cross_fit`` says whether λ̂ is cross-fitted.
    ``kernel``: optional fused reduction of a chunk (see :data:`Kernel`); the NumPy formula is used
    without it.
    """

    name: str
    target: str
    value: PerSample | None
    derivative: PerSample | None = None
    unbiased: bool = True
    batch: bool = False
    description: str = ""
    kernel: Kernel | None = None
    cross_fit: bool = False
    value_minus_derivative: PerSample | None = None

    @property
    def direction(self) -> Direction:
        """``"reverse"`` for KL(q‖p), ``"forward"`` for KL(p‖q), else ``"f-divergence"``."""
        if self.target == "reverse_kl":
            return "reverse"
        if self.target == "forward_kl":
            return "forward"
        return "f-divergence"

    def values(self, xp: Any, L: Array) -> Array:
        """Per-sample values on L (a whole-batch estimator raises: it needs the reduction)."""
        if self.value is None:
            raise KlestError(
                f"{self.name!r} fits a coefficient on the whole reduction and has no per-sample "
                "value on its own; pass it by name to klest.estimate",
                argument="estimator",
            )
        return self.value(xp, L)


# ------------------------------------------------------------------------------ built-ins
def _k1(xp: Any, L: Array) -> Array:
    return -L


def _k2(xp: Any, L: Array) -> Array:
    return L * L / 2


def _minus_one(xp: Any, L: Array) -> Array:
    return xp.full_like(L, -1.0)


def _identity(xp: Any, L: Array) -> Array:
    return L


def _finite_part(xp: Any, L: Array) -> tuple[Array, Array]:
    finite = L > -xp.inf
    return finite, xp.where(finite, L, xp.zeros_like(L))


def _d_forward_k1(xp: Any, L: Array) -> Array:
    """d(r L)/dL = (1 + L) r, with its limit 0 at L = -inf."""
    finite, Lf = _finite_part(xp, L)
    return xp.where(finite, (1 + Lf) * xp.exp(Lf), xp.zeros_like(L))


def _d_forward_k3(xp: Any, L: Array) -> Array:
    """d(r L - (r - 1))/dL = L r, with its limit 0 at L = -inf."""
    finite, Lf = _finite_part(xp, L)
    return xp.where(finite, Lf * xp.exp(Lf), xp.zeros_like(L))


def _expm1(xp: Any, L: Array) -> Array:
    return xp.expm1(L)


# v - dv/dL, exact forms (k3: expm1(L) - L - expm1(L) = -L; forward_k3: -expm1(L); ...)
def _k1_gap(xp: Any, L: Array) -> Array:
    return 1 - L


def _k2_gap(xp: Any, L: Array) -> Array:
    return L * L * 0.5 - L


def _minus_L(xp: Any, L: Array) -> Array:
    return -L


def _minus_exp(xp: Any, L: Array) -> Array:
    return -xp.exp(L)


def _minus_expm1(xp: Any, L: Array) -> Array:
    return -xp.expm1(L)


_BUILTINS: tuple[Estimator, ...] = (
    Estimator(
        "k1",
        "reverse_kl",
        _k1,
        _minus_one,
        description="-L: KL(q‖p), unbiased",
        value_minus_derivative=_k1_gap,
    ),
    Estimator(
        "k2",
        "reverse_kl",
        _k2,
        _identity,
        unbiased=False,
        description="½L²: KL(q‖p) to second order (unbiased for fdiv:log_squared)",
        value_minus_derivative=_k2_gap,
    ),
    Estimator(
        "k3",
        "reverse_kl",
        nm.expm1mx,
        _expm1,
        description="(r - 1) - L: KL(q‖p)",
        value_minus_derivative=_minus_L,
    ),
    Estimator(
        "forward_k1",
        "forward_kl",
        nm.xlogx,
        _d_forward_k1,
        description="r L: KL(p‖q)",
        value_minus_derivative=_minus_exp,
    ),
    Estimator(
        "forward_k3",
        "forward_kl",
        nm.lexpl_mexpm1,
        _d_forward_k3,
        description="r L - (r - 1): KL(p‖q)",
        value_minus_derivative=_minus_expm1,
    ),
    Estimator(
        "k_opt",
        "reverse_kl",
        None,
        batch=True,
        description="-L + λ̂(r - 1), λ̂ = Cov(L, r)/Var(r) fitted on the reduction (O(1/n) bias)",
    ),
    Estimator(
        "k_opt_crossfit",
        "reverse_kl",
        None,
        batch=True,
        cross_fit=True,
        description="k_opt with λ̂ cross-fitted on the two halves (unbiased)",
    ),
)
BUILTIN_NAMES = tuple(e.name for e in _BUILTINS)

_REGISTRY: dict[str, Estimator] = {e.name: e for e in _BUILTINS}
_KERNEL_TRIED: set[str] = set()


# --------------------------------------------------------------------------- registration
def register_estimator(estimator: Estimator, *, overwrite: bool = False) -> Estimator:
    """Add ``estimator`` to the table under ``estimator.name``: from then on it is accepted by
    :func:`klest.estimate`, the lab (``klest compare --estimators``) and :mod:`klest.rl`.

    >>> import numpy as np, klest
    >>> half_k1 = klest.Estimator("half_k1_doc", "reverse_kl", lambda xp, L: -L / 2,
    ...                           unbiased=False)
    >>> _ = klest.register_estimator(half_k1)
    >>> float(klest.estimate(log_ratio=np.array([-1.0, 0.0]), estimator="half_k1_doc").mean)
    0.25
    >>> klest.table.unregister_estimator("half_k1_doc")
    """
    if not isinstance(estimator, Estimator):
        raise KlestError("expected a klest.Estimator", argument="estimator", value=estimator)
    name = estimator.name
    if not isinstance(name, str) or not name or name != name.strip() or "," in name:
        raise KlestError(
            f"an estimator name must be a non-empty string without commas or surrounding spaces, "
            f"got {name!r}",
            argument="estimator",
        )
    if name.startswith(FDIV_PREFIX) or name.startswith("alpha:"):
        raise KlestError(
            f"{name!r}: names starting with 'fdiv:' or 'alpha:' are reserved for f-divergences "
            "(use klest.register_divergence)",
            argument="estimator",
        )
    if name in BUILTIN_NAMES:
        raise KlestError(f"{name!r} is a built-in estimator", argument="estimator")
    if name in divergence_names():
        raise KlestError(
            f"{name!r} is a divergence name; an estimator of another name avoids confusion",
            argument="estimator",
        )
    if name in _REGISTRY and not overwrite:
        raise KlestError(
            f"an estimator named {name!r} exists; pass overwrite=True", argument="estimator"
        )
    get_divergence(estimator.target)  # the target must be a known divergence
    if estimator.value is None and not estimator.batch:
        raise KlestError("a per-sample estimator needs a value function", argument="estimator")
    if estimator.batch:
        raise KlestError(
            "whole-batch estimators are built in (k_opt); register per-sample ones",
            argument="estimator",
        )
    _REGISTRY[name] = estimator
    _KERNEL_TRIED.discard(name)
    return estimator


def unregister_estimator(name: str) -> None:
    """Remove a user-registered estimator (built-ins stay)."""
    if name in BUILTIN_NAMES:
        raise KlestError(f"{name!r} is a built-in estimator", argument="name")
    _REGISTRY.pop(name, None)


# ------------------------------------------------------------------------------- look-up
def _fdiv_record(div: FDivergence) -> Estimator:
    forms = div.derivative_forms is not None
    return Estimator(
        FDIV_PREFIX + div.name,
        div.name,
        div.corrected,
        div.slope if forms else None,  # not None with the forms
        description=div.description or f"f(r) - f'(1)(r - 1) for {div.name}",
        value_minus_derivative=div.value_minus_slope if forms else None,
    )


def _edit_distance_at_most_one(a: str, b: str) -> bool:
    if a == b:
        return True
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b, strict=True)) == 1
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def known_estimator_names() -> list[str]:
    """Canonical names: built-ins, registered estimators, then ``fdiv:<divergence>``."""
    registered = sorted(n for n in _REGISTRY if n not in BUILTIN_NAMES)
    return [*BUILTIN_NAMES, *registered, *(FDIV_PREFIX + d for d in divergence_names())]


def _unknown(name: str) -> KlestError:
    known = known_estimator_names()
    candidates = [*known, *divergence_names()]
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.75)
    close = [c if c in known else FDIV_PREFIX + c for c in close]
    hint = f"; did you mean {' or '.join(repr(c) for c in dict.fromkeys(close))}?" if close else ""
    return KlestError(
        f"unknown estimator {name!r}{hint} (known: {', '.join(known)}, fdiv:alpha:<a>)",
        argument="estimator",
    )


def get_estimator(estimator: str | FDivergence | Estimator | Callable[..., Any]) -> Estimator:
    """The table's record for a name, an :class:`FDivergence`, an :class:`Estimator`, or a
    per-sample function: klest's own (``klest.k3``) or any callable accepting ``log_ratio=``.

    >>> get_estimator("fdiv:chi2").target, get_estimator("k2").unbiased
    ('chi2', False)
    """
    if isinstance(estimator, Estimator):
        return _with_kernel(estimator)
    if isinstance(estimator, FDivergence):
        return _fdiv_record(estimator)
    if callable(estimator):
        return _callable_record(estimator)
    if not isinstance(estimator, str):
        raise KlestError(
            "expected an estimator name, a klest.Estimator or a klest.FDivergence",
            argument="estimator",
            value=estimator,
        )
    name = estimator
    if name in _REGISTRY:
        return _with_kernel(_REGISTRY[name])
    if name.startswith(FDIV_PREFIX):
        try:
            return _fdiv_record(get_divergence(name[len(FDIV_PREFIX) :]))
        except KlestError:
            raise _unknown(name) from None
    if name in divergence_names() or name.startswith("alpha:"):
        near = [n for n in _REGISTRY if _edit_distance_at_most_one(n, name)]
        if near:  # one letter from a different estimator: refuse to guess
            options = " or ".join(repr(c) for c in [FDIV_PREFIX + name, *near])
            raise KlestError(
                f"estimator {name!r} is ambiguous: did you mean {options}? "
                f"(a divergence's own estimator is written {FDIV_PREFIX + name!r})",
                argument="estimator",
            )
        try:  # a bare divergence name: an accepted alias of its fdiv: form
            return _fdiv_record(get_divergence(name))
        except KlestError:
            raise _unknown(name) from None
    raise _unknown(name)


def _callable_record(fn: Callable[..., Any]) -> Estimator:
    from . import estimators as est

    if fn is est.k_opt:
        raise KlestError(
            "pass estimator='k_opt' (or 'k_opt_crossfit'): λ is fitted over the whole "
            "reduction, which a per-sample callable cannot do",
            argument="estimator",
        )
    for name in ("k1", "k2", "k3", "forward_k1", "forward_k3"):
        if fn is getattr(est, name):
            return get_estimator(name)

    def value(xp: Any, L: Array) -> Array:
        return fn(log_ratio=L)

    return Estimator(getattr(fn, "__name__", "custom"), "reverse_kl", value, unbiased=False)


def _with_kernel(rec: Estimator) -> Estimator:
    """Fill a built-in record's kernel from :mod:`klest._fast` the first time it can be used."""
    from ._config import fast_wanted

    if rec.kernel is not None or rec.batch or rec.name not in BUILTIN_NAMES:
        return rec  # only the built-ins have compiled kernels: numba is not loaded for others
    if rec.name in _KERNEL_TRIED:  # a record held from before the kernels were loaded
        known = _REGISTRY.get(rec.name)
        return known if known is not None and known.value is rec.value else rec
    if not fast_wanted():
        return rec
    try:
        from . import _fast
    except ImportError:  # pragma: no cover - the module guards its own imports
        return rec
    if not _fast.available():
        return rec
    _KERNEL_TRIED.add(rec.name)
    kernel = _fast.KERNELS.get(rec.name)
    if kernel is None or _REGISTRY.get(rec.name) is not rec:
        return rec
    rec = replace(rec, kernel=kernel)
    _REGISTRY[rec.name] = rec
    return rec


def fast_kernel(rec: Estimator) -> Kernel | None:
    """The record's kernel if compiled kernels are enabled now (``klest.options(fast=...)``);
    otherwise, for a record whose values are a primitive of :mod:`klest._numerics` with a NumPy
    chunk form (k3, forward_k3), that NumPy kernel (see :func:`klest._stream.numpy_kernel`)."""
    compiled = _compiled_kernel(_with_kernel(rec))  # "auto" may have just decided to load them
    if compiled is not None:
        return compiled
    kind = numpy_kind(rec)
    if kind is None:
        return None
    from ._stream import numpy_kernel

    return numpy_kernel(kind)


_NUMPY_KINDS: dict[PerSample, str] = {nm.expm1mx: "expm1mx", nm.lexpl_mexpm1: "lexpl_mexpm1"}


def numpy_kind(rec: Estimator) -> str | None:
    """The :mod:`klest._numerics` primitive (a ``numpy_values`` kind) of a record's values."""
    return _NUMPY_KINDS.get(rec.value) if rec.value is not None else None


def _compiled_kernel(rec: Estimator) -> Kernel | None:
    from ._config import fast_wanted

    if rec.kernel is None or not fast_wanted():
        return None
    if rec.name in BUILTIN_NAMES:
        try:
            from . import _fast
        except ImportError:  # pragma: no cover
            return None
        if not _fast.available():
            return None
    return rec.kernel
