"""The lab against the seed's way of running its experiment (eager PyTorch, whole arrays).

Work: q = N(0, 1), p = N(0.1, 1) and N(1, 1), 10**7 samples each, k1/k2/k3 bias/true and
stdev/true. The baseline is ../shared/bench/seed_snippet.py (relative to the repository), run as
written in a subprocess; its own ``seconds:`` line times its computation alone (torch imported).
klest's side is timed in this process around the same computation (engine only, imports done).

Prints:
  * the CPU, NumPy's SIMD kernels and whether klest[fast] (numba) is installed;
  * compute time, median of --repeats interleaved rounds (each round runs every contender once,
    so that load on a shared machine hits all alike): klest with its compiled kernels (one set of
    draws from q serves both shifts, as ``klest reproduce`` does), the same with the kernels off
    (pure NumPy, ``klest.options(fast=False)``), klest with independent draws per shift, the
    snippet, and the ratios against the targets (>= 8x with klest[fast], >= 5x without);
  * peak resident memory (ru_maxrss of a fresh child) of ``python -m klest reproduce`` and of
    the snippet, and their ratio (target <= 1/4).
  * with --huge N: time and peak memory of ``klest compare`` at N samples (e.g. 1e9).

Usage: python benchmarks/bench_lab.py [--repeats 5] [--n 10000000] [--huge 1e9]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNIPPET = REPO.parent / "shared" / "bench" / "seed_snippet.py"
SHIFTS = ("normal(0.1, 1)", "normal(1, 1)")
ESTIMATORS = ["k1", "k2", "k3"]


def klest_seconds(n: int, seed: int, *, shared: bool, fast: bool = True) -> float:
    import klest
    from klest.lab.engine import run, run_many

    with klest.options(fast=fast):
        start = time.perf_counter()
        if shared:
            run_many("normal(0, 1)", list(SHIFTS), ESTIMATORS, n, seed)
        else:
            for p in SHIFTS:
                run("normal(0, 1)", p, ESTIMATORS, n, seed)
        return time.perf_counter() - start


def snippet_seconds(n: int, seed: int) -> float:
    out = subprocess.run(
        [sys.executable, str(SNIPPET), "--n", str(n), "--seed", str(seed)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"^seconds:\s*([0-9.eE+-]+)", out, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no 'seconds:' line in the snippet's output:\n{out}")
    return float(match.group(1))


_PEAK = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); "
    "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t, "
    "r.returncode)"
)


def peak_rss_mib(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Peak resident memory (MiB) and wall seconds of ``cmd``, run as the only child of a fresh
    helper process (so that RUSAGE_CHILDREN sees nothing else); ``env``: added variables."""
    out = subprocess.run(
        [sys.executable, "-c", _PEAK, *cmd],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    ).stdout.split()
    if out[2] != "0":
        raise RuntimeError(f"{cmd} failed")
    return int(out[0]) / 1024, float(out[1])  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--huge", type=float, default=0, help="also run compare at this n")
    args = ap.parse_args()
    if not SNIPPET.exists():
        sys.exit(f"baseline not found: {SNIPPET}")

    from _platform import describe, fast_status

    import klest.lab.engine  # noqa: F401  (imports outside the timed region)

    print(describe())
    # warm-up: thread pool, page faults, and the kernels' compilation (or its on-disk cache)
    klest_seconds(100_000, args.seed, shared=True)
    klest_seconds(100_000, args.seed, shared=True, fast=False)
    has_fast = fast_status().endswith("used")
    runs: dict[str, list[float]] = {"fast": [], "numpy": [], "separate": [], "snippet": []}
    for _ in range(args.repeats):  # interleaved rounds
        if has_fast:
            runs["fast"].append(klest_seconds(args.n, args.seed, shared=True))
        runs["numpy"].append(klest_seconds(args.n, args.seed, shared=True, fast=False))
        runs["separate"].append(klest_seconds(args.n, args.seed, shared=False))
        runs["snippet"].append(snippet_seconds(args.n, args.seed))
    med = {k: statistics.median(v) for k, v in runs.items() if v}
    t_seed = med["snippet"]
    t_shared = med.get("fast", med["numpy"])
    t_sep = med["separate"]
    print(f"work: 2 shifts x {args.n:,} samples, k1/k2/k3; medians of {args.repeats} rounds")
    if has_fast:
        print(f"  klest, compiled kernels (shared draws): {med['fast']:.3f} s")
    print(f"  klest, pure NumPy (shared draws)      : {med['numpy']:.3f} s")
    print(f"  klest, default, independent draws     : {t_sep:.3f} s")
    print(f"  seed snippet (eager torch)            : {t_seed:.3f} s")
    if has_fast:
        print(f"RATIO snippet / klest[fast] = {t_seed / med['fast']:.1f}x (target >= 8)")
    print(f"RATIO snippet / klest pure NumPy = {t_seed / med['numpy']:.1f}x (target >= 5)")
    print(f"  (independent draws per shift: {t_seed / t_sep:.1f}x)")

    reproduce = [sys.executable, "-m", "klest", "reproduce", "--n", str(args.n), "--quiet"]
    rss_klest, wall_klest = peak_rss_mib(reproduce)
    rss_forced, wall_forced = peak_rss_mib(reproduce, {"KLEST_FAST": "1"}) if has_fast else (0, 0)
    rss_seed, wall_seed = peak_rss_mib([sys.executable, str(SNIPPET), "--n", str(args.n)])
    print("peak resident memory, whole process:")
    print(f"  klest reproduce (5 estimators) : {rss_klest:.0f} MiB ({wall_klest:.2f} s wall)")
    if has_fast:  # the default ("auto") does not load numba for a job this size: see options
        print(f"  the same, KLEST_FAST=1 (numba) : {rss_forced:.0f} MiB ({wall_forced:.2f} s wall)")
    print(f"  seed snippet                   : {rss_seed:.0f} MiB ({wall_seed:.2f} s wall)")
    print(f"RATIO peak memory klest / snippet = {rss_klest / rss_seed:.2f} (target <= 0.25)")
    if has_fast:
        print(f"  (with numba loaded: {rss_forced / rss_seed:.2f})")

    if args.huge:
        n = int(args.huge)
        rss, wall = peak_rss_mib(
            [
                sys.executable,
                "-m",
                "klest",
                "compare",
                "--q",
                "normal(0, 1)",
                "--p",
                "normal(1, 1)",
                "--estimators",
                "k1,k3",
                "--n",
                str(n),
                "--quiet",
            ]
        )
        print(f"klest compare, n = {n:,}, k1 and k3: {rss:.0f} MiB peak, {wall:.1f} s wall")
    print(
        json.dumps(
            {
                "klest_s": t_shared,
                "klest_fast_s": med.get("fast"),
                "klest_numpy_s": med["numpy"],
                "klest_separate_s": t_sep,
                "snippet_s": t_seed,
                "klest_rss_mib": rss_klest,
                "klest_rss_numba_mib": rss_forced,
                "snippet_rss_mib": rss_seed,
            }
        )
    )


if __name__ == "__main__":
    main()
