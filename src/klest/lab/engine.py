r"""The streaming Monte Carlo engine: draw from q, evaluate estimators, reduce, in constant memory.

The n samples are cut into fixed blocks of :data:`BLOCK` samples; block ``i`` draws from its own
NumPy stream ``SeedSequence(seed, spawn_key=(0, i))``, in chunks of :data:`CHUNK` samples that stay
in cache. Each chunk's per-sample values are reduced to float64 moments (mean and centred sum of
squares, two passes over the cached chunk) plus their maximum and minimum; chunks and blocks are
merged in order with Chan's formula (:meth:`klest.Moments.combine`). Blocks run on worker threads
(NumPy releases the GIL inside ufuncs), and because the blocks, their streams and the merge order
do not depend on the number of workers, a given seed gives bit-identical results whatever
``workers`` is. Memory is a few chunk buffers per worker, whatever n.

Per-sample values come from the core (:func:`klest.stats.per_sample`), except for k1, k2, k3 and
forward_k3, whose float64 values are computed from one shared ``expm1(L)`` per chunk:
``k3 = expm1(L) - L`` and ``forward_k3 = L·(expm1(L) + 1) - expm1(L)``. Near L = 0 these lose
relative accuracy (absolute error ≈ 2⁻⁵²·|L|, so the relative error of a value L²/2 is ≈ 2⁻⁵¹/|L|),
but the error in a mean of such values is below 1e-16 absolute, far under any Monte Carlo
standard error; the tests check both against the core's functions. The core's series near 0 exists
for per-sample accuracy in low precision and for gradients, which a float64 mean does not need.

The optimal-λ estimator -L + λ̂(r - 1), with λ̂ = Cov(L, r)/Var(r) fitted on all n samples (the
core's ``k_opt``), is reduced exactly from the streamed moments of k1 = -L, e = expm1(L) and
k3 = e - L: Cov(L, e) = (Var L + Var e - Var k3)/2.

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
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

import klest
from klest import KlestError, Moments

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

CHUNK = 1 << 14  # samples per chunk: each float64 buffer is 128 KiB, in L2 cache
BLOCK = 1 << 20  # samples per block: the unit of parallel work and of random streams
MAX_SHARE_LIMIT = 0.1  # one sample carrying >= 10 % of the sum of squares: stdev unreliable


def max_share_limit(n: float) -> float:
    """The flagging threshold for the largest squared deviation's share at sample size n."""
    return max(MAX_SHARE_LIMIT, 10.0 * math.log(max(n, 2.0)) / max(n, 1.0))


_FAST = ("k1", "k2", "k3", "forward_k3", "k_opt", "_e")


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
    """Two worker threads where there are two cores or more."""
    return max(1, min(2, os.cpu_count() or 1))


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

        def normal_pair(rng: np.random.Generator, k: int) -> list[np.ndarray]:
            z = rng.standard_normal(k)
            out = []
            for A, B, C in coefs:
                L = z * B if A == 0.0 else (z * A + B) * z
                L += C
                out.append(L)
            return out

        return normal_pair

    def generic(rng: np.random.Generator, k: int) -> list[np.ndarray]:
        x = q.sample(rng, k)
        with np.errstate(all="ignore"):
            lq = np.asarray(q.logpdf(x), dtype=np.float64)
            return [np.asarray(p.logpdf(x), dtype=np.float64) - lq for p in ps]

    return generic


# ------------------------------------------------------------------------- per-sample values
def _core_fn(name: str) -> Callable[[np.ndarray], np.ndarray]:
    import array_api_compat.numpy as npx

    from klest.stats import per_sample

    _, fn = per_sample(name)

    def values(L: np.ndarray) -> np.ndarray:
        with klest.options(validate=False):
            return np.asarray(fn(npx, L), dtype=np.float64)

    return values


# name -> (base array it is an affine image of, scale): k1 = -L and k2 = ½·L² are reduced
# through the moments of L and L², saving a pass each.
_AFFINE: dict[str, tuple[str, float]] = {
    "k1": ("L", -1.0),
    "k2": ("L2", 0.5),
    "k3": ("k3", 1.0),
    "forward_k3": ("forward_k3", 1.0),
    "_e": ("_e", 1.0),
}


