"""Vocabulary parallelism: 2 gloo processes on 127.0.0.1, each holding half of the vocabulary,
give every rank the whole-vocabulary values and each rank the gradient w.r.t. its own shard,
equal to one process on the full vocabulary (float64, to 1e-12).

This file is also the worker: ``python test_vocab_parallel.py RANK WORLD PORT OUT``.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

import klest.logits as kl  # noqa: E402
from klest import KlestError  # noqa: E402

V = 10
H = 3


def data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    B, T = 2, 4
    a = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    b = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    a[0, 1, :5] = -math.inf  # rank 0's shard of this row is masked entirely, in both
    b[0, 1, :5] = -math.inf
    a[1, 2, 7] = b[1, 2, 7] = -math.inf  # one entry masked in both
    a[1, 0] = -1e17  # huge magnitude: the normaliser log V must survive the merge of shards
    a[1, 0, 7] = -1e17 + 32.0
    b[0, 3] = -1e17
    tokens = torch.randint(0, V, (B, T), generator=g)
    tokens[0, 1] = 6
    a2 = a + 0.01 * torch.randn(B, T, V, generator=g, dtype=torch.float64)  # same kept sets
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3] = False
    r, i = torch.log_softmax(b, -1).topk(4)
    w = torch.randn(B, T, generator=g, dtype=torch.float64)
    hid = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64)
    hid_r = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    W_r = torch.randn(V, H, generator=g, dtype=torch.float64)
    return {"a": a, "b": b, "a2": a2, "tokens": tokens, "mask": mask, "r": r, "i": i, "w": w,
            "hid": hid, "W": W, "hid_r": hid_r, "W_r": W_r}  # fmt: skip


def cases(d: dict[str, torch.Tensor], group: object) -> dict[str, tuple]:
    """name -> (value, grads...) for the rank's shard (``group`` None: the full vocabulary)."""
    world = 1 if group is None else dist.get_world_size()
    rank = 0 if group is None else dist.get_rank()
    n = V // world
    sl = slice(rank * n, (rank + 1) * n)
    out = {}

    def run(name, f, *inputs):
        xs = [x[..., sl, :] if x.ndim == 2 else x[..., sl] for x in inputs]
        xs = [x.clone().requires_grad_(True) for x in xs]
        v = f(*xs)
        (v * d["w"]).sum().backward()
        out[name] = (v.detach(), *[x.grad for x in xs])

    pg = group
    m = d["mask"]
    for direction in ("reverse", "forward"):
        run(f"kl-{direction}", lambda a, b: kl.full_kl(a, b, m, direction, 0.9, process_group=pg),
            d["a"], d["b"])  # fmt: skip
        run(f"topk-{direction}",
            lambda a: kl.topk_kl(a, d["r"], d["i"], m, direction, process_group=pg),
            d["a"])  # fmt: skip
    run("jsd", lambda a, b: kl.full_jsd(a, b, 0.3, m, process_group=pg), d["a"], d["b"])
    run("tv", lambda a, b: kl.full_tv(a, b, m, process_group=pg), d["a"], d["b"])
    run("logp", lambda a: kl.token_logprobs(a, d["tokens"], 1.2, process_group=pg), d["a"])
    run(
        "entropy",
        lambda a: sum(kl.token_logprobs(a, d["tokens"], return_entropy=True, process_group=pg)),
        d["a"],
    )
    for name, kw in (("k", dict(top_k=3)), ("kp", dict(top_k=4, top_p=0.8, min_p=0.01)),
                     ("p", dict(top_p=0.7))):  # fmt: skip
        run(
            f"logp-{name}",
            lambda a, kw=kw: sum(
                kl.token_logprobs(
                    a, d["tokens"], 0.9, mask=m, return_entropy=True, **kw, process_group=pg
                )
            ),
            d["a"],
        )
        run(
            f"kl-{name}",
            lambda a, b, kw=kw: kl.full_kl(a, b, m, temperature=0.9, **kw, process_group=pg),
            d["a"],
            d["a2"],
        )
    if hasattr(kl, "full_kl_from_hidden"):
        run(
            "kl-hidden",
            lambda W, Wr: kl.full_kl_from_hidden(
                d["hid"], W, d["hid_r"], Wr, m, process_group=pg, vocab_chunk_size=2
            ),
            d["W"],
            d["W_r"],
        )
        run(
            "logp-hidden",
            lambda W: sum(
                kl.token_logprobs_from_hidden(
                    d["hid"], W, d["tokens"], return_entropy=True, process_group=pg
                )
            ),
            d["W"],
        )
    return out


def main() -> None:
    rank, world, port, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        d = data()
        res: dict[str, object] = dict(cases(d, dist.group.WORLD))
        # unequal shards (4 and 6 entries) are refused on every rank
        a = d["a"][..., :4] if rank == 0 else d["a"][..., 4:]
        b = d["b"][..., :4] if rank == 0 else d["b"][..., 4:]
        try:
            kl.full_kl(a, b, process_group=dist.group.WORLD)
        except KlestError as e:
            res["unequal"] = str(e)
        # second derivatives under a vocabulary-parallel group: refused, never a wrong number
        x = (d["a"][..., :5] if rank == 0 else d["a"][..., 5:]).clone().requires_grad_(True)
        y = d["b"][..., :5] if rank == 0 else d["b"][..., 5:]
        v = kl.full_kl(x, y, process_group=dist.group.WORLD).sum()
        try:
            torch.autograd.grad(v, x, create_graph=True)
        except KlestError as e:
            res["twice"] = str(e)
        torch.save(res, path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(tmp_path: Path) -> list[dict]:
    port = _free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    outs = [tmp_path / f"rank{r}.pt" for r in range(2)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                str(r),
                "2",
                str(port),
                str(outs[r]),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=120)
            logs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log
    return [torch.load(o) for o in outs]


needs_gloo = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="no gloo"
)


@pytest.mark.slow
@needs_gloo
def test_two_shards_equal_one_process(tmp_path):
    d = data()
    single = cases(d, None)
    ranks = _spawn(tmp_path)
    n = V // 2
    for r, res in enumerate(ranks):
        assert "equal size" in res.pop("unequal")  # unequal shards: refused on every rank
        assert "second derivatives" in res.pop("twice")
        assert set(res) == set(single)
        sl = slice(r * n, (r + 1) * n)
        for name, (val, *grads) in single.items():
            got_val, *got_grads = res[name]
            torch.testing.assert_close(got_val, val, rtol=1e-12, atol=1e-12, msg=name)
            for gg, g in zip(got_grads, grads, strict=True):
                want = g[sl] if g.ndim == 2 else g[..., sl]
                torch.testing.assert_close(
                    gg, want, rtol=1e-12, atol=1e-12, msg=name, equal_nan=True
                )
    # the test can fail: a shard's own softmax is not the whole-vocabulary one
    own = kl.full_kl(d["a"][..., n:], d["b"][..., n:], d["mask"])
    assert (own - single["kl-reverse"][0]).abs().max() > 1e-2


if __name__ == "__main__":
    main()
