"""Process-wide options: validation on/off and the number of worker threads for reductions."""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from typing import Literal

from .errors import KlestError

__all__ = ["Options", "get_options", "options", "set_options"]


@dataclass(frozen=True)
class Options:
    """``validate``: check values (NaN, infinities) and raise :class:`KlestError` on bad input.
    Shape, dtype and library checks are always made; they cost nothing.
    ``threads``: worker threads for NumPy reductions over large arrays (results do not depend on
    it: the work is split into fixed blocks merged in order); the lab's workers too.
    ``fast``: whether to use the compiled kernels of the ``klest[fast]`` extra when it is
    installed. True: always; False: never (the NumPy path); ``"auto"`` (the default): once they
    pay for themselves. Loading numba and the cached kernels costs about 0.4 s and 100 MiB in a
    fresh process, which a small job never wins back, so under "auto" the kernels are loaded once
    the values computed without them in this process reach :data:`AUTO_FAST_WORK` (a "ski
    rental" rule: never more than about twice the time of the better choice), or at once if numba
    is already loaded. The environment variable ``KLEST_FAST=0`` turns them off whatever the
    option; ``KLEST_FAST=1`` turns "auto" into always; any value other than 0/false/no/off,
    1/true/yes/on and auto is refused with :class:`KlestError` where the kernels are decided."""

    validate: bool = True
    threads: int = max(1, min(2, os.cpu_count() or 1))
    fast: bool | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "threads":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise KlestError(f"must be an integer >= 1, got {value!r}", argument=f.name)
            elif f.name == "fast" and isinstance(value, str) and value == "auto":
                continue
            elif not isinstance(value, bool):  # a string "false" or numpy.bool_: refused
                extra = ' or "auto"' if f.name == "fast" else ""
                raise KlestError(f"must be True or False{extra}, got {value!r}", argument=f.name)


_DEFAULT = Options()  # frozen, hence safe as a ContextVar default
_current: contextvars.ContextVar[Options] = contextvars.ContextVar("klest_options")


def _get() -> Options:
    return _current.get(_DEFAULT)


def get_options() -> Options:
    """The options in force."""
    return _get()


#: Values computed on the NumPy path after which "auto" loads the compiled kernels: about where
#: the time they would have saved (1.7-2.4 ns per value, measured on estimate's k3 and the lab's
#: k1/k2/k3) equals their one-off load (0.4 s).
AUTO_FAST_WORK = 2e8
_auto_work = 0.0
_auto_lock = threading.Lock()


_ENV_OFF = ("0", "false", "no", "off")
_ENV_ON = ("1", "true", "yes", "on")
_ENV_AUTO = ("", "auto")  # unset or empty: the option decides


def _fast_env() -> str:
    """``KLEST_FAST``, lower-cased; a value that is none of 0/false/no/off, 1/true/yes/on, auto
    or empty raises :class:`KlestError` (read at each use: a typo is never taken for "auto")."""
    env = os.environ.get("KLEST_FAST", "").strip().lower()
    if env not in _ENV_OFF + _ENV_ON + _ENV_AUTO:
        raise KlestError(
            f"the environment variable KLEST_FAST={os.environ['KLEST_FAST']!r} is not understood; "
            "use 0 (off), 1 (on) or auto (or leave it unset)",
            argument="KLEST_FAST",
        )
    return env


def _forced() -> bool | None:
    """False: off (``KLEST_FAST=0`` or ``fast=False``); True: on (``fast=True``, or
    ``KLEST_FAST=1`` under "auto"); None: "auto" decides."""
    env = _fast_env()
    if env in _ENV_OFF:
        return False
    mode = _get().fast
    if isinstance(mode, bool):
        return mode
    return True if env in _ENV_ON else None


def fast_wanted() -> bool:
    """Whether compiled kernels are wanted now: ``KLEST_FAST``, else ``options(fast=...)``, where
    "auto" means: only if numba is already loaded (see :func:`claim_fast` for the jobs that
    decide to load it). Asked before :mod:`klest._fast` is imported, so that numba is not loaded
    at all when they are off."""
    forced = _forced()
    return forced if forced is not None else sys.modules.get("numba") is not None


def claim_fast(work: float) -> bool:
    """Whether a job of ``work`` values should use the compiled kernels, counting its work towards
    "auto"'s threshold (:data:`AUTO_FAST_WORK`, summed over the process) when it is not."""
    global _auto_work
    forced = _forced()
    if forced is not None:
        return forced
    if sys.modules.get("numba") is not None:
        return True
    with _auto_lock:
        _auto_work += max(float(work), 0.0)
        return _auto_work >= AUTO_FAST_WORK


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