class _Evaluator:
    """Per-chunk arrays whose moments give every requested estimator's moments."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.bases = list(
            dict.fromkeys(_AFFINE.get(n, (n, 1.0))[0] for n in self.names if n != "k_opt")
        )
        self.core = {n: _core_fn(n) for n in self.bases if n not in _FAST and n not in ("L", "L2")}
        self.need_e = any(b in ("k3", "forward_k3", "_e") for b in self.bases)

    def __call__(self, L: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        e = np.expm1(L) if self.need_e else None
        for name in self.bases:
            if name == "L":
                out[name] = L
            elif name == "L2":
                out[name] = np.square(L)
            elif name == "k3":
                assert e is not None
                out[name] = e - L
            elif name == "forward_k3":
                assert e is not None
                if np.minimum.reduce(L) == -np.inf:  # r = 0: the core's limit value 1, not 0·inf
                    out[name] = _core_fn(name)(L)
                    continue
                v = e + 1.0
                v *= L
                v -= e
                out[name] = v
            elif name == "_e":
                assert e is not None
                out[name] = e
            else:
                out[name] = self.core[name](L)
        return out


# ------------------------------------------------------------------------------ one block
@dataclass
class _BlockResult:
    """Per-chunk moments of one block, for one target p."""

    ns: np.ndarray  # (chunks,)
    means: dict[str, np.ndarray]
    m2s: dict[str, np.ndarray]
    vmax: dict[str, float]
    vmin: dict[str, float]


def _run_block(
    sampler: LogRatioSampler,
    evaluator: _Evaluator,
    n_targets: int,
    seed: int,
    index: int,
    size: int,
    chunk: int,
) -> list[_BlockResult]:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, index)))
    count = -(-size // chunk)
    bases = evaluator.bases
    ns = np.zeros(count)
    out = [
        _BlockResult(
            ns,
            {n: np.zeros(count) for n in bases},
            {n: np.zeros(count) for n in bases},
            dict.fromkeys(bases, -math.inf),
            dict.fromkeys(bases, math.inf),
        )
        for _ in range(n_targets)
    ]
    tmp = np.empty(min(chunk, size))
    done = 0
    i = 0
    with np.errstate(all="ignore"):
        while done < size:
            k = min(chunk, size - done)
            Ls = sampler(rng, k)
            ns[i] = k
            d = tmp[:k]
            for j, L in enumerate(Ls):
                res = out[j]
                for name, v in evaluator(L).items():
                    mean = float(np.add.reduce(v)) / k
                    hi = float(np.maximum.reduce(v))
                    lo = float(np.minimum.reduce(v))
                    if hi > res.vmax[name]:
                        res.vmax[name] = hi
                    if lo < res.vmin[name]:
                        res.vmin[name] = lo
                    np.subtract(v, mean, out=d)
                    res.means[name][i] = mean
                    # einsum, not np.dot: BLAS threads would fight the workers
                    res.m2s[name][i] = float(np.einsum("i,i->", d, d))
            done += k
            i += 1
    return out


# ------------------------------------------------------------------------------- the run
def run(
    q: Any,
    p: Any,
    estimators: Iterable[str],
    n: int,
    seed: int = 0,
    *,
    workers: int | None = None,
    chunk: int = CHUNK,
    block: int = BLOCK,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, EstimatorResult]:
    """Draw n samples from q and return each estimator's streamed statistics against p.

    ``estimators``: names from :func:`klest.estimator_names` (``k_opt_crossfit`` is not offered:
    the streamed ``k_opt`` fits λ̂ on all samples, with O(1/n) bias). ``progress(done, n)`` is
    called from the calling thread after each block. The result does not depend on ``workers``.

    >>> res = run("normal(0, 1)", "normal(1, 1)", ["k1", "k3"], n=200_000, seed=1)
    >>> round(res["k3"].mean, 2), res["k3"].reliable
    (0.5, True)
    """
    return run_many(
        q, [p], estimators, n, seed, workers=workers, chunk=chunk, block=block, progress=progress
    )[0]


def run_many(
    q: Any,
    ps: Sequence[Any],
    estimators: Iterable[str],
    n: int,
    seed: int = 0,
    *,
    workers: int | None = None,
    chunk: int = CHUNK,
    block: int = BLOCK,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, EstimatorResult]]:
    """:func:`run` for several targets p_1, ..., p_m at once, on the same n draws from q.

    Drawing is usually the dominant cost, and one set of draws serves every target (common random
    numbers: each target's estimate is exactly what :func:`run` returns for it with this seed).
    """
    q = D.as_distribution(q)
    targets = [D.as_distribution(p) for p in ps]
    names = list(dict.fromkeys(estimators))
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n <= 0:
        raise KlestError(f"n must be a positive integer, got {n!r}", argument="n")
    n = int(n)
    _check_names(names)
    for p in targets:
        if q.dim != p.dim:
            raise KlestError(f"q has dimension {q.dim} but p has dimension {p.dim}", argument="p")
    if chunk <= 0 or block <= 0 or block % chunk:
        raise KlestError("block must be a positive multiple of chunk", argument="block")
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise KlestError(f"workers must be >= 1, got {workers}", argument="workers")
    if any(isinstance(d, D.TorchDistribution) for d in (q, *targets)):
        workers = 1  # torch.distributions sample from torch's global generator

    internal = list(names)
    if "k_opt" in names:
        internal += [x for x in ("k1", "k3", "_e") if x not in internal]
    sampler = log_ratio_sampler(q, targets)
    evaluator = _Evaluator(internal)

    sizes = [min(block, n - s) for s in range(0, n, block)]
    accs = [_Accumulator(evaluator.bases) for _ in targets]
    done = 0

    def fold(res: list[_BlockResult]) -> None:
        for acc, r in zip(accs, res, strict=True):
            acc.fold(r)

    def task(i: int) -> list[_BlockResult]:
        return _run_block(sampler, evaluator, len(targets), seed, i, sizes[i], chunk)

    if workers == 1 or len(sizes) == 1:
        for i in range(len(sizes)):
            fold(task(i))
            done += sizes[i]
            if progress is not None:
                progress(done, n)
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="klest-lab") as pool:
            pending: list[Future[list[_BlockResult]]] = []
            nxt = 0
            try:
                while nxt < len(sizes) or pending:
                    while nxt < len(sizes) and len(pending) < 2 * workers:
                        pending.append(pool.submit(task, nxt))
                        nxt += 1
                    res = pending.pop(0).result()
                    fold(res)
                    done += int(res[0].ns.sum())
                    if progress is not None:
                        progress(done, n)
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
    return [_merge(names, acc) for acc in accs]


def _check_names(names: list[str]) -> None:
    known = set(klest.estimator_names())
    for name in names:
        if name == "k_opt_crossfit":
            raise KlestError(
                "k_opt_crossfit is not streamed; use k_opt (λ̂ fitted on all samples)",
                argument="estimators",
            )
        if name.startswith("alpha:"):
            klest.get_divergence(name)
        elif name not in known:
            raise KlestError(
                f"unknown estimator {name!r}; known: {', '.join(sorted(known))} or alpha:<a>",
                argument="estimators",
            )


class _Accumulator:
    """Running per-base moments and extremes of one target, folded block by block in order.

    Memory is constant in n; the fold order is the block order, so the result does not depend
    on the number of workers. Chunks with infinite values (log p = -inf somewhere) or NaN are
    counted and remembered by sign, not merged.
    """

    def __init__(self, bases: Sequence[str]) -> None:
        self.mom = {b: Moments() for b in bases}
        self.n = 0.0
        self.vmax = dict.fromkeys(bases, -math.inf)
        self.vmin = dict.fromkeys(bases, math.inf)
        self.pos_inf = dict.fromkeys(bases, False)
        self.neg_inf = dict.fromkeys(bases, False)
        self.nan = dict.fromkeys(bases, False)

    def fold(self, r: _BlockResult) -> None:
        self.n += float(r.ns.sum())
        for b in self.mom:
            means, m2s = r.means[b], r.m2s[b]
            ok = np.isfinite(means) & np.isfinite(m2s)
            if not np.all(ok):
                self.pos_inf[b] |= bool(np.any(means == np.inf))
                self.neg_inf[b] |= bool(np.any(means == -np.inf))
                self.nan[b] |= bool(np.any(np.isnan(means) | (np.isnan(m2s) & np.isfinite(means))))
            self.mom[b] = self.mom[b].merge(Moments.combine(r.ns[ok], means[ok], m2s[ok]))
            self.vmax[b] = max(self.vmax[b], r.vmax[b])
            self.vmin[b] = min(self.vmin[b], r.vmin[b])

    def moments(self, name: str) -> Moments:
        base, scale = _AFFINE.get(name, (name, 1.0))
        pos, neg = self.pos_inf[base], self.neg_inf[base]
        if self.nan[base] or (pos and neg):
            return Moments(self.n, math.nan, math.nan)
        if pos or neg:
            sign = (1.0 if pos else -1.0) * (1.0 if scale > 0 else -1.0)
            return Moments(self.n, sign * math.inf, math.inf)
        m = self.mom[base]
        return Moments(m.n, m.mean * scale, m.m2 * scale * scale)

    def extremes(self, name: str) -> tuple[float, float]:
        base, scale = _AFFINE.get(name, (name, 1.0))
        hi, lo = self.vmax[base] * scale, self.vmin[base] * scale
        return (hi, lo) if scale > 0 else (lo, hi)


def _share(mom: Moments, vmax: float, vmin: float) -> float:
    if not (math.isfinite(mom.m2) and math.isfinite(vmax) and math.isfinite(vmin)):
        return 1.0
    if mom.m2 <= 0:
        return 0.0
    dev = max(vmax - mom.mean, mom.mean - vmin)
    return min(1.0, dev * dev / mom.m2)


def _merge(names: list[str], acc: _Accumulator) -> dict[str, EstimatorResult]:
    out: dict[str, EstimatorResult] = {}
    for name in names:
        if name == "k_opt":
            out[name] = _k_opt(acc)
            continue
        vmax, vmin = acc.extremes(name)
        mom = acc.moments(name)
        out[name] = EstimatorResult(name, mom, _share(mom, vmax, vmin))
    return out


def _k_opt(acc: _Accumulator) -> EstimatorResult:
    """Moments of -L + λ̂ e with λ̂ = Cov(L, e)/Var(e), from the moments of -L, e and e - L.

    Its values h(L) = λ̂·expm1(L) - L are a function of L alone, convex for λ̂ > 0 and monotone
    otherwise, so their largest value over the samples is h at the smallest or largest L (both
    tracked), and their smallest is at least h(-log λ̂) (λ̂ > 0) or h at an end: ``max_share``
    is exact on the maximum side and an upper bound on the other."""
    k1 = acc.moments("k1")
    e = acc.moments("_e")
    k3 = acc.moments("k3")
    n = k1.n
    if not all(math.isfinite(m.m2) for m in (k1, e, k3)):
        mom = Moments(n, math.nan, math.nan)
        return EstimatorResult("k_opt", mom, 1.0, math.nan)
    # sums of centred products over all samples: S_LL, S_ee, S_Le (L = -k1)
    s_ll, s_ee = k1.m2, e.m2
    s_le = 0.5 * (s_ll + s_ee - k3.m2)
    lam = s_le / s_ee if s_ee > 0 else 1.0
    mean = k1.mean + lam * e.mean
    m2 = max(s_ll - 2 * lam * s_le + lam * lam * s_ee, 0.0)
    mom = Moments(n, mean, m2)

    def h(L: float) -> float:
        try:
            return lam * math.expm1(L) - L
        except OverflowError:
            return math.copysign(math.inf, lam)

    l_min, l_max = acc.vmin["L"], acc.vmax["L"]
    ends = (h(l_min), h(l_max))
    vmax, vmin = max(ends), min(ends)
    if lam > 0 and l_min < -math.log(lam) < l_max:
        vmin = h(-math.log(lam))
    return EstimatorResult("k_opt", mom, _share(mom, vmax, vmin), lam)
