"""klest.estimate(..., estimator="k3") on 10⁸ float32 log-ratios against one bare np.exp pass.

The baseline is the irreducible work: one float32 `np.exp` pass over the same array, writing into
a preallocated buffer, timed in the same run (interleaved, medians of several repeats: this
machine is shared and noisy). `np.exp(L)` allocating its 400 MB result is printed too, but it is
no baseline: depending on the allocator's state it costs 50 to 700 ms (first-touch page faults).
Also reported: klest with one thread, klest with its compiled kernels switched off (pure NumPy,
``klest.options(fast=False)``; targets: <= 1.5x with klest[fast], <= 3x without), the CPU and
NumPy's SIMD kernels, and the peak extra memory klest allocates (tracemalloc), which must not grow
with n.

Usage: python benchmarks/bench_estimate.py [--n N] [--repeats R] [--write-docs]
(``--write-docs``: this run's table into the README's ``bench:estimate`` block.)
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import tracemalloc

import numpy as np
from _docs import add_write_docs_flag, markdown_table, write_block
from _platform import describe

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
    add_write_docs_flag(parser)
    args = parser.parse_args()

    print(describe())  # CPU, NumPy's SIMD kernels (np.show_config), klest[fast]
    klest.set_options(fast=True)  # compiled kernels when installed (not "auto": this is a 1e8 job)
    rng = np.random.default_rng(0)
    L = rng.standard_normal(args.n, dtype=np.float32)
    L *= np.float32(0.5)  # q = N(0,1), p = N(0.5,1): L = 0.5x - 0.125, KL = 0.125
    L -= np.float32(0.125)
    side = math.isqrt(args.n)
    square = L[: side * side].reshape(side, side)
    buf = np.empty_like(L)
    threads = klest.get_options().threads

    def numpy_path(fn):
        def run():
            with klest.options(fast=False):
                return fn()

        return run

    contenders = {
        "np.exp(L)": lambda: np.exp(L),
        "np.exp(L, out=buf)": lambda: np.exp(L, out=buf),
        f"klest k3, {threads} threads": lambda: klest.estimate(log_ratio=L, estimator="k3"),
        "klest k3, 1 thread": lambda: _one_thread(lambda: klest.estimate(log_ratio=L)),
        "klest k3, NumPy path": numpy_path(lambda: klest.estimate(log_ratio=L)),
        "klest k_opt": lambda: klest.estimate(log_ratio=L, estimator="k_opt"),
        f"klest k3 axis=0 [{side}, {side}]": lambda: klest.estimate(log_ratio=square, axis=0),
        "klest k3 axis=0, NumPy path": numpy_path(lambda: klest.estimate(log_ratio=square, axis=0)),
    }
    runs: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):  # interleave so that noise hits every contender alike
        for name, fn in contenders.items():
            runs[name] += timed(fn, 1)

    base = statistics.median(runs["np.exp(L, out=buf)"])
    print(f"n = {args.n:,} float32 log-ratios, {args.repeats} repeats, medians")
    for name, ts in runs.items():
        med = statistics.median(ts)
        print(f"  {name:34s} {med * 1e3:8.1f} ms   ratio to np.exp(L, out=buf): {med / base:5.2f}")

    peaks: dict[str, float] = {}
    for name, call in (
        ("k3", lambda: klest.estimate(log_ratio=L, estimator="k3")),
        ("k3, NumPy path", numpy_path(lambda: klest.estimate(log_ratio=L))),
        ("k_opt", lambda: klest.estimate(log_ratio=L, estimator="k_opt")),
        ("k3 axis=0", lambda: klest.estimate(log_ratio=square, axis=0)),
    ):
        tracemalloc.start()
        call()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        peaks[name] = peak / 2**20
        print(
            f"  klest {name:16s} peak extra memory: {peak / 2**20:6.1f} MiB "
            f"(input: {L.nbytes / 2**20:.0f} MiB)"
        )
    r = klest.estimate(log_ratio=L, estimator="k3")
    print(f"  k3 mean {float(r.mean):.6f} ± {float(r.stderr):.6f} (true 0.125), n = {r.n:,}")
    k3 = statistics.median(runs[f"klest k3, {threads} threads"])
    print(f"RATIO klest.estimate(k3) / np.exp(L, out=buf) = {k3 / base:.2f} (target <= 1.5)")
    numpy_k3 = statistics.median(runs["klest k3, NumPy path"])
    print(f"RATIO NumPy path k3 / np.exp(L, out=buf) = {numpy_k3 / base:.2f} (target <= 3)")
    k_opt = statistics.median(runs["klest k_opt"])
    print(f"RATIO klest.estimate(k_opt) / estimate(k3) = {k_opt / k3:.2f} (target <= 2)")
    axis0 = statistics.median(runs[f"klest k3 axis=0 [{side}, {side}]"])
    print(f"RATIO klest.estimate(axis=0) / estimate(k3) = {axis0 / k3:.2f} (target <= 2)")
    if args.write_docs:
        one = statistics.median(runs["klest k3, 1 thread"])
        ms = lambda t: f"{t * 1e3:.0f} ms"  # noqa: E731
        exp = math.log10(args.n)
        sup = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
        size = "10" + str(int(exp)).translate(sup) if exp.is_integer() else f"{args.n:,}"
        rows = [
            [f"`estimate(k3)` mean+stdev of {size} float32, `klest[fast]`",
             f"{ms(k3)} ({threads} threads), {ms(one)} (1)",
             f"one `np.exp(L, out=buf)` pass, {ms(base)}",
             f"**{k3 / base:.2f}×** (1 thread {one / base:.2f}×)", "≤ 1.5×"],
            ["same, pure NumPy path (`KLEST_FAST=0`)", ms(numpy_k3), "same",
             f"{numpy_k3 / base:.2f}×", "≤ 3×"],
            ["same, `estimate(k_opt)`", ms(k_opt), "`estimate(k3)`", f"**{k_opt / k3:.2f}×**",
             "≤ 2×"],
            [f"same, `estimate(k3, axis=0)` on [{side}, {side}]", ms(axis0), "`estimate(k3)`",
             f"**{axis0 / k3:.2f}×**", "≤ 2×"],
            ["same, peak extra memory",
             f"{peaks['k3']:.1f} MiB (k3), {peaks['k_opt']:.1f} (k_opt), "
             f"{peaks['k3 axis=0']:.1f} (axis=0), {peaks['k3, NumPy path']:.1f} (NumPy path)",
             f"input {L.nbytes / 2**20:.0f} MiB", "", "≤ 4 MiB"],
        ]  # fmt: skip
        header = ["benchmark", "klest", "baseline, same run", "ratio", "target"]
        write_block("estimate", markdown_table(header, rows))


def _one_thread(fn):
    with klest.options(threads=1):
        return fn()


if __name__ == "__main__":
    main()
