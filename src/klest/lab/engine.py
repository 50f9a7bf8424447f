r"""The streaming Monte Carlo engine: draw from q, evaluate estimators, reduce, in constant memory.

The n samples are cut into fixed blocks of :data:`BLOCK` samples; block ``i`` draws from its own
NumPy stream ``SeedSequence(seed, spawn_key=(0, i))``, in chunks of :data:`CHUNK` samples that stay
in cache. Each chunk's per-sample values are reduced to float64 moments (mean and centred sum of
squares, two passes over the cached chunk) plus their maximum and minimum; chunks and blocks are
merged in order with Chan's formula. Blocks run on worker threads (NumPy releases the GIL inside
ufuncs), or on any executor (:mod:`klest.lab._executors`, handed :func:`run_block`'s shipped form),
and because the blocks, their streams and the merge order do not depend on the number of workers,
a given seed gives bit-identical results whatever ``workers`` or executor. Memory is a few chunk
buffers per worker, whatever n.

**Values beyond float64's squares.** Sums of squares are carried with a power-of-two scale
(:mod:`klest.lab._scaled`), so that values up to float64's limit (|L| ≈ 1e160 for p = N(0, 1e-80))
give their finite stdev; +inf only where the stdev itself exceeds float64.

Per-sample values come from the estimator table (:mod:`klest.table`: the same functions as
:func:`klest.estimate`), or from compiled kernels when ``klest[fast]`` is installed and on
(:func:`klest._stream.kernel_for`). When q and every p are normal and every per-sample estimator is
a built-in of :data:`FUSED_NAMES`, one compiled pass (``klest._fast.quadratic_lab``) forms
L = A z² + B z + C on the fly from the standard normal draws z, computes k3 (and e^L) once for
k3, forward_k3 and k_opt, and accumulates the moments and k_opt's co-moments of a whole block in
one running state. Under ``fast="auto"`` a run claims its work (:data:`WORK_PER_DRAW`); the first
run that loads the kernels does so on a thread of its own while its blocks draw their normals
ahead (at most one block per worker), which hides part of numba's load.

The optimal-λ estimator -L + λ̂(r - 1), with λ̂ = Cov(L, r)/Var(r) fitted on all n samples (the
core's ``k_opt``), is reduced exactly from the streamed co-moments of (L, k3, e = expm1(L))
merged with Chan's formula (:func:`klest.lab._scaled.kopt_values`), as :func:`klest.estimate`
does; compiled (``klest._fast.kopt_comoments`` off the normal pair) where the kernels are on.

**Heavy tails.** Each result carries ``max_share``, the share of the largest single squared
deviation in the sum of squares, max_i (v_i - v̄)² / Σ_i (v_i - v̄)². For i.i.d. values it tends to
0 almost surely if and only if the variance is finite (the "max over sum" criterion applied to
v²); for Gaussian-like tails it is about 2·ln(n)/n. A result is flagged unreliable (``reliable``
False) when one sample carries at least :func:`max_share_limit` of the sum of squares
(10 %, or 10·ln(n)/n for small n so that light tails are never flagged): the stdev estimate
would then move by 5 % or more if that one draw were left out; it is decided by a handful of
draws and jumps as n grows, which is what an infinite (or practically infinite) variance looks
like in a finite sample.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from klest import KlestError, Moments, _stream
from klest._config import claim_fast, get_options, options
from klest._numerics import LAB_SERIES_RADIUS, numpy_values
from klest._stream import kernel_for, numpy_kind
from klest.estimators import _k_lambda
from klest.table import (
    BUILTIN_NAMES,
    FDIV_PREFIX,
    Estimator,
    check_values,
    get_estimator,
    is_builtin,
)

from . import _scaled
from . import distributions as D
from ._executors import block_task, executor_width
from ._scaled import Comoments, ScaledMoments
from .specs import as_distribution

__all__ = [
    "BLOCK",
    "CHUNK",
    "MAX_SHARE_LIMIT",
    "EstimatorResult",
    "default_workers",
    "max_share_limit",
    "run",
]

CHUNK = 1 << 16  # samples per chunk: each float64 buffer is 512 KiB, in L2 cache (2^14 measured
# 1.6x slower on the NumPy path: per-chunk Python work, under the GIL, dominated)
BLOCK = 1 << 20  # samples per block: the unit of parallel work and of random streams
MAX_SHARE_LIMIT = 0.1  # one sample carrying >= 10 % of the sum of squares: stdev unreliable


def max_share_limit(n: float) -> float:
    """The flagging threshold for the largest squared deviation's share at sample size n."""
    return max(MAX_SHARE_LIMIT, 10.0 * math.log(max(n, 2.0)) / max(n, 1.0))


