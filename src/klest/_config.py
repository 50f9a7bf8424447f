"""Process-wide options: validation on/off and the number of worker threads for reductions."""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace

__all__ = ["Options", "get_options", "options", "set_options"]


@dataclass(frozen=True)
class Options:
    """``validate``: check values (NaN, infinities) and raise :class:`KlestError` on bad input.
    Shape, dtype and library checks are always made; they cost nothing.
    ``threads``: worker threads for NumPy reductions over large arrays (results do not depend on
    it: the work is split into fixed blocks merged in order)."""

    validate: bool = True
    threads: int = max(1, min(2, os.cpu_count() or 1))


_DEFAULT = Options()  # frozen, hence safe as a ContextVar default
_current: contextvars.ContextVar[Options] = contextvars.ContextVar("klest_options")


def _get() -> Options:
    return _current.get(_DEFAULT)


def get_options() -> Options:
    """The options in force."""
    return _get()


def set_options(**changes: object) -> Options:
    """Change options for the rest of this context (thread/task); returns the new options."""
    new = _checked(replace(_get(), **changes))  # type: ignore[arg-type]
    _current.set(new)
    return new


def _checked(opts: Options) -> Options:
    if not isinstance(opts.threads, int) or opts.threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {opts.threads!r}")
    return opts


@contextlib.contextmanager
def options(**changes: object) -> Iterator[Options]:
    """Temporarily change options: ``with klest.options(validate=False): ...``."""
    token = _current.set(_checked(replace(_get(), **changes)))  # type: ignore[arg-type]
    try:
        yield _get()
    finally:
        _current.reset(token)
