"""Wall time of the default ``klest gradients`` run (table + training), the issue's budget: < 30 s
on 2 cores. Runs the CLI in a fresh process (imports included), ``--repeats`` times, and prints
each time, the median and the ratio to the 30 s budget; ``--json`` also times one run with
``--format json``.

Run: ``.venv/bin/python benchmarks/bench_gradients.py`` (``--help`` for options; ``--write-docs``
puts the result into the README's ``bench:gradients`` block).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from _docs import add_write_docs_flag, markdown_table, write_block

BUDGET_S = 30.0


def _once(extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "klest", "gradients", "--plot", "/tmp/klest_gradients.png", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="also time --format json")
    add_write_docs_flag(ap)
    args = ap.parse_args()
    times = [_once([]) for _ in range(args.repeats)]
    med = statistics.median(times)
    print("klest gradients (default: V=4, T=4, B=64, 150 training steps, presets, off-policy)")
    print("  runs (s): " + ", ".join(f"{t:.2f}" for t in times))
    print(f"  median: {med:.2f} s = {med / BUDGET_S:.2f} of the {BUDGET_S:.0f} s budget")
    if args.json:
        print(f"  --format json: {_once(['--format', 'json']):.2f} s")
    if args.write_docs:
        what = (
            "default `klest gradients` (table, presets, off-policy, 150 training steps, plot), "
            "fresh process"
        )
        runs = ", ".join(f"{t:.2f}" for t in times)
        ratio = f"{med / BUDGET_S:.2f}"
        row = [what, f"{med:.2f} s (median of {runs})", f"{BUDGET_S:.0f} s", ratio]
        write_block("gradients", markdown_table(["benchmark", "klest", "budget", "ratio"], [row]))


if __name__ == "__main__":
    main()