@dataclass(frozen=True)
class EstimatorResult:
    """Streamed statistics of one estimator's per-sample values.

    ``moments.m2`` is the centred sum of squares as a float (+inf where it exceeds float64);
    ``scaled_m2`` = (m, e) holds it exactly as m·4^e, from which ``std`` and ``stderr`` are
    taken (finite wherever the stdev itself is: :mod:`klest.lab._scaled`)."""

    name: str
    moments: Moments
    max_share: float
    lam: float | None = None  # λ̂ for k_opt
    scaled_m2: tuple[float, int] | None = None

    @property
    def n(self) -> int:
        return int(self.moments.n)

    @property
    def mean(self) -> float:
        return self.moments.mean

    @property
    def std(self) -> float:
        """The per-sample stdev (ddof 1)."""
        if self.scaled_m2 is None:
            return self.moments.std(1)
        m, e = self.scaled_m2
        return ScaledMoments(self.moments.n, self.moments.mean, m, e).std(1)

    @property
    def stderr(self) -> float:
        """The Monte Carlo standard error of the mean, std/√n."""
        n = self.moments.n
        return self.std / math.sqrt(n) if n > 0 else math.nan

    @property
    def reliable(self) -> bool:
        """False when the stdev estimate is dominated by single samples (see the module notes)."""
        return math.isfinite(self.std) and self.max_share < max_share_limit(self.moments.n)


def default_workers() -> int:
    """The worker threads a run uses by default: ``klest.options(threads=...)``."""
    return get_options().threads


# ------------------------------------------------------------------------- sampling L
LogRatioSampler = Callable[[np.random.Generator, int], list[np.ndarray]]


def _normal_coefficients(q: D.Normal, p: D.Normal) -> tuple[float, float, float]:
    """L = A z² + B z + C where x = loc_q + scale_q·z."""
    a = 0.5 / q.scale**2 - 0.5 / p.scale**2
    b = p.loc / p.scale**2 - q.loc / q.scale**2
    c = q.loc**2 / (2 * q.scale**2) - p.loc**2 / (2 * p.scale**2) + math.log(q.scale / p.scale)
    m, s = q.loc, q.scale
    return a * s * s, (2 * a * m + b) * s, a * m * m + b * m + c


def log_ratio_sampler(q: D.Distribution, ps: Sequence[D.Distribution]) -> LogRatioSampler:
    """A function ``(rng, k) -> [L_1, ..., L_m]`` drawing k samples x ~ q once and returning
    L_j = log p_j(x) - log q(x) for every target p_j (common random numbers across targets).

    Normal q and p take a shortcut: x = m + s·z, so L is the quadratic A z² + B z + C in z.
    """
    if type(q) is D.Normal and all(type(p) is D.Normal for p in ps):
        coefs = [_normal_coefficients(q, p) for p in ps]  # type: ignore[arg-type]
        bufs: list[np.ndarray] = []  # z and one L per target, reused from chunk to chunk

        def normal_pair(rng: np.random.Generator, k: int) -> list[np.ndarray]:
            if not bufs or bufs[0].size < k:
                bufs[:] = [np.empty(k) for _ in range(len(coefs) + 1)]
            z = bufs[0][:k]
            rng.standard_normal(out=z)  # the same stream as standard_normal(k)
            out = []
            for (A, B, C), buf in zip(coefs, bufs[1:], strict=True):
                L = buf[:k]
                if A == 0.0:
                    np.multiply(z, B, out=L)
                else:
                    np.multiply(z, A, out=L)
                    L += B
                    L *= z
                L += C
                out.append(L)
            return out

        return normal_pair

    def generic(rng: np.random.Generator, k: int) -> list[np.ndarray]:
        # the distribution draws and evaluates (small-shape gamma/beta work in log x: their
        # draws can lie where x itself is not representable)
        return q.log_ratios(rng, k, ps)

    return generic


