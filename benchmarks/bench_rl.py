"""klest.rl's fused k3 loss (reverse-KL gradient) against the eager formulas the peers use.

Forward + backward of a masked token-mean KL loss on [64, 8192] float32 tokens on CPU, all
variants in one run, interleaved, median of several repeats; plus the bytes each variant saves for
backward, counted with torch.autograd.graph.saved_tensors_hooks. Baselines:

- ``verl:low_var_kl+`` eager: k3 value (clamped), straight-through k2 gradient, masked mean; the
  peers' way to get the reverse-KL gradient, i.e. the same value and gradient as klest's default.
- ``trl:grpo`` eager: plain k3 and its autograd gradient (forward KL), masked mean.

Run: ``.venv/bin/python benchmarks/bench_rl.py`` (``--help`` for sizes and repeats; ``--write-docs``
puts the table into the ``bench:rl`` blocks of README.md and docs/rl.md).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
from _docs import add_write_docs_flag, markdown_table, write_block

import klest
import klest.rl as rl


def peer_k3_plus(logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    kl = (ref - logp).clamp(-20, 20)
    k3 = (torch.exp(kl) - kl - 1).clamp(-10, 10)
    k2 = 0.5 * (logp - ref) ** 2
    per_token = k2 - k2.detach() + k3.detach()
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def peer_k3(logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    L = ref - logp
    per_token = torch.exp(L) - L - 1
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def make_variants(
    ref: torch.Tensor, mask: torch.Tensor
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    maskf = mask.to(ref.dtype)

    def klest_loss(diagnostics: bool, validate: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        def f(logp: torch.Tensor) -> torch.Tensor:
            with klest.options(validate=validate):
                return rl.kl_loss(logp, ref, mask=mask, diagnostics=diagnostics).loss

        return f

    return {
        "klest kl_loss (k3, reverse_kl)": klest_loss(False, False),
        "klest kl_loss + validation": klest_loss(False, True),
        "klest kl_loss + validation + diagnostics": klest_loss(True, True),
        "eager verl low_var_kl+ (k3, k2 grad)": lambda lp: peer_k3_plus(lp, ref, maskf),
        "eager trl grpo (k3, own grad)": lambda lp: peer_k3(lp, ref, maskf),
    }


def saved_bytes(fn: Callable[[torch.Tensor], torch.Tensor], logp: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    lp = logp.detach().clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(lp)
    loss.backward()
    return sum(seen.values())


def time_once(fn: Callable[[torch.Tensor], torch.Tensor], logp: torch.Tensor) -> float:
    lp = logp.detach().clone().requires_grad_(True)
    t0 = time.perf_counter()
    fn(lp).backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    add_write_docs_flag(ap)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    B, T = args.batch, args.seq
    logp = -torch.rand(B, T, generator=g) * 4
    ref = logp + 0.2 * torch.randn(B, T, generator=g)
    lengths = torch.randint(T // 4, T + 1, (B, 1), generator=g)
    mask = torch.arange(T)[None, :] < lengths  # right padding, as in a real batch
    variants = make_variants(ref, mask)

    # same numbers first (value and gradient of klest vs the peers' k3+ formula)
    grads = {}
    for name in ("klest kl_loss (k3, reverse_kl)", "eager verl low_var_kl+ (k3, k2 grad)"):
        lp = logp.clone().requires_grad_(True)
        loss = variants[name](lp)
        loss.backward()
        grads[name] = (loss.detach(), lp.grad)
    (v1, g1), (v2, g2) = grads.values()
    print(
        f"value: klest {v1.item():.9g}  eager {v2.item():.9g}  (rel diff {abs(v1 - v2) / v2:.1e})"
    )
    print(f"gradient max abs diff: {(g1 - g2).abs().max().item():.1e}")

    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm up
        time_once(fn, logp)
    order = list(variants)
    rng = random.Random(0)
    for _ in range(args.repeats):
        rng.shuffle(order)  # interleaved, in a fresh order: load and allocator state hit all alike
        for k in order:
            times[k].append(time_once(variants[k], logp))
    base = statistics.median(times["eager verl low_var_kl+ (k3, k2 grad)"])
    base_bytes = saved_bytes(variants["eager verl low_var_kl+ (k3, k2 grad)"], logp)
    print(
        f"\n[{B}, {T}] float32, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"median of {args.repeats}"
    )
    print(f"{'variant':44s} {'fwd+bwd ms':>10s} {'time ratio':>10s} {'saved MB':>9s} {'ratio':>6s}")
    rows = []
    for k, fn in variants.items():
        med = statistics.median(times[k])
        nb = saved_bytes(fn, logp)
        print(
            f"{k:44s} {med * 1e3:10.2f} {med / base:10.2f} {nb / 2**20:9.2f} {nb / base_bytes:6.2f}"
        )
        rows.append([k, f"{med * 1e3:.2f}", f"{med / base:.2f}", f"{nb / 2**20:.1f}",
                     f"{nb / base_bytes:.2f}"])  # fmt: skip
    print("(ratios against the eager verl low_var_kl+ formula: same value, same gradient)")
    if args.write_docs:
        header = ["variant", "fwd+bwd (ms)", "time vs verl `low_var_kl+`",
                  "saved for backward (MB)", "memory vs verl `low_var_kl+`"]  # fmt: skip
        intro = (
            f"Forward + backward of a masked token-mean loss on [{B}, {T}] float32 tokens, CPU, "
            f"{torch.get_num_threads()} threads, variants interleaved in shuffled order, median "
            f"of {args.repeats} repeats; value agrees with the eager verl formula to "
            f"{float(abs(v1 - v2) / v2):.0e} (relative), gradient to "
            f"{(g1 - g2).abs().max().item():.0e}:\n\n"
        )
        write_block("rl", intro + markdown_table(header, rows))


if __name__ == "__main__":
    main()
