"""Wall time of ``klest reproduce`` (process start included) with an empty compile cache (cold)
and with the cache the cold run left (warm), against the same command without klest[fast].

Each round runs, in a fresh process each: a cold run (``NUMBA_CACHE_DIR`` pointing at a new empty
directory, so numba compiles every kernel the run needs and writes them to disk), a warm run
(the same directory, now filled: the kernels are loaded, not compiled), both with the kernels
forced on (``KLEST_FAST=1``), a run with them off (``KLEST_FAST=0``: pure NumPy) and one with
the default (``fast="auto"``, which at the default size loads numba: the five estimators'
compiled pass saves about as much as its 0.4 s load; see ``klest.lab.engine.WORK_PER_DRAW``).
Medians over --repeats rounds; the target is cold - warm <= 10 s.
``--figure FILE.png`` also draws the medians as bars.

Usage: python benchmarks/bench_cold_start.py [--repeats 3] [--n 10000000] [--figure cold.png]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _docs import StdoutTee, add_write_docs_flag
from _platform import describe


def wall(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env={**os.environ, **env}, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--figure", type=Path, default=None)
    add_write_docs_flag(ap)  # --write-docs: the report into the docs' bench:cold_start blocks
    args = ap.parse_args()
    StdoutTee(args.write_docs, "cold_start")
    print(describe())
    cmd = [sys.executable, "-m", "klest", "reproduce", "--quiet", "--n", str(args.n)]
    runs: dict[str, list[float]] = {"cold": [], "warm": [], "no fast": [], "default": []}
    with tempfile.TemporaryDirectory(prefix="klest-cold-") as root:
        for r in range(args.repeats):
            cache = str(Path(root) / f"cache{r}")
            forced = {"NUMBA_CACHE_DIR": cache, "KLEST_FAST": "1"}
            runs["cold"].append(wall(cmd, forced))
            runs["warm"].append(wall(cmd, forced))
            runs["no fast"].append(wall(cmd, {"KLEST_FAST": "0"}))
            runs["default"].append(wall(cmd, {}))
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"klest reproduce --n {args.n:,}: wall time, process start included, medians")
    for name, t in med.items():
        print(f"  {name:8s} {t:6.2f} s   (runs: {', '.join(f'{x:.2f}' for x in runs[name])})")
    print(f"RATIO cold - warm = {med['cold'] - med['warm']:.1f} s (target <= 10)")
    summary = {"cold_s": med["cold"], "warm_s": med["warm"], "nofast_s": med["no fast"]}
    print(json.dumps({**summary, "default_s": med["default"]}))
    if args.figure is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3))
        names = list(med)
        ax.bar(names, [med[k] for k in names], color=["#c44e52", "#55a868", "#4c72b0", "#8172b2"])
        ax.set_ylabel("wall time (s)")
        ax.set_title(f"klest reproduce, n = {args.n:.0e}: compile cache cold vs warm")
        fig.tight_layout()
        fig.savefig(args.figure, dpi=120)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
