r"""The estimator table: one record per estimator, read by every consumer.

A record (:class:`Estimator`) says what an estimator is: its name, the divergence it is measured
against (``target``) and the direction, its per-sample value ``v(xp, L)`` on the log-ratio
``L = log p - log q`` of samples x ~ q, its derivative dv/dL, v - dv/dL, whether it needs the
whole batch (``k_opt`` fits λ̂ over the reduction) and whether it is unbiased.
:func:`klest.estimate`, the lab's engine and ground truth, :mod:`klest.rl` and the CLI all look
estimators up here, so adding one is one :func:`register_estimator` call.

The table is data: a record says nothing about how it is executed, and nothing is written into
the table at run time. Which chunk kernel computes a record (a compiled one of
:mod:`klest._fast`, found by the record's name, or a NumPy one, found by its value function) is
the streaming engine's choice (:func:`klest._stream.kernel_for`). The table imports only
:mod:`klest.divergences`, :mod:`klest._numerics`, :mod:`klest._backend`, :mod:`klest._names` and
:mod:`klest.errors`.

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
from dataclasses import dataclass
from typing import Any, Literal

import array_api_compat

from . import _names
from . import _numerics as nm
from ._backend import Array, is_traced
from ._names import FDIV_PREFIX
from .divergences import FDivergence, divergence_names, get_divergence
from .errors import KlestError

__all__ = [
    "BUILTIN_NAMES",
    "FDIV_PREFIX",
    "Estimator",
    "check_values",
    "get_estimator",
    "is_builtin",
    "known_estimator_names",
    "register_estimator",
    "unregister_estimator",
]

PerSample = Callable[[Any, Array], Array]  # (xp, L) -> one value per element of L
Direction = Literal["reverse", "forward", "f-divergence"]


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

    A value function must return an array of L's library and shape, of a real floating dtype at
    least as wide as L's, without NaN where L is not NaN: :meth:`values` checks the first three
    on every call and :func:`check_values` all four; :func:`klest.estimate` refuses a record that
    breaks them with a :class:`KlestError` naming it.
    """

    name: str
    target: str
    value: PerSample | None
    derivative: PerSample | None = None
    unbiased: bool = True
    batch: bool = False
    description: str = ""
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
        """Per-sample values on L, checked for their library, shape and dtype (not for NaN: see
        :func:`check_values`). A whole-batch estimator raises: it needs the reduction."""
        if self.value is None:
            raise KlestError(
                f"{self.name!r} fits a coefficient on the whole reduction and has no per-sample "
                "value on its own; pass it by name to klest.estimate",
                argument="estimator",
            )
        return check_values(self, L, self.value(xp, L), nan=False)


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
for _e in _BUILTINS:
    _names.add_estimator(_e.name)