# ------------------------------------------------------------------------------ one block
@dataclass(frozen=True)
class _Plan:
    """Everything a block needs (picklable when the distributions are): which q, targets and
    estimators, the seed, the block sizes and the chunk size."""

    q: D.Distribution
    targets: tuple[D.Distribution, ...]
    names: tuple[str, ...]  # per-sample estimators (table names)
    pair: bool  # whether k_opt's co-moments of (L, k3, expm1(L)) are wanted
    seed: int
    sizes: tuple[int, ...]
    chunk: int
    fused: bool = False  # normal q and p, built-in names: klest._fast.quadratic_lab
    compiled: bool = False  # compiled kernels on: k_opt's co-moments by klest._fast too
    records: tuple[Estimator, ...] = field(default=(), compare=False)
    kernels: tuple[Any, ...] = field(default=(), compare=False)  # chosen in the caller's context


@dataclass(frozen=True)
class BlockResult:
    """One block's moments, per target j: ``values[j][name]``, and for k_opt the co-moments
    ``pairs[j]`` of (L, k3, expm1(L)) over L > -inf and ``spans[j]`` (the extremes of L)."""

    n: int
    values: tuple[dict[str, ScaledMoments], ...]
    pairs: tuple[Comoments, ...]
    spans: tuple[tuple[float, float], ...]


def _coefficients(plan: _Plan) -> np.ndarray:
    return np.array([_normal_coefficients(plan.q, p) for p in plan.targets])  # type: ignore[arg-type]


# The compiled kernels are loaded (numba imported, the lab's kernel read from numba's cache) on a
# thread of their own, while the blocks of a fused run draw their normals ahead (whole blocks, in
# one call each: NumPy's generator releases the GIL); the kernels then reduce the same draws in
# the same chunks, so the numbers do not depend on when the loading ends.
_LOADED = threading.Event()
_LOADING = threading.Lock()
_loader: list[threading.Thread] = []
_load_failed: list[BaseException] = []


def _load_kernels() -> None:
    try:
        from klest import _fast  # numba: only once a job asks for the compiled kernels

        _fast.quadratic_lab(np.zeros(1), np.zeros((1, 3)), ("k1",), True)
    except Exception as e:  # pragma: no cover - numba installed but unusable: NumPy instead
        _load_failed.append(e)
    finally:
        _LOADED.set()


def _start_loading() -> None:
    """Start loading the compiled kernels (once per process) if that has not begun."""
    with _LOADING:
        if not _loader and not _LOADED.is_set():
            t = threading.Thread(target=_load_kernels, name="klest-load", daemon=True)
            _loader.append(t)
            t.start()


def _fast_module() -> Any:
    """:mod:`klest._fast` once loaded (waiting for the loader), None if it failed."""
    _start_loading()
    _LOADED.wait()
    if _load_failed:
        return None
    from klest import _fast  # already imported by the loader

    return _fast


def _compiled_module() -> Any:
    """:mod:`klest._fast` if its kernels can run here (numba), else None."""
    from klest import _fast  # numba: only for a run that uses the compiled kernels

    return _fast if _fast.KERNELS else None


