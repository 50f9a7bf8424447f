"""klest.rl.mismatch against the naive masked means of k1 and k3 in eager torch.

Target (issue 15): on [256, 4096] float32 CPU tokens, ``mismatch`` (every diagnostic: k1, k3,
forward KL, χ² and ESS in log space, sequence sums, standard errors, max, exact p99, fractions)
costs at most 3× the baseline, which computes only two numbers:

    L = train − rollout; k1 = Σ(−L·m)/Σm; k3 = Σ((e^L − 1 − L)·m)/Σm   (float32, eager)

Both run in one process, interleaved, median of the repeats; the ratio is printed with the
machine's CPU and SIMD level. Memory: the largest allocations of one ``mismatch`` call are read
from ``torch.profiler`` (``profile_memory=True``); the script prints how many allocations of at
least B·T·8 bytes (a [B, T] float64 array) it made — by design none for float32 input, since L is
processed in cache-sized float64 blocks.

Run: ``.venv/bin/python benchmarks/bench_mismatch.py`` (``--help`` for sizes and repeats).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
from _platform import describe

import klest
import klest.rl as rl


def naive(train: torch.Tensor, roll: torch.Tensor, maskf: torch.Tensor) -> tuple[float, float]:
    L = train - roll
    n = maskf.sum()
    k1 = ((-L) * maskf).sum() / n
    k3 = ((torch.exp(L) - 1 - L) * maskf).sum() / n
    return float(k1), float(k3)


def big_allocations(fn: Callable[[], object], threshold: int) -> tuple[int, int]:
    """(number of CPU allocations of at least ``threshold`` bytes, largest allocation)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # self allocations of each op (children are counted at their own level)
    selfs = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]
    return sum(s >= threshold for s in selfs), max(selfs, default=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, T = args.batch, args.seq
    g = torch.Generator().manual_seed(0)
    roll = -3 * torch.rand(B, T, generator=g)
    train = roll + 0.1 * torch.randn(B, T, generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    maskf = mask.float()

    variants: dict[str, Callable[[], object]] = {
        "naive k1 + k3 masked means (eager torch)": lambda: naive(train, roll, maskf),
        "klest mismatch (all keys, validation on)": lambda: rl.mismatch(train, roll, mask),
    }

    def no_validation() -> object:
        with klest.options(validate=False):
            return rl.mismatch(train, roll, mask)

    variants["klest mismatch (validation off)"] = no_validation
    for f in variants.values():  # warm up
        f()
    times: dict[str, list[float]] = {k: [] for k in variants}
    rng = random.Random(0)
    for _ in range(args.repeats):
        order = list(variants)
        rng.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            variants[k]()
            times[k].append(time.perf_counter() - t0)
    print(describe())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, torch CPU capability: "
        f"{torch.backends.cpu.get_cpu_capability()}"
    )
    print(
        f"[{B}, {T}] float32, {int(mask.sum())} valid tokens, median of {args.repeats} "
        "interleaved repeats"
    )
    base = statistics.median(times["naive k1 + k3 masked means (eager torch)"])
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"  {k:45s} {med * 1e3:8.2f} ms   {med / base:5.2f}x baseline")
    n64, largest = big_allocations(lambda: rl.mismatch(train, roll, mask), B * T * 8)
    print(
        f"mismatch: {n64} allocation(s) of >= B*T*8 bytes ({B * T * 8} B, a [B, T] float64 "
        f"array); largest allocation {largest} B ({largest / (B * T * 4):.2f}x a [B, T] float32)"
    )


if __name__ == "__main__":
    main()
