"""klest.logits against the naive eager formulas and torch.compile of them (CPU, float32).

Forward + backward (gradient w.r.t. the policy logits) of

- ``full_kl``: exact per-position KL(π‖π_ref) summed, vs the naive eager formulation
  (log_softmax of both, elementwise π·(log π − log π_ref), sum) and ``torch.compile`` of it;
- ``token_logprobs``: log-probs of given tokens, vs ``log_softmax(...).gather`` eager / compiled;
- ``full_kl_from_hidden`` (hidden size ``--hidden``): vs the explicit matmul + naive KL
  (gradients w.r.t. the policy's hidden states and weight).

Times are medians of ``--repeats`` interleaved repeats (variants in turn, order shuffled per
repeat), in one run, with ratios against the naive eager variant. **Peak extra memory** is the
peak resident set size (VmRSS of /proc/self/status, sampled every 0.2 ms by a thread) during one
call minus the resident size just before it, after a warm-up call: it counts every byte torch's
CPU allocator touches (tracemalloc does not see torch), including the returned gradient. The
script re-executes itself with MALLOC_MMAP_THRESHOLD_=1 MiB so that glibc maps every larger
block and returns it on free: each call starts from the same base.
It is given in units of one [N, V] float32 tensor. **Bytes per row**: a streaming pass that reads
both logit rows and writes the gradient row moves 12·V bytes; its time is measured
(``torch.add(a, b, out=g)``) and each variant's time is also given as a multiple of it.

Run: ``.venv/bin/python benchmarks/bench_logits.py`` (1024 rows × 151,936, about 4 GiB of RAM
for the logits variants and 3 GiB for the fused ones); ``--rows 128`` for a quick look;
``--skip-compile`` to leave torch.compile out; ``--skip-hidden`` to leave out the fused layer.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable

import torch
from _docs import StdoutTee, add_write_docs_flag
from _platform import describe

from klest.logits import full_kl, full_kl_from_hidden, token_logprobs


def naive_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    la = torch.log_softmax(a, -1)
    lb = torch.log_softmax(b, -1)
    return (la.exp() * (la - lb)).sum(-1)


def naive_logprobs(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(a, -1).gather(-1, t[:, None])[:, 0]


def naive_processed(a: torch.Tensor, t: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """Log-probs under top-k then top-p, masked on a sorted copy of the whole tensor (the way
    vLLM's ``apply_top_k_top_p`` filters), then log_softmax + gather."""
    x = a.masked_fill(a < a.topk(k, dim=-1).values[:, -1:], -float("inf"))
    srt, idx = x.sort(-1)
    removed = srt.softmax(-1).cumsum(-1) <= 1 - p
    removed[:, -1] = False
    x = x.scatter(-1, idx, srt.masked_fill(removed, -float("inf")))
    return torch.log_softmax(x, -1).gather(-1, t[:, None])[:, 0]


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Peak VmRSS above the level at entry, sampled by a thread."""

    def __enter__(self) -> PeakRSS:
        self.base = rss()
        self.peak = self.base
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.0002)

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def run_group(
    title: str,
    variants: dict[str, Callable[[], None]],
    repeats: int,
    unit_bytes: int,
    stream_s: float | None,
    subtract: int = 0,
) -> None:
    """Time and measure ``variants``; ``subtract``: bytes every variant must allocate anyway
    (left out of the extra memory printed)."""
    print(f"\n== {title}")
    times: dict[str, list[float]] = {k: [] for k in variants}
    mem: dict[str, int] = {}
    for name, f in variants.items():  # warm-up (compiles), then one call for the memory peak
        f()
        with PeakRSS() as p:
            f()
        mem[name] = p.extra - subtract
    names = list(variants)
    for _ in range(repeats):
        random.shuffle(names)
        for name in names:
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times[next(iter(variants))])
    print(f"{'variant':44s} {'median s':>9s} {'÷ naive':>8s} {'÷ stream':>9s} {'extra mem':>10s}")
    for name in variants:
        med = statistics.median(times[name])
        st = f"{med / stream_s:9.1f}" if stream_s else f"{'':9s}"
        print(f"{name:44s} {med:9.3f} {med / base:8.2f} {st} {mem[name] / unit_bytes:8.2f} ×")
    print(f"(extra memory in units of one [N, V] float32 tensor = {unit_bytes / 2**20:.0f} MiB)")


def _fast_available() -> bool:
    from klest.logits import _fused

    return _fused._nb is not None


def _torch_ops_kl(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """klest's full_kl without its compiled pass (the torch-op chunk loop)."""
    import klest

    with klest.options(fast=False):
        return full_kl(x, b)


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # glibc: serve every allocation above 1 MiB by mmap, returned to the OS on free, so that
        # the resident size follows the live tensors (its default threshold adapts up to 32 MiB)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--hidden-rows", type=int, default=None, help="rows for the fused variant")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--chunk-size", type=int, default=None, help="klest rows per chunk")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--skip-hidden", action="store_true")
    add_write_docs_flag(ap)  # --write-docs: the report into the docs' bench:logits blocks
    args = ap.parse_args()
    StdoutTee(args.write_docs, "logits")
    if args.threads:
        torch.set_num_threads(args.threads)
    N, V = args.rows, args.vocab
    cap = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"CPU capability {cap}, cores {os.cpu_count()}")  # fmt: skip
    print(describe())  # CPU and NumPy's SIMD extensions (benchmarks/_platform.py)
    print(f"N = {N} rows, V = {V}, float32")

    g = torch.Generator().manual_seed(0)
    a = torch.randn(N, V, generator=g) * 2
    b = torch.randn(N, V, generator=g) * 2
    t = torch.randint(0, V, (N,), generator=g)
    unit = N * V * 4

    # streaming floor: read two rows, write one (12·V bytes per row)
    out = torch.empty_like(a)
    torch.add(a, b, out=out)
    st = []
    for _ in range(max(3, args.repeats)):
        t0 = time.perf_counter()
        torch.add(a, b, out=out)
        st.append(time.perf_counter() - t0)
    stream_s = statistics.median(st)
    del out
    gbs = 12 * V * N / stream_s / 1e9
    print(f"streaming pass (read 2 rows, write 1; {12 * V / 1e6:.2f} MB per row): "
          f"{stream_s:.3f} s = {gbs:.1f} GB/s")  # fmt: skip
    print("klest full_kl moves 20·V bytes per row (both rows read and the gradient written "
          "in forward, the gradient read and written again in backward to scale it); "
          "token_logprobs 12·V (one row read twice, one written)")  # fmt: skip

    cs = args.chunk_size

    def fb(f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor) -> Callable[[], None]:
        def call() -> None:
            x = x0.detach().requires_grad_(True)
            f(x).sum().backward()
            x.grad = None

        return call

    kl_variants = {
        "naive eager (log_softmax ×2, sum)": fb(lambda x: naive_kl(x, b), a),
        "klest full_kl": fb(lambda x: full_kl(x, b, chunk_size=cs), a),
    }
    if _fast_available():
        kl_variants["klest full_kl, torch ops (fast=False)"] = fb(lambda x: _torch_ops_kl(x, b), a)
    lp_variants = {
        "naive eager log_softmax + gather": fb(lambda x: naive_logprobs(x, t), a),
        "klest token_logprobs": fb(lambda x: token_logprobs(x, t, chunk_size=cs), a),
        "naive eager top-k 50, top-p 0.9 (sorted mask)": fb(
            lambda x: naive_processed(x, t, 50, 0.9), a
        ),
        "klest token_logprobs, top_k=50, top_p=0.9": fb(
            lambda x: token_logprobs(x, t, top_k=50, top_p=0.9, chunk_size=cs), a
        ),
    }
    if not args.skip_compile:
        ckl = torch.compile(naive_kl, dynamic=False)
        clp = torch.compile(naive_logprobs, dynamic=False)
        kl_variants["torch.compile(naive)"] = fb(lambda x: ckl(x, b), a)
        lp_variants["torch.compile(naive)"] = fb(lambda x: clp(x, t), a)
    run_group("full_kl, forward + backward", kl_variants, args.repeats, unit, stream_s)
    run_group("token_logprobs, forward + backward", lp_variants, args.repeats, unit, stream_s / 1.5)
    kl_variants.clear()
    lp_variants.clear()
    a.set_(torch.empty(0))  # free the logits before the fused runs (the lambdas hold a, b)
    b.set_(torch.empty(0))

    if args.skip_hidden:
        return
    Nh = args.hidden_rows or N
    H = args.hidden
    h = torch.randn(Nh, H, generator=g) / H**0.5
    W = torch.randn(V, H, generator=g)
    hr = torch.randn(Nh, H, generator=g) / H**0.5
    Wr = torch.randn(V, H, generator=g)

    def hidden_call(fused: bool) -> Callable[[], None]:
        def call() -> None:
            hh = h.detach().requires_grad_(True)
            WW = W.detach().requires_grad_(True)
            if fused:
                v = full_kl_from_hidden(hh, WW, hr, Wr)
            else:
                v = naive_kl(hh @ WW.T, hr @ Wr.T)
            v.sum().backward()

        return call

    run_group(
        f"KL from hidden states (N = {Nh}, hidden {H}), grads w.r.t. hidden and weight",
        {
            "explicit matmul + naive KL": hidden_call(False),
            "klest full_kl_from_hidden": hidden_call(True),
        },
        max(1, args.repeats // 2),
        Nh * V * 4,
        None,
        subtract=V * H * 4 + Nh * H * 4,
    )
    print("(extra memory here leaves out the gradients w.r.t. weight and hidden, which both "
          f"variants return: {(V * H + Nh * H) * 4 / 2**20:.0f} MiB)")  # fmt: skip


if __name__ == "__main__":
    main()
