r"""The streaming Monte Carlo engine: draw from q, evaluate estimators, reduce, in constant memory.

The n samples are cut into fixed blocks of :data:`BLOCK` samples; block ``i`` draws from its own
NumPy stream ``SeedSequence(seed, spawn_key=(0, i))``, in chunks of :data:`CHUNK` samples that stay
in cache. Each chunk's per-sample values are reduced to float64 moments (mean and centred sum of
squares, two passes over the cached chunk) plus their maximum and minimum; chunks and blocks are
merged in order with Chan's formula (:meth:`klest.Moments.combine`). Blocks run on worker threads
(NumPy releases the GIL inside ufuncs), and because the blocks, their streams and the merge order
do not depend on the number of workers, a given seed gives bit-identical results whatever
``workers`` is. Memory is a few chunk buffers per worker, whatever n.

Per-sample values come from the estimator table (:mod:`klest.table`: the same functions as
:func:`klest.estimate`), or from its compiled kernels when ``klest[fast]`` is installed; chunks
are reduced and merged by the streaming engine (:mod:`klest._stream`). When q and every p are
normal and every requested estimator has a kernel, a fused loop (``klest._fast.quadratic_moments``)
forms L = A z² + B z + C on the fly from the standard normal draws z.

The optimal-λ estimator -L + λ̂(r - 1), with λ̂ = Cov(L, r)/Var(r) fitted on all n samples (the
core's ``k_opt``), is reduced exactly from the streamed co-moments of (L, k3, e = expm1(L))
merged with Chan's formula (:func:`klest._stream.kopt_values`), as :func:`klest.estimate` does.

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

import math
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from klest import KlestError, Moments, _stream
from klest._config import claim_fast, fast_wanted, get_options, options
from klest._numerics import LAB_SERIES_RADIUS, numpy_values
from klest.estimators import _k_lambda
from klest.table import Estimator, fast_kernel, get_estimator, numpy_kind

from . import distributions as D

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
    """Streamed statistics of one estimator's per-sample values."""

    name: str
    moments: Moments
    max_share: float
    lam: float | None = None  # λ̂ for k_opt

    @property
    def n(self) -> int:
        return int(self.moments.n)

    @property
    def mean(self) -> float:
        return self.moments.mean

    @property
    def std(self) -> float:
        return self.moments.std(1)

    @property
    def stderr(self) -> float:
        return self.moments.stderr(1)

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
    pair: bool  # whether k_opt's pair moments of (L, expm1(L)) are wanted
    seed: int
    sizes: tuple[int, ...]
    chunk: int
    fused: bool = False  # normal q and p, every name kernelled: klest._fast.quadratic_moments
    records: tuple[Estimator, ...] = field(default=(), compare=False)
    kernels: tuple[Any, ...] = field(default=(), compare=False)  # chosen in the caller's context


@dataclass(frozen=True)
class BlockResult:
    """One block's moments, per target j: ``values[j][name]``, and for k_opt the pair moments
    ``pairs[j]`` of (L, expm1(L)) over L > -inf and ``spans[j]`` (count and extremes of L)."""

    n: int
    values: tuple[dict[str, _stream.Partial], ...]
    pairs: tuple[_stream.KoptPartial, ...]
    spans: tuple[_stream.Partial, ...]


def _coefficients(plan: _Plan) -> np.ndarray:
    return np.array([_normal_coefficients(plan.q, p) for p in plan.targets])  # type: ignore[arg-type]