def run_block(plan: _Plan, index: int) -> BlockResult:
    """Draw block ``index`` from its own stream ``SeedSequence(seed, spawn_key=(0, index))`` and
    reduce every estimator on every target, chunk by chunk (merged in order).

    Moments the compiled kernels could not hold although the values are finite (sums of squares
    beyond float64, a sum that overflowed, k_opt's co-moments flagged by the kernel) are taken
    again from the values by NumPy with a power-of-two scale (:mod:`klest.lab._scaled`): per
    chunk on the generic path, per block (the same draws, drawn again) on the fused one."""
    fast = None
    ahead: np.ndarray | None = None
    if plan.fused:
        _start_loading()
        if not _LOADED.is_set():  # draw the whole block while the kernels load
            ahead = np.empty(plan.sizes[index])
            _block_rng(plan, index).standard_normal(out=ahead)
        fast = _fast_module()
    elif plan.compiled:
        fast = _compiled_module()
    if plan.fused and fast is not None:
        res, redo = _fused_block(plan, index, fast, ahead)
        if not redo:
            return res
        again = _generic_block(plan, index, None, only=redo)  # NumPy, scaled
        values = tuple(
            {name: again.values[j][name] if (j, name) in redo else v for name, v in vals.items()}
            for j, vals in enumerate(res.values)
        )
        pairs = tuple(again.pairs[j] if (j, "") in redo else p for j, p in enumerate(res.pairs))
        spans = tuple(again.spans[j] if (j, "") in redo else s for j, s in enumerate(res.spans))
        return BlockResult(res.n, values, pairs, spans)
    return _generic_block(plan, index, fast)


def _block_rng(plan: _Plan, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(plan.seed, spawn_key=(0, index)))


def _fused_block(
    plan: _Plan, index: int, fast: Any, ahead: np.ndarray | None
) -> tuple[BlockResult, set[tuple[int, str]]]:
    """One block of a normal pair by :func:`klest._fast.quadratic_lab`, its running state
    carried from chunk to chunk (the same sums whether the draws were made ahead or not), and
    the (target, name) pairs to take again by NumPy ("" for k_opt's co-moments)."""
    size = plan.sizes[index]
    coefs = _coefficients(plan)
    state = fast.lab_state(len(plan.targets), len(plan.names))
    rng = _block_rng(plan, index)
    z_buf = np.empty(min(plan.chunk, size)) if ahead is None else None
    mom = co = None
    for done in range(0, size, plan.chunk):
        k = min(plan.chunk, size - done)
        if ahead is not None:
            z = ahead[done : done + k]
        else:  # drawn into one reused buffer: the same stream, no page faults
            z = z_buf[:k]  # type: ignore[index]
            rng.standard_normal(out=z)
        mom, co = fast.quadratic_lab(z, coefs, plan.names, plan.pair, state)
    assert mom is not None and co is not None
    redo: set[tuple[int, str]] = set()
    values, pairs, spans = [], [], []
    for j in range(len(plan.targets)):
        vals = {}
        for i, name in enumerate(plan.names):
            mean, m2, lo, hi = (float(x) for x in mom[j, i])
            if not (math.isfinite(mean) and math.isfinite(m2)) and math.isfinite(lo + hi):
                redo.add((j, name))  # finite values whose sums overflowed
            vals[name] = ScaledMoments.make(float(size), mean, m2, lo, hi)
        values.append(vals)
        if plan.pair and co[j, 11]:
            redo.add((j, ""))
        pairs.append(_comoments(co[j]) if plan.pair else Comoments())
        spans.append((float(co[j, 12]), float(co[j, 13])) if plan.pair else (math.inf, -math.inf))
    return BlockResult(size, tuple(values), tuple(pairs), tuple(spans)), redo


