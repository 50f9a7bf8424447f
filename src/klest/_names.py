r"""The one place where estimator names and divergence names meet.

Estimators (:mod:`klest.table`) and divergences (:mod:`klest.divergences`) share one namespace in
``estimate(..., estimator=...)``: ``"k3"`` is an estimator, ``"chi2"`` a divergence whose estimator
is ``"fdiv:chi2"``, and a bare divergence name is accepted as an alias of its ``fdiv:`` form.
Both registries report the names they hold here, and both registration functions ask here
whether a new name is allowed, so neither module needs the other's registry. This module sits
below both and imports only :mod:`klest.errors`.

Rules. A name is a non-empty string without commas or surrounding spaces; names starting with
``fdiv:`` or ``alpha:`` are reserved (``fdiv:<divergence>`` addresses a divergence's estimator,
``alpha:<a>`` the α-divergences); an estimator may not take a divergence's name and a divergence
may not take an estimator's. Two names at edit distance one (``"forward_kl"`` and
``"forward_k1"``) are "confusable": a bare divergence name confusable with an estimator's is not
accepted as an alias (see :func:`confusable_estimators`).
"""

from __future__ import annotations

from .errors import KlestError

__all__ = [
    "ESTIMATOR_TAG",
    "FDIV_PREFIX",
    "RESERVED_PREFIXES",
    "add_divergence",
    "add_estimator",
    "check_divergence_name",
    "check_estimator_name",
    "confusable_estimators",
    "discard_estimator",
    "edit_distance_at_most_one",
]

FDIV_PREFIX = "fdiv:"
RESERVED_PREFIXES = (FDIV_PREFIX, "alpha:")
#: Attribute by which a klest per-sample function (``klest.k3``) names its table record: the
#: table maps such a callable to the record without importing :mod:`klest.estimators`.
ESTIMATOR_TAG = "__klest_estimator__"

_estimators: set[str] = set()  # the estimator table's names (built-ins and registered)
_divergences: set[str] = set()  # the divergence registry's names


def _check_form(name: object, what: str, argument: str) -> str:
    if not isinstance(name, str) or not name or name != name.strip() or "," in name:
        raise KlestError(
            f"{what} name must be a non-empty string without commas or surrounding spaces, "
            f"got {name!r}",
            argument=argument,
        )
    return name


def check_estimator_name(name: object) -> str:
    """``name`` if an estimator may be registered under it (format, reserved prefixes, not a
    divergence's name); :class:`KlestError` otherwise. Whether it is taken by another estimator
    is the table's question (``overwrite=``)."""
    name = _check_form(name, "an estimator", "estimator")
    if name.startswith(RESERVED_PREFIXES):
        raise KlestError(
            f"{name!r}: names starting with 'fdiv:' or 'alpha:' are reserved for f-divergences "
            "(use klest.register_divergence)",
            argument="estimator",
        )
    if name in _divergences:
        raise KlestError(
            f"{name!r} is a divergence name; an estimator of another name avoids confusion",
            argument="estimator",
        )
    return name


def check_divergence_name(name: object) -> str:
    """``name`` if a divergence may be registered under it (format, reserved prefixes, not an
    estimator's name); :class:`KlestError` otherwise."""
    name = _check_form(name, "a divergence", "div")
    if name.startswith(RESERVED_PREFIXES):
        raise KlestError(
            f"{name!r}: names starting with 'alpha:' or 'fdiv:' are reserved", argument="div"
        )
    if name in _estimators:
        raise KlestError(
            f"{name!r} is an estimator's name; choose another name for the divergence",
            argument="div",
        )
    return name


def add_estimator(name: str) -> None:
    """Record that the estimator table holds ``name``."""
    _estimators.add(name)


def discard_estimator(name: str) -> None:
    """Record that the estimator table no longer holds ``name``."""
    _estimators.discard(name)


def add_divergence(name: str) -> None:
    """Record that the divergence registry holds ``name``."""
    _divergences.add(name)


def edit_distance_at_most_one(a: str, b: str) -> bool:
    """Whether ``b`` is ``a`` with at most one character changed, inserted or deleted."""
    if a == b:
        return True
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b, strict=True)) == 1
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def confusable_estimators(name: str) -> list[str]:
    """The estimator names (sorted) at edit distance at most one from ``name``."""
    return sorted(n for n in _estimators if edit_distance_at_most_one(n, name))
