"""The lab against the seed's way of running its experiment (eager PyTorch, whole arrays).

Work: q = N(0, 1), p = N(0.1, 1) and N(1, 1), 10**7 samples each, k1/k2/k3 bias/true and
stdev/true. The baseline is ../shared/bench/seed_snippet.py (relative to the repository), run as
written in a subprocess; its own ``seconds:`` line times its computation alone (torch imported).
klest's side is timed in this process around the same computation (engine only, imports done).

Prints:
  * compute time, median of --repeats runs each: klest (one set of draws from q serves both
    shifts, as ``klest reproduce`` does), klest with independent draws per shift, the snippet,
    and the ratios;
  * peak resident memory (ru_maxrss of a fresh child) of ``python -m klest reproduce`` and of
    the snippet, and their ratio.
  * with --huge N: time and peak memory of ``klest compare`` at N samples (e.g. 1e9).

Usage: python benchmarks/bench_lab.py [--repeats 5] [--n 10000000] [--huge 1e9]
"""

from __future__ import annotations

import argparse
import json
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


def klest_seconds(n: int, seed: int, *, shared: bool) -> float:
    from klest.lab.engine import run, run_many

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


def peak_rss_mib(cmd: list[str]) -> tuple[float, float]:
    """Peak resident memory (MiB) and wall seconds of ``cmd``, run as the only child of a fresh
    helper process (so that RUSAGE_CHILDREN sees nothing else)."""
    out = subprocess.run(
        [sys.executable, "-c", _PEAK, *cmd], capture_output=True, text=True, check=True
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

    import klest.lab.engine  # noqa: F401  (imports outside the timed region)

    klest_seconds(100_000, args.seed, shared=True)  # warm-up: thread pool, page faults
    shared = [klest_seconds(args.n, args.seed, shared=True) for _ in range(args.repeats)]
    separate = [klest_seconds(args.n, args.seed, shared=False) for _ in range(args.repeats)]
    seed_way = [snippet_seconds(args.n, args.seed) for _ in range(args.repeats)]
    t_shared, t_sep, t_seed = map(statistics.median, (shared, separate, seed_way))
    print(f"work: 2 shifts x {args.n:,} samples, k1/k2/k3; medians of {args.repeats} runs")
    print(f"  klest (draws shared by both shifts) : {t_shared:.3f} s")
    print(f"  klest (independent draws per shift) : {t_sep:.3f} s")
    print(f"  seed snippet (eager torch)          : {t_seed:.3f} s")
    print(
        f"compute-time ratio (snippet / klest): {t_seed / t_shared:.1f}x "
        f"({t_seed / t_sep:.1f}x with independent draws)"
    )

    rss_klest, wall_klest = peak_rss_mib(
        [sys.executable, "-m", "klest", "reproduce", "--n", str(args.n), "--quiet"]
    )
    rss_seed, wall_seed = peak_rss_mib([sys.executable, str(SNIPPET), "--n", str(args.n)])
    print("peak resident memory, whole process:")
    print(f"  klest reproduce (5 estimators) : {rss_klest:.0f} MiB ({wall_klest:.2f} s wall)")
    print(f"  seed snippet                   : {rss_seed:.0f} MiB ({wall_seed:.2f} s wall)")
    print(f"memory ratio (klest / snippet): {rss_klest / rss_seed:.2f}")

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
                "klest_separate_s": t_sep,
                "snippet_s": t_seed,
                "klest_rss_mib": rss_klest,
                "snippet_rss_mib": rss_seed,
            }
        )
    )


if __name__ == "__main__":
    main()