def _generic_block(
    plan: _Plan, index: int, fast: Any, only: set[tuple[int, str]] | None = None
) -> BlockResult:
    """One block by the sampler, chunk by chunk: per-sample values by the plan's kernels (or
    the table's NumPy formulas), k_opt's co-moments by :func:`klest._fast.kopt_comoments` when
    ``fast`` is the compiled module, else NumPy. ``only``: just these (target, name) pairs
    ("" for k_opt), by NumPy (the fused path's fallback)."""
    rng = _block_rng(plan, index)
    size = plan.sizes[index]
    records = plan.records or tuple(get_estimator(n) for n in plan.names)
    kernels = (None,) * len(records) if only is not None else plan.kernels
    kernels = kernels or (None,) * len(records)
    m = len(plan.targets)
    values = [{name: ScaledMoments() for name in plan.names} for _ in range(m)]
    pairs = [Comoments() for _ in range(m)]
    spans = [(math.inf, -math.inf)] * m
    kinds = tuple(numpy_kind(r) for r in records)
    vbuf = np.empty(plan.chunk)

    def wanted(j: int, name: str) -> bool:
        return only is None or (j, name) in only

    def lab_values(rec: Estimator, kind: str | None, L: np.ndarray) -> np.ndarray:
        """The record's values on L (float64), to LAB_RTOL relative for the series kinds."""
        if kind is None or L.dtype != np.float64 or L.ndim != 1:
            raw = rec.values(_NPX, L)
            if not is_builtin(rec):  # a registered estimator: NaN on finite L is refused
                check_values(rec, L, raw)
            v = np.asarray(raw, dtype=np.float64).reshape(-1)
            # chunk() overwrites its input: copy only values that share L's memory
            return v.copy() if np.may_share_memory(v, L) else v
        return numpy_values(kind, L, vbuf[: L.size], radius=LAB_SERIES_RADIUS)

    k3_record = get_estimator("k3")

    def k3(L: np.ndarray) -> np.ndarray:
        return lab_values(k3_record, "expm1mx", L.reshape(-1)).reshape(L.shape)

    sampler = log_ratio_sampler(plan.q, plan.targets)
    done = 0
    with np.errstate(all="ignore"), options(validate=False):
        while done < size:
            k = min(plan.chunk, size - done)
            for j, L in enumerate(sampler(rng, k)):
                for i, name in enumerate(plan.names):
                    if not wanted(j, name):
                        continue
                    kernel, rec, kind = kernels[i], records[i], kinds[i]
                    if kernel is not None and kernel not in _stream.NUMPY_KERNELS:
                        mean, m2, lo, hi = (float(x) for x in kernel(L))
                        if not (math.isfinite(mean) and math.isfinite(m2)) and math.isfinite(
                            lo + hi
                        ):  # finite values whose sums overflowed: NumPy, scaled
                            part = _scaled.chunk(lab_values(rec, kind, L))
                        else:
                            part = ScaledMoments.make(float(k), mean, m2, lo, hi)
                    else:  # chunk() overwrites the values: vbuf or a fresh array
                        part = _scaled.chunk(lab_values(rec, kind, L))
                    values[j][name] = values[j][name].merge(part)
                if not (plan.pair and wanted(j, "")):
                    continue
                lo, hi = float(np.minimum.reduce(L)), float(np.maximum.reduce(L))
                spans[j] = (min(spans[j][0], lo), max(spans[j][1], hi))
                res = None
                if fast is not None and L.dtype == np.float64 and L.ndim == 1:
                    res = fast.kopt_comoments(L)
                if res is not None and not res[11]:
                    pairs[j] = pairs[j].merge(_comoments(res))
                else:
                    pairs[j] = pairs[j].merge(_scaled.co_chunk(L.reshape(-1), k3))
            done += k
    return BlockResult(size, tuple(values), tuple(pairs), tuple(spans))


def _comoments(r: np.ndarray) -> Comoments:
    """A :class:`Comoments` from :data:`klest._fast.KOPT_FIELDS`-ordered numbers."""
    if not r[0]:
        return Comoments(n_inf=float(r[10]))
    mean = (float(r[1]), float(r[2]), float(r[3]))
    return Comoments.make(float(r[0]), mean, tuple(float(x) for x in r[4:10]), n_inf=float(r[10]))