# --------------------------------------------------------------------------- registration
def register_estimator(estimator: Estimator, *, overwrite: bool = False) -> Estimator:
    """Add ``estimator`` to the table under ``estimator.name``: from then on it is accepted by
    :func:`klest.estimate`, the lab (``klest compare --estimators``) and :mod:`klest.rl`.

    Refused with :class:`KlestError`: a name that is not a non-empty string, starts with
    ``fdiv:`` or ``alpha:``, is a built-in's or a divergence's name (or is taken, without
    ``overwrite=True``); an unknown ``target``; a ``value`` that is not callable, or a
    ``derivative`` / ``value_minus_derivative`` that is neither callable nor None; a whole-batch
    record (only the built-in k_opt fits over the batch).

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
    name = _names.check_estimator_name(estimator.name)  # format, reserved, not a divergence
    if name in BUILTIN_NAMES:
        raise KlestError(f"{name!r} is a built-in estimator", argument="estimator")
    if name in _REGISTRY and not overwrite:
        raise KlestError(
            f"an estimator named {name!r} exists; pass overwrite=True", argument="estimator"
        )
    get_divergence(estimator.target)  # the target must be a known divergence
    if estimator.batch:
        raise KlestError(
            "whole-batch estimators are built in (k_opt); register per-sample ones",
            argument="estimator",
        )
    if not callable(estimator.value):
        raise KlestError(
            f"{name!r}: a per-sample estimator needs a callable value(xp, L), got "
            f"{type(estimator.value).__name__}",
            argument="estimator",
        )
    for field in ("derivative", "value_minus_derivative"):
        fn = getattr(estimator, field)
        if fn is not None and not callable(fn):
            raise KlestError(
                f"{name!r}: {field} must be a callable (xp, L) -> array or None, got "
                f"{type(fn).__name__}",
                argument="estimator",
            )
    _REGISTRY[name] = estimator
    _names.add_estimator(name)
    return estimator


def unregister_estimator(name: str) -> None:
    """Remove a user-registered estimator (built-ins stay)."""
    if name in BUILTIN_NAMES:
        raise KlestError(f"{name!r} is a built-in estimator", argument="name")
    if _REGISTRY.pop(name, None) is not None:
        _names.discard_estimator(name)


def is_builtin(rec: Estimator) -> bool:
    """Whether ``rec`` computes what the built-in of its name computes (the same value function,
    or, for k_opt, the same fit): the engine's test before it uses a kernel found by name."""
    builtin = _REGISTRY.get(rec.name) if rec.name in BUILTIN_NAMES else None
    return (
        builtin is not None
        and rec.value is builtin.value
        and rec.batch == builtin.batch
        and rec.cross_fit == builtin.cross_fit
    )


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
        return estimator
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
        return _REGISTRY[name]
    if name.startswith(FDIV_PREFIX):
        try:
            return _fdiv_record(get_divergence(name[len(FDIV_PREFIX) :]))
        except KlestError:
            raise _unknown(name) from None
    if name in divergence_names() or name.startswith("alpha:"):
        near = _names.confusable_estimators(name)
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
    """klest's per-sample functions name their record (:data:`klest._names.ESTIMATOR_TAG`, set
    by :mod:`klest.estimators`); any other callable is wrapped as ``fn(log_ratio=L)``."""
    tag = getattr(fn, _names.ESTIMATOR_TAG, None)
    if isinstance(tag, str) and tag in _REGISTRY:
        rec = _REGISTRY[tag]
        if rec.batch:
            raise KlestError(
                f"pass estimator={tag!r} (or 'k_opt_crossfit'): λ is fitted over the whole "
                "reduction, which a per-sample callable cannot do",
                argument="estimator",
            )
        return rec

    def value(xp: Any, L: Array) -> Array:
        return fn(log_ratio=L)

    return Estimator(getattr(fn, "__name__", "custom"), "reverse_kl", value, unbiased=False)


# ------------------------------------------------------------------------------ checking
def check_values(
    rec: Estimator,
    L: Array,
    values: Any,
    *,
    keep: Array | None = None,
    nan: bool = True,
    part: Literal["value", "derivative", "value_minus_derivative"] = "value",
) -> Array:
    """``values`` if they are what ``rec``'s value function (or its ``derivative`` or
    ``value_minus_derivative``, by ``part``) must return on ``L``; otherwise a
    :class:`KlestError` naming the estimator (and the part, if not the value).

    Checked: an array of L's library (not a Python number or a list), of L's shape exactly (no
    broadcasting: a scalar or a dropped element is refused), of a real floating dtype at least
    as wide as L's (an integer, complex or narrower result is refused); and, with ``nan=True``,
    no NaN where L is not NaN (among the entries where ``keep`` is true, if given). The NaN
    check reads every value once; it is skipped for abstract values (jax tracers).
    """
    who = repr(rec.name) if part == "value" else f"{rec.name!r} ({part})"
    if not array_api_compat.is_array_api_obj(values):
        raise KlestError(
            f"estimator {who} returned {type(values).__name__}, not an array",
            argument="estimator",
        )
    try:
        xp = array_api_compat.array_namespace(L, values)
    except TypeError:
        raise KlestError(
            f"estimator {who} returned a {type(values).__module__.split('.')[0]} array "
            f"for a {type(L).__module__.split('.')[0]} log-ratio",
            argument="estimator",
        ) from None
    shape, want = tuple(values.shape), tuple(L.shape)
    if shape != want:
        raise KlestError(
            f"estimator {who} returned shape {shape} for log-ratios of shape {want} "
            "(one value per sample is required)",
            argument="estimator",
        )
    dt = values.dtype
    if not xp.isdtype(dt, "real floating") or xp.finfo(dt).bits < xp.finfo(L.dtype).bits:
        raise KlestError(
            f"estimator {who} returned dtype {dt} for log-ratios of dtype {L.dtype} "
            "(a real floating dtype at least as wide is required)",
            argument="estimator",
        )
    if nan and not (is_traced(values) or is_traced(L)):
        bad = xp.isnan(values) & ~xp.isnan(L)
        if keep is not None:
            bad = bad & keep
        if bool(xp.any(bad)):
            raise KlestError(
                f"estimator {who} returned NaN for a log-ratio that is not NaN",
                argument="estimator",
            )
    return values
