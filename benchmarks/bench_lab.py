"""The lab against the seed's way of running its experiment (eager PyTorch, whole arrays).

Work: q = N(0, 1), p = N(0.1, 1) and N(1, 1), 10**7 samples each. The baseline is
../shared/bench/seed_snippet.py (relative to the repository), run as written in a subprocess; its
own ``seconds:`` line times its computation alone (torch imported): k1/k2/k3 bias/true and
stdev/true.

Prints, one figure per line (medians of --repeats interleaved rounds: each round runs every
contender once, so that load on a shared machine hits all alike):
  * the CPU, NumPy's SIMD kernels and whether klest[fast] (numba) is installed;
  * ``klest reproduce`` as users run it, default options (``fast="auto"``, which loads the
    compiled kernels for a job this size), all five estimators (k1, k2, k3, forward_k3, k_opt):
    wall time of the command at --n and at --n 1000 in fresh processes, their difference (the
    compute time: numba's load and the sampling; start-up, imports and the table cancel), and
    the ratio snippet / that compute time (target >= 5); the same difference with numba loaded
    in both runs (``KLEST_FAST=1``: its load is then start-up) and with the kernels off
    (``KLEST_FAST=0``); and, less sensitive to other load on a shared machine, the CPU time
    (user + sys of the process, all threads) of the same differences for klest and the snippet;
  * the engine alone in this process (imports and kernel load done): the five estimators and
    k1/k2/k3 with the compiled kernels, the same with them off (pure NumPy), k1/k2/k3 with
    independent draws per shift, and the ratios of the snippet to the k1/k2/k3 runs (targets
    >= 8 with klest[fast], >= 5 without);
  * peak resident memory (ru_maxrss of a fresh child) of ``python -m klest reproduce`` (default
    options, and with ``KLEST_FAST=0``) and of the snippet, and their ratio (target <= 1/4);
  * with --huge N: time and peak memory of ``klest compare`` at N samples (e.g. 1e9);
  * a JSON line with every figure.

Usage: python benchmarks/bench_lab.py [--repeats 5] [--n 10000000] [--huge 1e9]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _docs import StdoutTee, add_write_docs_flag

REPO = Path(__file__).resolve().parents[1]
SNIPPET = REPO.parent / "shared" / "bench" / "seed_snippet.py"
SHIFTS = ("normal(0.1, 1)", "normal(1, 1)")
SEED_ESTIMATORS = ["k1", "k2", "k3"]  # what the snippet computes
SMALL_N = 1000  # the reference run whose wall time is subtracted: everything but the sampling


def klest_seconds(
    n: int, seed: int, estimators: list[str], *, shared: bool = True, fast: bool = True
) -> float:
    import klest
    from klest.lab.engine import run, run_many

    with klest.options(fast=fast):
        start = time.perf_counter()
        if shared:
            run_many("normal(0, 1)", list(SHIFTS), estimators, n, seed)
        else:
            for p in SHIFTS:
                run("normal(0, 1)", p, estimators, n, seed)
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


_CPU: dict[str, list[float]] = {}  # CPU seconds (user + sys) of each command run, by key


def command_seconds(cmd: list[str], env: dict[str, str] | None = None, key: str = "") -> float:
    """Wall time of ``cmd`` in a fresh process (start-up included), its output discarded; its
    CPU time (user + sys, all threads) is appended to ``_CPU[key]``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, env={**os.environ, **(env or {})}, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    _CPU.setdefault(key, []).append(cpu)
    return wall


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
    add_write_docs_flag(ap)  # --write-docs: the report into the docs' bench:lab blocks
    args = ap.parse_args()
    StdoutTee(args.write_docs, "lab")
    if not SNIPPET.exists():
        sys.exit(f"baseline not found: {SNIPPET}")

    from _platform import describe, fast_status

    import klest.lab.engine  # noqa: F401  (imports outside the timed region)
    from klest.lab.experiments import REPRODUCE_ESTIMATORS

    five = list(REPRODUCE_ESTIMATORS)
    print(describe())
    has_fast = fast_status().endswith("used")
    # warm-up: thread pool, page faults, the kernels' compilation (or its on-disk cache) in this
    # process and in the commands' (KLEST_FAST=1 fills the cache the default run then reads)
    klest_seconds(100_000, args.seed, five)
    klest_seconds(100_000, args.seed, five, fast=False)
    reproduce = [sys.executable, "-m", "klest", "reproduce", "--quiet", "--seed", str(args.seed)]
    command_seconds([*reproduce, "--n", "100000"], {"KLEST_FAST": "1"})

    runs: dict[str, list[float]] = {
        k: []
        for k in (
            "reproduce",
            "reproduce_small",
            "reproduce_fast",
            "reproduce_fast_small",
            "reproduce_numpy",
            "reproduce_numpy_small",
            "snippet",
            "five_fast",
            "five_numpy",
            "three_fast",
            "three_numpy",
            "three_separate",
        )
    }
    for _ in range(args.repeats):  # interleaved rounds
        for key, env in (("", {}), ("_fast", {"KLEST_FAST": "1"}), ("_numpy", {"KLEST_FAST": "0"})):
            if key == "_fast" and not has_fast:
                continue
            big = [*reproduce, "--n", str(args.n)]
            small = [*reproduce, "--n", str(SMALL_N)]
            runs[f"reproduce{key}"].append(command_seconds(big, env, f"reproduce{key}"))
            runs[f"reproduce{key}_small"].append(command_seconds(small, env, f"small{key}"))
        runs["snippet"].append(snippet_seconds(args.n, args.seed))
        for n, key in ((args.n, "snippet"), (SMALL_N, "snippet_small")):  # CPU time only
            command_seconds([sys.executable, str(SNIPPET), "--n", str(n)], None, key)
        if has_fast:
            runs["five_fast"].append(klest_seconds(args.n, args.seed, five))
            runs["three_fast"].append(klest_seconds(args.n, args.seed, SEED_ESTIMATORS))
        runs["five_numpy"].append(klest_seconds(args.n, args.seed, five, fast=False))
        runs["three_numpy"].append(klest_seconds(args.n, args.seed, SEED_ESTIMATORS, fast=False))
        runs["three_separate"].append(
            klest_seconds(args.n, args.seed, SEED_ESTIMATORS, shared=False)
        )
    med = {k: statistics.median(v) for k, v in runs.items() if v}
    t_seed = med["snippet"]
    compute = med["reproduce"] - med["reproduce_small"]

    print(
        f"work: q = N(0, 1), p = N(0.1, 1) and N(1, 1), {args.n:,} samples; medians of "
        f"{args.repeats} interleaved rounds"
    )
    print(f"klest reproduce, default options, 5 estimators, wall: {med['reproduce']:.3f} s")
    print(f"klest reproduce --n {SMALL_N}, default options, wall: {med['reproduce_small']:.3f} s")
    print(f"klest reproduce compute time (wall difference): {compute:.3f} s")
    print(f"seed snippet compute time (eager torch, k1/k2/k3): {t_seed:.3f} s")
    print(
        f"RATIO seed snippet / klest reproduce compute time = {t_seed / compute:.1f}x (target >= 5)"
    )
    cpu = {k: statistics.median(v) for k, v in _CPU.items()}
    cpu_klest = cpu["reproduce"] - cpu["small"]
    cpu_seed = cpu["snippet"] - cpu["snippet_small"]
    print(
        f"klest reproduce compute CPU time (user+sys difference, both threads): {cpu_klest:.3f} s"
    )
    print(f"seed snippet compute CPU time (user+sys, --n minus --n {SMALL_N}): {cpu_seed:.3f} s")
    print(f"RATIO (CPU time) seed snippet / klest reproduce = {cpu_seed / cpu_klest:.1f}x")
    compute_numpy = med["reproduce_numpy"] - med["reproduce_numpy_small"]
    print(
        f"klest reproduce compute time, KLEST_FAST=0 (pure NumPy): {compute_numpy:.3f} s "
        f"({t_seed / compute_numpy:.1f}x)"
    )
    compute_fast = None
    if has_fast:  # numba loaded in both runs: its load is then start-up, not compute
        compute_fast = med["reproduce_fast"] - med["reproduce_fast_small"]
        print(
            "klest reproduce compute time, KLEST_FAST=1 (numba loaded in both runs): "
            f"{compute_fast:.3f} s ({t_seed / compute_fast:.1f}x)"
        )
    if has_fast:
        print(f"engine, 5 estimators, compiled kernels: {med['five_fast']:.3f} s")
    print(f"engine, 5 estimators, pure NumPy: {med['five_numpy']:.3f} s")
    if has_fast:
        print(f"engine, k1/k2/k3, compiled kernels: {med['three_fast']:.3f} s")
    print(f"engine, k1/k2/k3, pure NumPy: {med['three_numpy']:.3f} s")
    print(f"engine, k1/k2/k3, default options, independent draws: {med['three_separate']:.3f} s")
    if has_fast:
        print(
            f"RATIO seed snippet / engine k1/k2/k3 compiled = {t_seed / med['three_fast']:.1f}x "
            "(target >= 8)"
        )
    print(
        f"RATIO seed snippet / engine k1/k2/k3 pure NumPy = {t_seed / med['three_numpy']:.1f}x "
        "(target >= 5)"
    )

    full = [*reproduce, "--n", str(args.n)]
    rss_klest, wall_klest = peak_rss_mib(full)
    rss_numpy, wall_numpy = peak_rss_mib(full, {"KLEST_FAST": "0"})
    rss_seed, wall_seed = peak_rss_mib([sys.executable, str(SNIPPET), "--n", str(args.n)])
    print(
        f"peak memory, klest reproduce, default options: {rss_klest:.0f} MiB "
        f"({wall_klest:.2f} s wall)"
    )
    print(
        f"peak memory, klest reproduce, KLEST_FAST=0: {rss_numpy:.0f} MiB ({wall_numpy:.2f} s wall)"
    )
    print(f"peak memory, seed snippet: {rss_seed:.0f} MiB ({wall_seed:.2f} s wall)")
    print(
        f"RATIO peak memory klest (default) / snippet = {rss_klest / rss_seed:.2f} (target <= 0.25)"
    )
    print(f"RATIO peak memory klest (KLEST_FAST=0) / snippet = {rss_numpy / rss_seed:.2f}")

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
                "reproduce_s": med["reproduce"],
                "reproduce_small_s": med["reproduce_small"],
                "reproduce_compute_s": compute,
                "snippet_s": t_seed,
                "ratio_snippet_reproduce": t_seed / compute,
                "reproduce_compute_numpy_s": compute_numpy,
                "reproduce_compute_cpu_s": cpu_klest,
                "snippet_compute_cpu_s": cpu_seed,
                "reproduce_compute_fast_s": compute_fast,
                "engine_five_fast_s": med.get("five_fast"),
                "engine_five_numpy_s": med["five_numpy"],
                "engine_three_fast_s": med.get("three_fast"),
                "engine_three_numpy_s": med["three_numpy"],
                "engine_three_separate_s": med["three_separate"],
                "klest_rss_mib": rss_klest,
                "klest_rss_numpy_mib": rss_numpy,
                "snippet_rss_mib": rss_seed,
            }
        )
    )


if __name__ == "__main__":
    main()
