r"""Running the lab's blocks on any :class:`concurrent.futures.Executor`, and on a Dask cluster.

A run of n samples is a list of independent blocks: block i draws from its own stream
``SeedSequence(seed, spawn_key=(0, i))`` and reduces to float64 moments. A block task
(:class:`BlockTask`) is a picklable pair of a block function and its payload, handed over by the
caller (the engine passes its own runner and plan: this module never imports the engine); it can
run in another thread, another process or on another machine. Its results are folded in block
order in the calling process, so a given seed gives bit-identical numbers whatever executes the
blocks.

The Dask executor of :func:`dask_executor` needs the ``klest[dask]`` extra
(``distributed``) and an existing scheduler: ``klest compare ... --scheduler tcp://host:8786``.
Every worker needs klest (and the same optional packages: with ``klest[fast]`` locally but not on
a worker, the per-chunk moments would come from the NumPy formulas and differ in the last bits).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from klest import KlestError

__all__ = ["BlockTask", "block_task", "dask_executor", "executor_width"]

CONNECT_TIMEOUT = 5.0  # seconds to reach a scheduler before giving up


@dataclass(frozen=True)
class BlockTask:
    """``task(i)`` is ``runner(payload, i)``, run where the task is called.

    ``runner`` is the caller's block function (for the lab: a module-level function of the
    engine, which pickles by reference) and ``payload`` everything it needs (the plan, the
    ``fast`` setting, estimator records to ship); this module does not look inside either."""

    runner: Callable[[Any, int], Any]
    payload: Any

    def __call__(self, index: int) -> Any:
        return self.runner(self.payload, index)


def block_task(runner: Callable[[Any, int], Any], payload: Any, executor: Executor) -> BlockTask:
    """The task ``i -> runner(payload, i)`` for ``executor``; unless the executor is a thread
    pool, it is checked to pickle, with a :class:`klest.KlestError` naming ``executor`` if not."""
    task = BlockTask(runner, payload)
    if not isinstance(executor, ThreadPoolExecutor):
        try:
            pickle.dumps(task)
        except Exception as e:
            raise KlestError(
                f"this run cannot be sent to another process ({type(e).__name__}: {e}); "
                "use lab distributions or specs and picklable estimators",
                argument="executor",
            ) from None
    return task


def executor_width(executor: Executor, default: int) -> int:
    """How many blocks ``executor`` runs at once: a pool's worker count, a Dask client's total
    threads, else ``default`` (the engine keeps twice this many blocks in flight)."""
    width = getattr(executor, "_max_workers", None)
    client = getattr(executor, "_client", None)
    if width is None and client is not None:
        try:
            width = sum(client.nthreads().values())
        except Exception:  # pragma: no cover - a client that cannot answer: keep the default
            width = None
    return max(1, int(width)) if width else max(1, default)


@contextmanager
def dask_executor(address: str, timeout: float | None = None) -> Iterator[Executor]:
    """An executor on the Dask cluster whose scheduler listens at ``address``
    (``tcp://host:port``); the client is closed on exit.

    Raises :class:`klest.KlestError` when ``distributed`` is not installed or the scheduler cannot
    be reached within ``timeout`` seconds (default :data:`CONNECT_TIMEOUT`)."""
    try:
        from distributed import Client
    except ImportError:
        raise KlestError(
            "--scheduler needs Dask's distributed package: pip install klest[dask]",
            argument="scheduler",
        ) from None
    timeout = CONNECT_TIMEOUT if timeout is None else timeout
    try:
        client = Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError, TypeError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise KlestError(
            f"cannot reach the Dask scheduler at {address} ({first})",
            argument="scheduler",
        ) from None
    try:
        yield client.get_executor(pure=False)
    finally:
        client.close()