@dataclass(frozen=True)
class _Shipment:
    """A plan sent to another process or machine: without its table records and kernels
    (functions chosen in the caller's context), which :func:`_run_shipped` looks up again by name
    where it runs, with compiled kernels on or off as ``fast`` says. Estimators registered with
    :func:`klest.register_estimator` travel as records (``shipped``), which must then pickle."""

    plan: _Plan
    fast: bool
    shipped: tuple[Estimator, ...] = ()


def _shipment(plan: _Plan, fast: bool) -> _Shipment:
    registered = [r for r in plan.records if r.name not in BUILTIN_NAMES]
    shipped = tuple(r for r in registered if not r.name.startswith(FDIV_PREFIX))
    return _Shipment(replace(plan, records=(), kernels=()), bool(fast), shipped)


def _run_shipped(shipment: _Shipment, index: int) -> BlockResult:
    """Block ``index`` of a shipped plan (the executors' block function)."""
    by_name = {rec.name: rec for rec in shipment.shipped}
    with options(fast=shipment.fast):
        records = tuple(by_name.get(n) or get_estimator(n) for n in shipment.plan.names)
        kernels = () if shipment.plan.fused else tuple(kernel_for(r) for r in records)
        plan = replace(shipment.plan, records=records, kernels=kernels)
    return run_block(plan, index)


def _npx() -> Any:
    import array_api_compat.numpy as npx

    return npx


_NPX = _npx()


# ------------------------------------------------------------------------------- the run
def run(
    q: Any,
    p: Any,
    estimators: Iterable[str],
    n: int,
    seed: int = 0,
    *,
    workers: int | None = None,
    chunk: int | None = None,
    block: int = BLOCK,
    progress: Callable[[int, int], None] | None = None,
    executor: Executor | None = None,
) -> dict[str, EstimatorResult]:
    """Draw n samples from q and return each estimator's streamed statistics against p.

    ``estimators``: names from the estimator table (:func:`klest.estimator_names`;
    ``k_opt_crossfit`` is not offered: the streamed ``k_opt`` fits λ̂ on all samples, with O(1/n)
    bias). ``progress(done, n)`` is called from the calling thread after each block. ``workers``
    defaults to ``klest.options(threads=...)``; the result does not depend on it.
    ``executor``: any :class:`concurrent.futures.Executor` (a process pool, a Dask client's
    ``get_executor()``, ...) runs the blocks instead of the engine's threads; the blocks are
    sent as picklable tasks and folded in block order, so the result is bit-identical to a local
    run with the same seed (torch.distributions, which sample from torch's global generator, run
    locally).

    >>> res = run("normal(0, 1)", "normal(1, 1)", ["k1", "k3"], n=200_000, seed=1)
    >>> round(res["k3"].mean, 2), res["k3"].reliable
    (0.5, True)
    """
    return run_many(
        q,
        [p],
        estimators,
        n,
        seed,
        workers=workers,
        chunk=chunk,
        block=block,
        progress=progress,
        executor=executor,
    )[0]