def run_block(plan: _Plan, index: int) -> BlockResult:
    """Draw block ``index`` from its own stream ``SeedSequence(seed, spawn_key=(0, index))`` and
    reduce every estimator on every target, chunk by chunk (merged in order)."""
    rng = np.random.default_rng(np.random.SeedSequence(plan.seed, spawn_key=(0, index)))
    size = plan.sizes[index]
    records = plan.records or tuple(get_estimator(n) for n in plan.names)
    kernels = plan.kernels or (None,) * len(records)
    sampler = log_ratio_sampler(plan.q, plan.targets)
    m = len(plan.targets)
    values = [{name: _stream.Partial() for name in plan.names} for _ in range(m)]
    pairs = [_stream.KoptPartial() for _ in range(m)]
    kinds = tuple(numpy_kind(r) for r in records)
    vbuf = np.empty(plan.chunk)

    def lab_values(rec: Estimator, kind: str | None, L: np.ndarray) -> np.ndarray:
        """The record's values on L (float64), to LAB_RTOL relative for the series kinds."""
        if kind is None or L.dtype != np.float64 or L.ndim != 1:
            v = np.asarray(rec.values(_NPX, L), dtype=np.float64).reshape(-1)
            # chunk_moments overwrites its input: copy only values that share L's memory
            return v.copy() if np.may_share_memory(v, L) else v
        return numpy_values(kind, L, vbuf[: L.size], radius=LAB_SERIES_RADIUS)

    k3_record = get_estimator("k3")

    def k3(L: np.ndarray) -> np.ndarray:
        return lab_values(k3_record, "expm1mx", L.reshape(-1)).reshape(L.shape)

    spans = [_stream.Partial() for _ in range(m)]
    coefs = _coefficients(plan) if plan.fused else None
    done = 0
    z_buf = np.empty(min(plan.chunk, size)) if coefs is not None else None
    with np.errstate(all="ignore"), options(validate=False):
        while done < size:
            k = min(plan.chunk, size - done)
            if z_buf is not None and coefs is not None:
                from klest import _fast

                z = z_buf[:k]  # drawn into one reused buffer: the same stream, no page faults
                rng.standard_normal(out=z)
                fused = _fast.quadratic_moments(z, coefs, plan.names)
                for j in range(m):
                    for i, name in enumerate(plan.names):
                        mean, m2, lo, hi = (float(x) for x in fused[j, i])
                        values[j][name] = values[j][name].merge(
                            _stream.Partial(float(k), mean, m2, lo, hi)
                        )
                Ls = [(z * A + B) * z + C for A, B, C in coefs] if plan.pair else []
            else:
                Ls = sampler(rng, k)
                for j, L in enumerate(Ls):
                    for name, rec, kind, kernel in zip(
                        plan.names, records, kinds, kernels, strict=True
                    ):
                        if kernel is not None and kernel not in _stream.NUMPY_KERNELS:
                            mean, m2, lo, hi = kernel(L)
                            part = _stream.Partial(float(k), mean, m2, lo, hi)
                        else:  # chunk_moments overwrites the values: vbuf or a fresh array
                            part = _stream.chunk_moments(lab_values(rec, kind, L))
                        values[j][name] = values[j][name].merge(part)
            if plan.pair:
                for j, L in enumerate(Ls):
                    lo, hi = float(np.minimum.reduce(L)), float(np.maximum.reduce(L))
                    spans[j] = spans[j].merge(_stream.Partial(float(k), 0.0, 0.0, lo, hi))
                    (p,) = _stream.kopt_moments(L.reshape(1, -1), None, k3)
                    pairs[j] = pairs[j].merge(p)
            done += k
    return BlockResult(size, tuple(values), tuple(pairs), tuple(spans))


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
    q = D.as_distribution(q)
    targets = [D.as_distribution(p) for p in ps]
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
    use_fast = claim_fast(n * len(targets) * max(len(per_sample), 1))  # "auto": klest.options
    with options(fast=use_fast):
        plan = _Plan(  # klest.options; the kernels are chosen here, in the caller's context
            q,
            tuple(targets),
            per_sample,
            "k_opt" in names,
            int(seed),
            tuple(min(block, n - s) for s in range(0, n, block)),
            chunk,
            fused=_fusable(q, targets, recs),
            records=recs,
            kernels=tuple(fast_kernel(r) for r in recs),
        )
    done = 0

    def report(i: int, res: BlockResult) -> None:
        nonlocal done
        done += res.n
        if progress is not None:
            progress(done, n)

    task: Callable[[int], BlockResult] = lambda i: run_block(plan, i)  # noqa: E731
    if executor is not None:
        from ._executors import block_task, executor_width

        with options(fast=use_fast):
            task, workers = block_task(plan, executor), executor_width(executor, workers)
    results = _stream.ordered_map(task, range(len(plan.sizes)), workers, report, executor)
    out = []
    for j in range(len(targets)):
        values = {name: _stream.finish([r.values[j][name] for r in results]) for name in per_sample}
        pair, span = _stream.KoptPartial(), _stream.Partial()
        for r in results:
            pair = pair.merge(r.pairs[j])
            span = span.merge(r.spans[j])
        out.append(_merge(names, values, pair, span))
    return out


