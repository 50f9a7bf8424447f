"""Two gloo processes on 127.0.0.1 give what one process gives on the concatenated batch.

Each rank's loss, averaged over ranks (as DDP/FSDP average gradients), and the rank-averaged
gradient of a shared parameter must equal the single-process loss and gradient, for every
aggregation (token-mean divides by the global token count) and gradient option.

This file is also the worker: ``python test_distributed.py RANK WORLD PORT OUT`` runs one rank on
its shard of a fixed global batch, averages over ranks and saves the results to OUT.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

import klest.rl as rl  # noqa: E402

SHARDS = ((0, 3), (3, 7))  # uneven on purpose: 3 and 4 rows, different token counts
GRADIENTS = ("reverse_kl", "forward_kl", "as_written", "sequence_reverse_kl")


def global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    B, T, V = 7, 6, 5
    feats = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    ref = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    ref = ref.gather(-1, tokens[..., None])[..., 0]
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[4] = False  # an empty row on rank 1
    theta = torch.randn(V, generator=g, dtype=torch.float64)
    return {"feats": feats, "tokens": tokens, "ref": ref, "mask": mask, "theta": theta}


def run(batch: dict[str, torch.Tensor], rows: tuple[int, int], distributed: bool | None) -> dict:
    lo, hi = rows
    out = {}
    for mode in rl.AGGREGATIONS:
        for gradient in GRADIENTS:
            theta = batch["theta"].clone().requires_grad_(True)
            logits = batch["feats"][lo:hi] + theta
            logp = torch.log_softmax(logits, -1).gather(-1, batch["tokens"][lo:hi, :, None])[..., 0]
            res = rl.kl_loss(
                logp,
                batch["ref"][lo:hi],
                mask=batch["mask"][lo:hi],
                aggregation=mode,
                gradient=gradient,
                distributed=distributed,
            )
            (g,) = torch.autograd.grad(res.loss, theta)
            out[("kl_loss", mode, gradient)] = (res.loss.detach(), g)
        theta = batch["theta"].clone().requires_grad_(True)
        x = torch.sin(batch["feats"][lo:hi].sum(-1) * theta[0])
        val = rl.aggregate(x, batch["mask"][lo:hi], mode, distributed=distributed)
        (g,) = torch.autograd.grad(val, theta)
        out[("aggregate", mode)] = (val.detach(), g)
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
        res = run(global_batch(), SHARDS[rank], None)  # None: detect torch.distributed
        averaged = {}
        for key, (val, grad) in res.items():
            both = torch.cat([val.reshape(1), grad])
            dist.all_reduce(both)  # DDP averages gradients over ranks; so do we, for the value
            both /= world
            averaged[key] = (both[0], both[1:])
        torch.save(averaged, path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_two_processes_equal_one(tmp_path):
    batch = global_batch()
    single = run(batch, (0, 7), False)

    port = _free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    outs = [tmp_path / f"rank{r}.pt" for r in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(r), "2", str(port), str(outs[r])],
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

    ranks = [torch.load(o) for o in outs]
    assert set(ranks[0]) == set(single)
    for key, (val, grad) in single.items():
        for r in ranks:  # after all-reduce both ranks hold the same numbers
            torch.testing.assert_close(r[key][0], val, rtol=1e-12, atol=1e-14, msg=str(key))
            torch.testing.assert_close(r[key][1], grad, rtol=1e-12, atol=1e-14, msg=str(key))
    # the test can fail: averaging the shards' local results (no global counts) is wrong here
    local = [run(batch, rows, False) for rows in SHARDS]
    key = ("kl_loss", "token-mean", "reverse_kl")
    naive = (local[0][key][0] + local[1][key][0]) / 2
    assert abs(float(naive - single[key][0])) > 1e-3 * abs(float(single[key][0]))


if __name__ == "__main__":
    main()