def run_many(
    q: Any,
    ps: Sequence[Any],
    estimators: Iterable[str],
    n: int,
    seed: int = 0,
    *,
    workers: int | None = None,
    chunk: int | None = None,
    block: int = BLOCK,
    progress: Callable[[int, int], None] | None = None,
    executor: Executor | None = None,
) -> list[dict[str, EstimatorResult]]:
    """:func:`run` for several targets p_1, ..., p_m at once, on the same n draws from q.

    Drawing is usually the dominant cost, and one set of draws serves every target (common random
    numbers: each target's estimate is exactly what :func:`run` returns for it with this seed).
    ``executor``: as in :func:`run`.
    """
    q = as_distribution(q)
    targets = [as_distribution(p) for p in ps]
    names = list(dict.fromkeys(estimators))
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n <= 0:
        raise KlestError(f"n must be a positive integer, got {n!r}", argument="n")
    n = int(n)
    records = _check_names(names)
    for p in targets:
        if q.dim != p.dim:
            raise KlestError(f"q has dimension {q.dim} but p has dimension {p.dim}", argument="p")
    if chunk is None:  # CHUNK, or the whole block when blocks are smaller
        chunk = min(CHUNK, block) if isinstance(block, int) and block > 0 else CHUNK
    if chunk <= 0 or block <= 0 or block % chunk:
        raise KlestError("block must be a positive multiple of chunk", argument="block")
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise KlestError(f"workers must be >= 1, got {workers}", argument="workers")
    if any(isinstance(d, D.TorchDistribution) for d in (q, *targets)):
        workers = 1  # torch.distributions sample from torch's global generator
        executor = None

    per_sample = tuple(name for name in names if not records[name].batch)
    recs = tuple(records[name] for name in per_sample)
    use_fast = claim_fast(n * len(targets) * _work_per_draw(names))  # "auto": klest.options
    compiled = use_fast and _numba_installed()
    fused = compiled and _fusable(q, targets, recs)
    if fused:  # the loading of numba overlaps the first blocks' draws (see run_block)
        _start_loading()
    with options(fast=use_fast):
        plan = _Plan(  # klest.options; the kernels are chosen here, in the caller's context
            q,
            tuple(targets),
            per_sample,
            "k_opt" in names,
            int(seed),
            tuple(min(block, n - s) for s in range(0, n, block)),
            chunk,
            fused=fused,
            compiled=compiled,
            records=recs,
            kernels=() if fused else tuple(kernel_for(r) for r in recs),
        )
    done = 0

    def report(i: int, res: BlockResult) -> None:
        nonlocal done
        done += res.n
        if progress is not None:
            progress(done, n)

    task: Callable[[int], BlockResult] = lambda i: run_block(plan, i)  # noqa: E731
    if executor is not None:
        task = block_task(_run_shipped, _shipment(plan, use_fast), executor)
        workers = executor_width(executor, workers)
    results = _stream.ordered_map(task, range(len(plan.sizes)), workers, report, executor)
    out = []
    for j in range(len(targets)):
        values = {}
        for name in per_sample:
            acc = ScaledMoments()
            for r in results:  # in block order: the result ignores how the blocks ran
                acc = acc.merge(r.values[j][name])
            values[name] = acc
        pair = Comoments()
        lo, hi = math.inf, -math.inf
        for r in results:
            pair = pair.merge(r.pairs[j])
            lo, hi = min(lo, r.spans[j][0]), max(hi, r.spans[j][1])
        out.append(_merge(names, values, pair, (lo, hi)))
    return out


#: The estimators of the fused normal pass (:func:`klest._fast.quadratic_lab`; checked against
#: ``klest._fast.CODES`` by the tests), named here so that deciding on it does not import numba.
FUSED_NAMES = frozenset({"k1", "k2", "k3", "forward_k1", "forward_k3"})

#: What one draw costs per target and estimator on the NumPy path, counted for the "auto" rule
#: of ``klest.options(fast=...)`` (:func:`klest._config.claim_fast`), in units of one simple value
#: (1 for k1, k2, k3 and any other estimator: compiled, they save about 2 ns per value, the unit
#: of ``AUTO_FAST_WORK``): forward_k3 and k_opt save 3 and 3.6 times as much (their NumPy forms
#: take series, exponentials and co-moments). Measured on the seed's experiment (2-core AMD EPYC,
#: 2026-12-07, benchmarks/bench_lab.py): the engine's five estimators take 0.48 s on NumPy and
#: 0.087 s compiled (k1/k2/k3 alone: 0.198 and 0.073 s), so the saving at the default size (1e7
#: draws, 2 targets: 1.9e8 units) is about numba's load (0.45 s and 110 MiB): ``klest reproduce``
#: ran in 0.95 s with the kernels and 0.96-1.09 s without. Below the threshold the default stays
#: on NumPy (65 MiB instead of 175); ten times the draws load the kernels.
WORK_PER_DRAW = {"forward_k3": 3.0, "k_opt": 3.6}


