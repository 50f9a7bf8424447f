"""klest.rl.mismatch against exact values by enumeration, its standard errors by repeated sampling,
its numerics at the extremes, and the peers' metric sets against their formulas as written.

Policy for the sampling test (tests/conftest.py): fixed seeds; the coverage of ±2 SE intervals is
compared with its nominal 0.9545 within N_SIGMA binomial standard errors.

Enumeration: μ (sampler) and π (trainer) are two autoregressive categorical policies over V = 3
tokens, T = 3 steps, with random logits for every prefix; all 27 sequences are enumerated and each
expectation is Σ_y μ(y)·(the statistic on y alone), exact for every key that is a mean over
sequences of a per-sequence quantity (fixed length: the token means are sequence means / T).
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import klest.rl as rl  # noqa: E402
from klest import KlestError  # noqa: E402

V, T = 3, 3


def policies(seed: int = 7, scale: float = 0.8) -> dict:
    g = torch.Generator().manual_seed(seed)
    prefixes = [p for t in range(T) for p in itertools.product(range(V), repeat=t)]
    mu = {
        p: torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64), 0) for p in prefixes
    }
    pi = {
        p: torch.log_softmax(mu[p] + scale * torch.randn(V, generator=g, dtype=torch.float64), 0)
        for p in prefixes
    }
    seqs = list(itertools.product(range(V), repeat=T))
    lmu = torch.tensor(
        [[float(mu[y[:t]][y[t]]) for t in range(T)] for y in seqs], dtype=torch.float64
    )
    lpi = torch.tensor(
        [[float(pi[y[:t]][y[t]]) for t in range(T)] for y in seqs], dtype=torch.float64
    )
    prob = lmu.sum(1).exp()
    return {"mu": mu, "pi": pi, "seqs": seqs, "lmu": lmu, "lpi": lpi, "prob": prob}


def exact_targets(P: dict) -> dict[str, float]:
    """Expectations under μ, from the full next-token distributions (not from the estimators)."""
    mu, pi = P["mu"], P["pi"]
    kl_seq = float((P["prob"] * (P["lmu"].sum(1) - P["lpi"].sum(1))).sum())
    fwd = chi2 = 0.0
    for t in range(T):
        for pre in itertools.product(range(V), repeat=t):
            w_pre = math.exp(sum(float(mu[pre[:s]][pre[s]]) for s in range(t)))
            m, p = mu[pre].exp(), pi[pre].exp()
            fwd += w_pre * float((p * (pi[pre] - mu[pre])).sum())
            chi2 += w_pre * float((p * p / m).sum())
    seq_chi2 = float((P["lpi"].sum(1).exp() ** 2 / P["prob"]).sum()) - 1.0
    above = float((P["prob"][:, None] * ((P["lpi"] - P["lmu"]).exp() > 2)).sum()) / T
    below = float((P["prob"][:, None] * ((P["lpi"] - P["lmu"]).exp() < 0.5)).sum()) / T
    return {
        "token_kl": kl_seq / T,
        "token_kl_k1": kl_seq / T,
        "token_forward_kl": fwd / T,
        "token_chi2": chi2 / T - 1.0,
        "seq_kl": kl_seq,
        "seq_chi2": seq_chi2,
        "log_ppl_diff": -kl_seq / T,
        "frac_ratio_above_2": above,
        "frac_ratio_below_half": below,
    }


def test_every_mean_is_exact_by_enumeration() -> None:
    P = policies()
    exact = exact_targets(P)
    got = dict.fromkeys(exact, 0.0)
    for i in range(len(P["seqs"])):
        rep = rl.mismatch(P["lpi"][i : i + 1], P["lmu"][i : i + 1]).as_dict()
        for k in got:
            plus = 1.0 if k in ("token_chi2", "seq_chi2") else 0.0  # chi2 + 1 is the mean
            got[k] += float(P["prob"][i]) * (rep[k] + plus)
    got["token_chi2"] -= 1.0
    got["seq_chi2"] -= 1.0
    assert exact["frac_ratio_above_2"] > 0 and exact["frac_ratio_below_half"] > 0
    for k, v in exact.items():
        assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-15), k
    # the keys that are not means, on the whole support (every sequence once): the largest |L|
    # from the next-token tables, and the ESS of the weights against (Σw)² / (n Σw²)
    whole = rl.mismatch(P["lpi"], P["lmu"])
    mu, pi = P["mu"], P["pi"]
    assert whole.abs_log_ratio_max == max(float((pi[p] - mu[p]).abs().max()) for p in mu)
    ws = [
        math.exp(sum(float(pi[y[:t]][y[t]] - mu[y[:t]][y[t]]) for t in range(T))) for y in P["seqs"]
    ]
    ess = sum(ws) ** 2 / (len(ws) * sum(w * w for w in ws))
    assert whole.ess_seq == pytest.approx(ess, rel=1e-12)


def sample(P: dict, B: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.multinomial(P["prob"], B, replacement=True, generator=g)
    return P["lpi"][idx], P["lmu"][idx]


def test_standard_errors_cover() -> None:
    from conftest import N_SIGMA  # tests/conftest.py (this file is also a worker script)

    P = policies(seed=3, scale=0.6)
    exact = exact_targets(P)
    g = torch.Generator().manual_seed(2024)
    R, B = 400, 48
    keys = ("token_kl", "token_kl_k1", "token_forward_kl", "seq_kl", "log_ppl_diff")
    hits = dict.fromkeys(keys, 0)
    for _ in range(R):
        rep = rl.mismatch(*sample(P, B, g)).as_dict()
        for k in keys:
            hits[k] += abs(rep[k] - exact[k]) <= 2.0 * rep[k + "_stderr"]
    nominal = math.erf(2.0 / math.sqrt(2.0))
    band = N_SIGMA * math.sqrt(nominal * (1 - nominal) / R)
    for k in keys:
        assert abs(hits[k] / R - nominal) <= band, (k, hits[k] / R)


def reference(train: torch.Tensor, roll: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Plain float64 formulas on the valid tokens."""
    L = (train.double() - roll.double()).where(mask, torch.zeros((), dtype=torch.float64))
    n_b = mask.sum(1).double()
    has = n_b > 0
    Lv = L[mask]
    w = Lv.exp()
    k3 = torch.expm1(Lv) - Lv
    S = L.sum(1)[has]
    lse1, lse2 = torch.logsumexp(S, 0), torch.logsumexp(2 * S, 0)  # W may underflow
    N = float(mask.sum())
    return {
        "token_kl": float(k3.sum()) / N,
        "token_kl_k1": float(-Lv.sum()) / N,
        "token_forward_kl": float((Lv * w - torch.expm1(Lv)).sum()) / N,
        "token_chi2": float((w * w).mean() - 1),
        "seq_kl": float((torch.expm1(L) - L).sum(1)[has].mean()),
        "seq_chi2": float(torch.expm1(lse2 - math.log(S.numel()))),
        "ess_token": float(w.sum() ** 2 / (N * (w * w).sum())),
        "ess_seq": math.exp(float(2 * lse1 - lse2) - math.log(S.numel())),
        "log_ppl_diff": float((S / n_b[has]).mean()),
        "abs_log_ratio_max": float(Lv.abs().max()),
        "abs_log_ratio_p99": float(torch.quantile(Lv.abs(), 0.99)),
        "frac_ratio_above_2": float((w > 2).double().mean()),
        "frac_ratio_below_half": float((w < 0.5).double().mean()),
        "n_tokens": N,
        "n_sequences": float(has.sum()),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_match_float64_reference_with_padding(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(11)
    B, Tn = 37, 301
    roll = (-3 * torch.rand(B, Tn, generator=g, dtype=torch.float64)).to(dtype)
    train = (roll.double() + 0.4 * torch.randn(B, Tn, generator=g, dtype=torch.float64)).to(dtype)
    mask = torch.rand(B, Tn, generator=g) < 0.8
    mask[3] = False  # an empty row
    mask[5, 1:] = False  # a row of length 1
    # garbage in the padding is never read
    train_p = train.masked_fill(~mask & (torch.rand(B, Tn, generator=g) < 0.5), math.nan)
    roll_p = roll.masked_fill(~mask & (torch.rand(B, Tn, generator=g) < 0.5), -math.inf)
    rep = rl.mismatch(train_p, roll_p, mask).as_dict()
    ref = reference(train, roll, mask)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for k, v in ref.items():
        assert rep[k] == pytest.approx(v, rel=tol, abs=1e-15), k


def test_every_log_ratio_negative() -> None:
    # max L < 0: the log-space sums take their shifted path (e^L computed directly)
    g = torch.Generator().manual_seed(12)
    roll = -torch.rand(9, 40, generator=g, dtype=torch.float64)
    train = roll - 30.0 - torch.rand(9, 40, generator=g, dtype=torch.float64)
    mask = torch.rand(9, 40, generator=g) < 0.6
    rep = rl.mismatch(train, roll, mask).as_dict()
    for k, v in reference(train, roll, mask).items():
        assert rep[k] == pytest.approx(v, rel=1e-12, abs=1e-300), k


def test_no_clamp_and_honest_overflow() -> None:
    roll = torch.zeros(2, 3, dtype=torch.float64)
    train = torch.tensor([[30.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    rep = rl.mismatch(train, roll)
    # verl clamps Σ L at 20 (chi2_seq <= e^40 - 1); exact: (e^60 + 1)/2 - 1
    assert rep.seq_chi2 == pytest.approx((math.exp(60) + 1) / 2 - 1, rel=1e-12)
    assert rep.token_chi2 == pytest.approx((math.exp(60) + 5) / 6 - 1, rel=1e-12)
    train[0, 0] = 300.0  # e^600 is finite in float64
    assert rl.mismatch(train, roll).token_chi2 == pytest.approx(math.exp(600) / 6, rel=1e-12)
    train[0, 0] = 400.0  # e^800 is not: +inf, said honestly
    rep = rl.mismatch(train, roll)
    assert rep.token_chi2 == math.inf and rep.seq_chi2 == math.inf
    assert math.isfinite(rep.token_kl) and rep.token_kl == pytest.approx(
        (math.expm1(400.0) - 400.0) / 6, rel=1e-12
    )


def test_tiny_and_huge_mismatch() -> None:
    # χ² of near-identical policies keeps its digits (no cancellation of Σ w² against N)
    L = torch.tensor([[1e-9, -2e-9, 3e-9], [0.0, 5e-10, -1e-9]], dtype=torch.float64)
    rep = rl.mismatch(L, torch.zeros_like(L))
    chi2 = sum(math.expm1(2 * v) for v in L.flatten().tolist()) / 6
    assert rep.token_chi2 == pytest.approx(chi2, rel=1e-9)
    seq = sum(math.expm1(2 * float(r)) for r in L.sum(1)) / 2
    assert rep.seq_chi2 == pytest.approx(seq, rel=1e-9)
    # e^L overflows float64 at L = 1e4: the forward KL is +inf (not inf − inf = NaN)
    rep = rl.mismatch(torch.tensor([[1e4, 0.0], [0.0, 0.0]]), torch.zeros(2, 2))
    assert rep.token_forward_kl == math.inf and rep.token_kl == math.inf
    assert rep.ess_token == pytest.approx(0.25) and rep.token_kl_k1 == -2500.0
    rep = rl.mismatch(torch.tensor([[-1e4, 0.0], [0.0, 0.0]]), torch.zeros(2, 2))
    assert rep.token_kl == pytest.approx((1e4 - 1) / 4) and rep.token_forward_kl == 0.25
    assert rep.frac_ratio_below_half == 0.25 and rep.seq_chi2 == -0.5


def test_infinite_kl_when_trainer_gives_probability_zero() -> None:
    roll = torch.full((2, 2), -1.0)
    train = torch.tensor([[-math.inf, -1.0], [-1.2, -0.9]])
    rep = rl.mismatch(train, roll)
    assert rep.token_kl == math.inf and rep.seq_kl == math.inf and rep.token_kl_k1 == math.inf
    assert rep.abs_log_ratio_max == math.inf
    # forward KL term r log r − (r − 1) -> 1 at r = 0; χ² stays finite
    L = torch.tensor([-0.2, 0.1], dtype=torch.float64)
    fwd = (1.0 + float((L * L.exp() - torch.expm1(L)).sum())) / 4
    assert rep.token_forward_kl == pytest.approx(fwd, rel=1e-6)
    assert rep.token_chi2 == pytest.approx((math.exp(-0.4) + 1 + math.exp(0.2)) / 4 - 1, rel=1e-6)
    assert rep.frac_ratio_below_half == 0.25  # w = 0 < 1/2
    with pytest.raises(KlestError, match="rollout_logp"):
        rl.mismatch(roll, train)


def test_all_masked_and_one_sequence() -> None:
    x = torch.zeros(2, 3)
    rep = rl.mismatch(x, x, torch.zeros(2, 3, dtype=torch.bool))
    assert rep.n_tokens == 0 and math.isnan(rep.token_kl)
    rep = rl.mismatch(torch.tensor([[-0.5]]), torch.tensor([[-1.0]]))
    assert rep.token_kl == pytest.approx(math.expm1(0.5) - 0.5, rel=1e-6)
    assert math.isnan(rep.token_kl_stderr)  # one sequence: no estimate of the spread
    assert rep.ess_seq == 1.0 and rep.ess_token == 1.0


def test_p99_exact_on_structured_data() -> None:
    # a periodic pattern defeats the strided sample: the exact fallback must still be right
    L = torch.zeros(64, 1000, dtype=torch.float64)
    L[:, ::16] = torch.linspace(0.1, 5.0, 64, dtype=torch.float64)[:, None]
    rep = rl.mismatch(L, torch.zeros_like(L))
    assert rep.abs_log_ratio_p99 == pytest.approx(float(torch.quantile(L.abs().flatten(), 0.99)))


# ----------------------------------------------------------------------------------- peers


def masked_mean_verl(v, m, axis=None):
    num = (
        (torch.where(m.bool(), v, 0.0) * m).sum(dim=axis)
        if axis is not None
        else (torch.where(m.bool(), v, 0.0) * m).sum()
    )
    den = m.sum(dim=axis) if axis is not None else m.sum()
    return num / (den + 1e-8)


def batch(seed: int = 5, big: bool = False):
    g = torch.Generator().manual_seed(seed)
    roll = -3 * torch.rand(4, 6, generator=g)
    train = roll + 0.3 * torch.randn(4, 6, generator=g)
    if big:
        train[0, 0] += 25.0  # |L| > 20: the peers' clamps bind
    m = torch.ones(4, 6)
    m[1, 4:] = 0
    m[2, 2:] = 0
    return train, roll, m


@pytest.mark.parametrize("big", [False, True])
def test_verl_metric_set(big: bool) -> None:
    # verl 0.9.1 trainer/ppo/rollout_corr_helper.py::compute_offpolicy_metrics
    tr, ro, m = batch(big=big)
    L = tr - ro
    mtr, mro = masked_mean_verl(tr, m, -1), masked_mean_verl(ro, m, -1)
    d = mro - mtr
    S = (torch.where(m.bool(), L, 0.0) * m).sum(-1)
    ref = {
        "training_ppl": torch.exp(-mtr).mean(),
        "training_log_ppl": (-mtr).mean(),
        "kl": masked_mean_verl(ro - tr, m),
        "k3_kl": masked_mean_verl(torch.exp(L) - L - 1, m),
        "rollout_ppl": torch.exp(-mro).mean(),
        "rollout_log_ppl": (-mro).mean(),
        "log_ppl_diff": d.mean(),
        "log_ppl_abs_diff": d.abs().mean(),
        "log_ppl_diff_max": d.max(),
        "log_ppl_diff_min": d.min(),
        "ppl_ratio": torch.exp(d).mean(),
        "chi2_token": masked_mean_verl(torch.exp(L.clamp(-20, 20)) ** 2, m) - 1,
        "chi2_seq": torch.exp(2 * S.clamp(-20, 20)).mean() - 1,
    }
    got = rl.mismatch(tr, ro, m, names="verl@0.9.1")
    out = got.as_dict()
    for k, v in ref.items():
        assert out["rollout_corr/" + k] == pytest.approx(float(v), rel=1e-6), k
    flags = {k: out[f"rollout_corr/{k}.clamped"] for k in ("chi2_token", "chi2_seq")}
    assert flags == ({"chi2_token": 1.0, "chi2_seq": 1.0} if big else dict.fromkeys(flags, 0.0))
    assert rl.mismatch(tr, ro, m, names="verl").names == "verl@0.9.1"
    # sign convention: verl's log_ppl_diff (mean log μ − mean log π) is minus klest's
    own = rl.mismatch(tr.double(), ro.double(), m.bool())
    assert out["rollout_corr/log_ppl_diff"] == pytest.approx(-own.log_ppl_diff, rel=1e-5)
    if big:  # klest's own χ² is not clamped
        assert (
            rl.mismatch(tr.double(), ro.double(), m.bool()).seq_chi2 > out["rollout_corr/chi2_seq"]
        )


def test_slime_metric_set() -> None:
    # slime v0.3.1 examples/train_infer_mismatch_helper/mis.py::add_ppl_metrics, per sample,
    # reduced by sum_of_sample_mean (Σ x·m / max(Σ m, 1) per row), averaged over rows
    tr, ro, m = batch()
    B = tr.shape[0]
    n = m.sum(-1).clamp(min=1)

    def rmean(x):
        return (x * m).sum(-1) / n

    L = tr - ro
    d = rmean(ro) - rmean(tr)
    ref = {
        "mis_training_log_ppl": (-rmean(tr)).sum() / B,
        "mis_training_ppl": torch.exp(-rmean(tr)).sum() / B,
        "mis_kl": rmean(ro - tr).sum() / B,
        "mis_k3_kl": rmean(torch.exp(L) - L - 1).sum() / B,
        "mis_log_ppl_diff": d.sum() / B,
        "mis_ppl_ratio": torch.exp(d).sum() / B,
        "mis_chi2_token": (rmean(torch.exp(L.clamp(-20, 20)) ** 2) - 1).sum() / B,
        "mis_chi2_seq": (torch.exp(2 * (L * m).sum(-1).clamp(-20, 20)) - 1).sum() / B,
        "train_rollout_logprob_abs_diff": rmean((tr - ro).abs()).sum() / B,
    }
    out = rl.mismatch(tr, ro, m, names="slime@0.3.1").as_dict()
    for k, v in ref.items():
        assert out[k] == pytest.approx(float(v), rel=1e-6), k
    # slime's masked sum is Σ x·m: NaN in padding reaches its value (klest's own keys ignore it)
    tr_nan = tr.masked_fill(m == 0, math.nan)
    assert math.isnan(rl.mismatch(tr_nan, ro, m, names="slime@0.3.1").as_dict()["mis_kl"])
    assert math.isfinite(rl.mismatch(tr_nan, ro, m.bool()).token_kl)


@pytest.mark.parametrize(
    "mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
)
def test_trl_metric_set(mode: str) -> None:
    # TRL 1.16.0 GRPOTrainer._generate_and_score_completions, clip_max 3.0, clip_min None
    tr, ro, m = batch(seed=9)
    tr = tr.clone()
    tr[0, 1] += 1.5  # a ratio above 3
    delta = (tr - ro).abs()[m.bool()]
    diff = torch.nan_to_num((tr - ro) * m, nan=0.0)
    seq = mode.startswith("sequence")
    ratio = torch.exp(diff.sum(-1, keepdim=True) if seq else diff)
    if mode.endswith("truncate"):
        ratio = ratio.clamp(max=3.0)
    else:
        ratio = ratio.masked_fill(ratio > 3.0, 0.0)
    flat = ratio.flatten() if seq else ratio[m.bool()]
    out = rl.mismatch(tr, ro, m, names=f"trl@1.16.0:{mode}").as_dict()
    ref = {
        "sampling/sampling_logp_difference/mean": delta.mean(),
        "sampling/sampling_logp_difference/max": delta.max(),
        "sampling/importance_sampling_ratio/min": flat.min(),
        "sampling/importance_sampling_ratio/mean": flat.mean(),
        "sampling/importance_sampling_ratio/max": flat.max(),
    }
    for k, v in ref.items():
        assert out[k] == pytest.approx(float(v), rel=1e-6), k
    if mode == "token_truncate":
        assert out["sampling/importance_sampling_ratio/max.clamped"] == 1.0


def test_unknown_names() -> None:
    x = torch.zeros(1, 2)
    with pytest.raises(KlestError, match="names"):
        rl.mismatch(x, x, names="verl@0.1")


# ------------------------------------------------------------------------ data parallelism

SHARDS = ((0, 5), (5, 12))


def dp_batch():
    g = torch.Generator().manual_seed(77)
    roll = -3 * torch.rand(12, 50, generator=g, dtype=torch.float64)
    train = roll + 0.5 * torch.randn(12, 50, generator=g, dtype=torch.float64)
    mask = torch.rand(12, 50, generator=g) < 0.7
    mask[6] = False
    return train, roll, mask


def _worker() -> None:
    import torch.distributed as dist

    rank, world, port, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        tr, ro, m = dp_batch()
        lo, hi = SHARDS[rank]
        rep = rl.mismatch(tr[lo:hi], ro[lo:hi], m[lo:hi])
        if rank == 0:
            torch.save(rep.as_dict(), path)
    finally:
        dist.destroy_process_group()


def test_group_reduction_equals_one_process(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.pt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), "2", str(port), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    for p in procs:
        text, _ = p.communicate(timeout=120)
        assert p.returncode == 0, text.decode()
    got = torch.load(out)
    want = rl.mismatch(*dp_batch()).as_dict()
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-15), k


if __name__ == "__main__":
    _worker()
