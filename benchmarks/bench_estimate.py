"""klest.estimate(..., estimator="k3") on 10⁸ float32 log-ratios against one bare np.exp pass.

The baseline is the irreducible work: one float32 `np.exp` pass over the same array, writing into
a preallocated buffer, timed in the same run (interleaved, medians of several repeats: this
machine is shared and noisy). `np.exp(L)` allocating its 400 MB result is printed too, but it is
no baseline: depending on the allocator's state it costs 50 to 700 ms (first-touch page faults).
Also reported: klest with one thread, and the peak extra memory klest allocates (tracemalloc),
which must not grow with n.

Usage: python benchmarks/bench_estimate.py [--n N] [--repeats R]
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc

import numpy as np

import klest


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        out.append(time.perf_counter() - start)
        del result
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10**8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    L = rng.standard_normal(args.n, dtype=np.float32)
    L *= np.float32(0.5)  # q = N(0,1), p = N(0.5,1): L = 0.5x - 0.125, KL = 0.125
    L -= np.float32(0.125)
    buf = np.empty_like(L)
    threads = klest.get_options().threads

    runs: dict[str, list[float]] = {
        "np.exp(L)": [],
        "np.exp(L, out=buf)": [],
        f"klest k3, {threads} threads": [],
        "klest k3, 1 thread": [],
    }
    for _ in range(args.repeats):  # interleave so that noise hits every contender alike
        runs["np.exp(L)"] += timed(lambda: np.exp(L), 1)
        runs["np.exp(L, out=buf)"] += timed(lambda: np.exp(L, out=buf), 1)
        runs[f"klest k3, {threads} threads"] += timed(
            lambda: klest.estimate(log_ratio=L, estimator="k3"), 1
        )
        with klest.options(threads=1):
            runs["klest k3, 1 thread"] += timed(
                lambda: klest.estimate(log_ratio=L, estimator="k3"), 1
            )

    base = statistics.median(runs["np.exp(L, out=buf)"])
    print(f"n = {args.n:,} float32 log-ratios, {args.repeats} repeats, medians")
    for name, ts in runs.items():
        med = statistics.median(ts)
        print(f"  {name:28s} {med * 1e3:8.1f} ms   ratio to np.exp(L, out=buf): {med / base:5.2f}")

    tracemalloc.start()
    r = klest.estimate(log_ratio=L, estimator="k3")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"  klest peak extra memory: {peak / 2**20:.1f} MiB (input: {L.nbytes / 2**20:.0f} MiB)")
    print(f"  k3 mean {float(r.mean):.6f} ± {float(r.stderr):.6f} (true 0.125), n = {r.n:,}")
    ratio = statistics.median(runs[f"klest k3, {threads} threads"]) / base
    print(f"RATIO klest.estimate(k3) / np.exp(L, out=buf) = {ratio:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