def _work_per_draw(names: Sequence[str]) -> float:
    return max(sum(WORK_PER_DRAW.get(name, 1.0) for name in names), 1.0)


def _numba_installed() -> bool:
    """Whether numba can be imported (asked without importing it)."""
    return "numba" in sys.modules or importlib.util.find_spec("numba") is not None


def _fusable(q: D.Distribution, targets: Sequence[D.Distribution], recs: Sequence[Any]) -> bool:
    """Normal q and targets, every per-sample estimator a built-in of the fused pass."""
    if type(q) is not D.Normal or any(type(p) is not D.Normal for p in targets):
        return False
    return all(r.name in FUSED_NAMES and is_builtin(r) for r in recs)


def _check_names(names: list[str]) -> dict[str, Estimator]:
    out = {}
    for name in names:
        if name == "k_opt_crossfit":
            raise KlestError(
                "k_opt_crossfit is not streamed; use k_opt (λ̂ fitted on all samples)",
                argument="estimators",
            )
        try:
            out[name] = get_estimator(name)
        except KlestError as e:
            raise KlestError(str(e.args[0]).split(": ", 1)[-1], argument="estimators") from None
    return out


def _share(acc: ScaledMoments, vmax: float, vmin: float) -> float:
    """The largest squared deviation's share of the sum of squares (1 where not finite)."""
    if not (math.isfinite(acc.mean) and math.isfinite(vmax) and math.isfinite(vmin)):
        return 1.0
    dev = max(vmax - acc.mean, acc.mean - vmin)
    return acc.share(dev)


def _result(name: str, acc: ScaledMoments, share: float, lam: float | None = None) -> Any:
    return EstimatorResult(
        name, Moments(acc.n, acc.mean, acc.total_m2), share, lam, (acc.m2, acc.e)
    )


def _merge(
    names: list[str],
    values: dict[str, ScaledMoments],
    pair: Comoments,
    span: tuple[float, float],
) -> dict[str, EstimatorResult]:
    out: dict[str, EstimatorResult] = {}
    for name in names:
        if name == "k_opt":
            out[name] = _k_opt(pair, span)
            continue
        p = values[name]
        out[name] = _result(name, p, _share(p, p.vmax, p.vmin))
    return out


def _k_opt(pair: Comoments, span: tuple[float, float]) -> EstimatorResult:
    """k_opt's moments from the co-moments of (L, k3, r - 1) (:func:`klest.lab._scaled.
    kopt_values`), with λ̂ = Cov(L, r)/Var(r) fitted on all samples; ``span`` holds L's extremes.

    The values h(L) = λ̂·expm1(L) - L are a function of L alone, convex for λ̂ > 0 and monotone
    otherwise, so their largest value is h at the smallest or largest L, and their smallest is at
    least h(-log λ̂) (λ̂ > 0) or h at an end: ``max_share`` is exact on the maximum side and an
    upper bound on the other."""
    lam = pair.lam
    p = _scaled.kopt_values(pair, lam)
    if not (math.isfinite(p.mean) and math.isfinite(p.m2)):
        return _result("k_opt", p, 1.0, lam if math.isfinite(p.mean) else math.nan)

    def h(L: float) -> float:  # the core's k_opt value at one L (no overflow, no cancellation)
        with np.errstate(all="ignore"):
            return float(_k_lambda(_NPX, np.array([L]), lam)[0])

    l_min, l_max = span
    ends = (h(l_min), h(l_max))
    vmax, vmin = max(ends), min(ends)
    if lam > 0 and l_min < -math.log(lam) < l_max:
        vmin = h(-math.log(lam))
    return _result("k_opt", p, _share(p, vmax, vmin), lam)