def _fusable(q: D.Distribution, targets: Sequence[D.Distribution], recs: Sequence[Any]) -> bool:
    if not recs or type(q) is not D.Normal or any(type(p) is not D.Normal for p in targets):
        return False
    if any(fast_kernel(r) is None for r in recs) or not fast_wanted():
        return False
    try:
        from klest import _fast
    except ImportError:  # pragma: no cover
        return False
    return bool(_fast.available()) and all(r.name in _fast.KERNELS for r in recs)


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


def _share(mom: Moments, vmax: float, vmin: float) -> float:
    if not (math.isfinite(mom.m2) and math.isfinite(vmax) and math.isfinite(vmin)):
        return 1.0
    if mom.m2 <= 0:
        return 0.0
    dev = max(vmax - mom.mean, mom.mean - vmin)
    return min(1.0, dev * dev / mom.m2)


def _merge(
    names: list[str],
    values: dict[str, _stream.Partial],
    pair: _stream.KoptPartial,
    span: _stream.Partial,
) -> dict[str, EstimatorResult]:
    out: dict[str, EstimatorResult] = {}
    for name in names:
        if name == "k_opt":
            out[name] = _k_opt(pair, span)
            continue
        p = values[name]
        mom = Moments(p.n, p.mean, p.m2)
        out[name] = EstimatorResult(name, mom, _share(mom, p.vmax, p.vmin))
    return out


def _k_opt(pair: _stream.KoptPartial, span: _stream.Partial) -> EstimatorResult:
    """k_opt's moments from the co-moments of (L, k3, r - 1) (:func:`klest._stream.kopt_values`),
    with λ̂ = Cov(L, r)/Var(r) fitted on all samples; ``span`` holds L's extremes.

    The values h(L) = λ̂·expm1(L) - L are a function of L alone, convex for λ̂ > 0 and monotone
    otherwise, so their largest value is h at the smallest or largest L, and their smallest is at
    least h(-log λ̂) (λ̂ > 0) or h at an end: ``max_share`` is exact on the maximum side and an
    upper bound on the other."""
    lam = pair.lam
    p = _stream.kopt_values(pair, lam)
    mom = Moments(p.n, p.mean, p.m2)
    if not (math.isfinite(p.mean) and math.isfinite(p.m2)):
        return EstimatorResult("k_opt", mom, 1.0, lam if math.isfinite(p.mean) else math.nan)

    def h(L: float) -> float:  # the core's k_opt value at one L (no overflow, no cancellation)
        with np.errstate(all="ignore"):
            return float(_k_lambda(_NPX, np.array([L]), lam)[0])

    l_min, l_max = span.vmin, span.vmax
    ends = (h(l_min), h(l_max))
    vmax, vmin = max(ends), min(ends)
    if lam > 0 and l_min < -math.log(lam) < l_max:
        vmin = h(-math.log(lam))
    return EstimatorResult("k_opt", mom, _share(mom, vmax, vmin), lam)
