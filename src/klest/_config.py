"""Process-wide options: validation on/off and the number of worker threads for reductions."""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace

from .errors import KlestError

__all__ = ["Options", "get_options", "options", "set_options"]


@dataclass(frozen=True)
class Options:
    """``validate``: check values (NaN, infinities) and raise :class:`KlestError` on bad input.
    Shape, dtype and library checks are always made; they cost nothing.
    ``threads``: worker threads for NumPy reductions over large arrays (results do not depend on
    it: the work is split into fixed blocks merged in order); the lab's workers too.
    ``fast``: use the compiled kernels of the ``klest[fast]`` extra when it is installed (the
    environment variable ``KLEST_FAST=0`` turns them off too); False forces the NumPy path."""

    validate: bool = True
    threads: int = max(1, min(2, os.cpu_count() or 1))
    fast: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "threads":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise KlestError(f"must be an integer >= 1, got {value!r}", argument=f.name)
            elif not isinstance(value, bool):  # a string "false" or numpy.bool_: refused
                raise KlestError(f"must be True or False, got {value!r}", argument=f.name)


_DEFAULT = Options()  # frozen, hence safe as a ContextVar default
_current: contextvars.ContextVar[Options] = contextvars.ContextVar("klest_options")


def _get() -> Options:
    return _current.get(_DEFAULT)


def get_options() -> Options:
    """The options in force."""
    return _get()


def fast_wanted() -> bool:
    """Whether compiled kernels are wanted now: ``options(fast=...)`` and ``KLEST_FAST`` (``0`` or
    ``false`` turns them off). Asked before :mod:`klest._fast` is imported, so that numba is not
    loaded at all when they are off."""
    if os.environ.get("KLEST_FAST", "1").strip() in ("0", "false", "False"):
        return False
    return _get().fast


def set_options(**changes: object) -> Options:
    """Change options for the rest of this context (thread/task); returns the new options."""
    new = _changed(changes)
    _current.set(new)
    return new


def _changed(changes: dict[str, object]) -> Options:
    """The options in force with ``changes`` applied, each checked for its type: a string such as
    ``validate="false"`` is refused, never read as true."""
    names = [f.name for f in fields(Options)]
    for name in changes:
        if name not in names:
            raise KlestError(f"unknown option {name!r}; the options are {', '.join(names)}")
    return replace(_get(), **changes)  # type: ignore[arg-type]  # __post_init__ checks types


@contextlib.contextmanager
def options(**changes: object) -> Iterator[Options]:
    """Temporarily change options: ``with klest.options(validate=False): ...``."""
    token = _current.set(_changed(changes))
    try:
        yield _get()
    finally:
        _current.reset(token)
