"""klest.rl.importance_weights: every level and mode against a float64 reference (products of
Python floats), the edge cases, and each peer's correction against its released formula.

The peer references are the formulas read in the released code (file and release in each test),
rewritten here as plain torch; where the peer's own numerics fail (a ±20 clamp, an overflow
mapped to 0, float32 underflow), the test shows the peer's value next to klest's exact one.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import klest.rl as rl  # noqa: E402
from klest import KlestError  # noqa: E402


def data(seed: int = 1, B: int = 5, T: int = 7, scale: float = 0.6):
    g = torch.Generator().manual_seed(seed)
    roll = -2 * torch.rand(B, T, generator=g, dtype=torch.float64)
    train = roll + scale * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[0] = True
    mask[2, 1:] = False  # length 1
    mask[3] = False  # empty
    return train, roll, mask


def ref_weights(train, roll, mask, level, mode, low, high):
    """Float64 Python products, token by token."""
    B, T = train.shape
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        r = [math.exp(float(train[b, t] - roll[b, t])) for t in range(T)]
        prod = math.prod(r[t] for t in idx) if idx else 1.0
        geo = prod ** (1.0 / len(idx)) if idx else 1.0
        run = 1.0
        for t in range(T):
            if not mask[b, t]:
                continue
            run *= r[t]
            w = {"token": r[t], "sequence": prod, "geometric": geo, "prefix": run}[level]
            lo = 0.0 if low is None else low
            hi = math.inf if high is None else high
            if mode == "truncate":
                w = min(w, hi)
            elif mode == "clip":
                w = min(max(w, lo), hi)
            elif mode == "mask":
                w = w if (low is None or w >= low) and w <= hi else 0.0
            out[b][t] = w
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("level", ["token", "sequence", "geometric", "prefix"])
@pytest.mark.parametrize(
    ("mode", "low", "high"),
    [
        ("truncate", None, 1.5),
        ("clip", 0.7, 1.5),
        ("clip", 0.0, 1.3),
        ("mask", 0.6, 1.6),
        ("mask", None, 1.2),
        ("none", None, None),
    ],
)
def test_levels_and_modes_against_float64(level, mode, low, high) -> None:
    train, roll, mask = data()
    iw = rl.importance_weights(train, roll, mask, level=level, mode=mode, low=low, high=high)
    ref = ref_weights(train, roll, mask, level, mode, low, high)
    assert iw.weights.dtype == torch.float64
    torch.testing.assert_close(iw.weights, ref, rtol=1e-13, atol=0.0)
    assert bool((iw.weights[~mask] == 0).all())
    assert bool(torch.isfinite(iw.weights).all())
    assert torch.equal(iw.keep, mask & ((ref > 0) | (mode != "mask")))


def test_300_tokens_at_0_7() -> None:
    x = torch.full((1, 300), math.log(0.7), dtype=torch.float64)
    z = torch.zeros(1, 300, dtype=torch.float64)
    iw = rl.importance_weights(x, z, level="sequence", mode="none")
    assert float(iw.weights[0, 0]) == pytest.approx(0.7**300, rel=1e-12)  # 3.4e-47, not 0
    # float32 input: 3.4e-47 is below float32's smallest number (1.4e-45): 0, counted; the
    # log-weight stays exact and dtype=float64 gives the value
    iw32 = rl.importance_weights(x.float(), z.float(), level="sequence", mode="none")
    assert iw32.weights.dtype == torch.float32 and float(iw32.weights[0, 0]) == 0.0
    assert iw32.stats.n_underflow == 300
    assert float(iw32.log_weights[0, 0]) == pytest.approx(300 * float(x.float()[0, 0]), rel=1e-12)
    iw64 = rl.importance_weights(
        x.float(), z.float(), level="sequence", mode="none", dtype=torch.float64
    )
    assert float(iw64.weights[0, 0]) == pytest.approx(
        math.exp(300 * float(x.float()[0, 0])), rel=1e-12
    )


def test_truncate_e_1_5_at_3_and_low_zero() -> None:
    L = torch.tensor([[1.5, 0.2, -3.0]])
    iw = rl.importance_weights(L, torch.zeros_like(L), high=3.0)
    assert torch.equal(iw.weights, torch.tensor([[3.0, math.exp(0.2), math.exp(-3.0)]]))
    assert iw.stats.tokens_clipped == 1 and iw.stats.sequences_clipped == 1
    w = torch.exp(L[0].double())  # the float32 inputs, exactly
    assert iw.stats.mass_clipped == pytest.approx(float(w[0] / w.sum()), rel=1e-12)
    iw0 = rl.importance_weights(L, torch.zeros_like(L), mode="clip", low=0.0, high=3.0)
    assert torch.equal(iw0.weights, iw.weights)
    m0 = rl.importance_weights(L, torch.zeros_like(L), mode="mask", low=0.0, high=3.0)
    assert torch.equal(m0.keep, torch.tensor([[False, True, True]]))
    assert m0.stats.tokens_masked == 1


def test_all_masked_nan_inf_padding_and_refusals() -> None:
    train, roll, mask = data(seed=4)
    clean = rl.importance_weights(
        train, roll, mask, level="sequence", mode="clip", low=0.5, high=2.0
    )
    dirty_t = train.masked_fill(~mask, math.nan)
    dirty_r = roll.masked_fill(~mask, -math.inf)
    dirty = rl.importance_weights(
        dirty_t, dirty_r, mask, level="sequence", mode="clip", low=0.5, high=2.0
    )
    assert torch.equal(clean.weights, dirty.weights)
    none = rl.importance_weights(train, roll, torch.zeros_like(mask), level="prefix")
    assert bool((none.weights == 0).all()) and none.stats.n_tokens == 0
    with pytest.raises(KlestError, match="dtype"):  # e^100 does not fit float32: refused
        rl.importance_weights(
            torch.full((1, 2), 50.0), torch.zeros(1, 2), level="sequence", mode="none"
        )
    with pytest.raises(KlestError, match="low"):
        rl.importance_weights(train, roll, mode="truncate", low=0.5)
    with pytest.raises(KlestError, match="rollout_logp"):
        rl.importance_weights(train, roll.masked_fill(torch.ones_like(mask), math.nan))
    # wrong types: a KlestError naming the argument, never a raw TypeError/ValueError
    for kw, arg in (
        ({"mode": "clip", "low": "0.5"}, "low"),
        ({"high": "abc"}, "high"),
        ({"high": [1.0]}, "high"),
        ({"batch_normalize": "yes"}, "batch_normalize"),
    ):
        with pytest.raises(KlestError, match=arg):
            rl.importance_weights(train, roll, **kw)


def test_batch_normalize() -> None:
    train, roll, mask = data(seed=6)
    for level in ("token", "sequence"):
        iw = rl.importance_weights(train, roll, mask, level=level, high=2.0, batch_normalize=True)
        if level == "token":
            assert float(iw.weights[mask].mean()) == pytest.approx(1.0, rel=1e-12)
        else:
            has = mask.any(1)
            first = iw.weights[has].max(dim=1).values
            assert float(first.mean()) == pytest.approx(1.0, rel=1e-12)


def test_ess_stats() -> None:
    train, roll, mask = data(seed=8, scale=1.0)
    iw = rl.importance_weights(train, roll, mask, high=1.5)
    w = (train - roll)[mask].exp()
    wc = w.clamp(max=1.5)
    assert iw.stats.ess_before == pytest.approx(float(w.sum() ** 2 / (w.numel() * (w * w).sum())))
    assert iw.stats.ess_after == pytest.approx(float(wc.sum() ** 2 / (w.numel() * (wc * wc).sum())))


# ---------------------------------------------------------------------------------- peers


def peer_batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    roll = -2 * torch.rand(6, 8, generator=g)
    train = roll + 0.5 * torch.randn(6, 8, generator=g)
    m = torch.ones(6, 8)
    m[1, 5:] = 0
    m[4, 2:] = 0
    return train, roll, m


def close(got, ref, m):
    torch.testing.assert_close(got.float() * m, (ref * m).float(), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize(
    "mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
)
def test_trl(mode) -> None:
    # TRL 1.16.0 trainer/grpo_trainer.py: diff = (old − sampling)·mask, nan_to_num; exp of it (or
    # of its row sum); *_truncate clamp(min=clip_min, max=3.0), *_mask zero outside [-inf, 3.0]
    tr, ro, m = peer_batch()
    diff = torch.nan_to_num((tr - ro) * m, nan=0.0)
    lw = diff.sum(-1, keepdim=True) if mode.startswith("seq") else diff
    ratio = torch.exp(lw)
    ratio = (
        ratio.clamp(max=3.0) if mode.endswith("truncate") else ratio.masked_fill(ratio > 3.0, 0.0)
    )
    iw = rl.importance_weights(tr, ro, m, preset=f"trl@1.16.0:{mode}")
    close(iw.weights, ratio.expand_as(tr), m)


def test_trl_float32_underflow() -> None:
    # where TRL's numerics fail: exp of a float32 sum of 300 × log 0.7 is 0 (klest: log_weights)
    x = torch.full((1, 300), math.log(0.7))
    ratio = torch.exp((x * 1.0).sum(-1, keepdim=True))
    assert float(ratio) == 0.0
    iw = rl.importance_weights(x, torch.zeros_like(x), preset="trl@1.16.0:sequence_truncate")
    assert float(iw.log_weights[0, 0]) == pytest.approx(300 * float(x[0, 0]), rel=1e-12)


@pytest.mark.parametrize("kind", ["tis", "icepop", "seq-mask-tis"])
def test_openrlhf(kind) -> None:
    # OpenRLHF 0.11.2 models/loss.py PolicyLoss: token_is = exp(old − rollout); stat = token_is, or
    # exp(masked_mean(log ratio)) per row for seq; clip: clamp(stat, low, high); mask: keep iff
    # low <= stat <= high, coef = where(keep, token_is, 0); threshold default [0.5, 5.0]
    tr, ro, m = peer_batch()
    lr = tr - ro
    tok = lr.exp()
    if kind == "tis":
        ref = tok.clamp(0.5, 5.0)
    else:
        stat = tok if kind == "icepop" else ((lr * m).sum(-1) / m.sum(-1)).exp().unsqueeze(-1)
        ref = torch.where((stat >= 0.5) & (stat <= 5.0), tok, 0.0)
    close(rl.importance_weights(tr, ro, m, preset=f"openrlhf@0.11.2:{kind}").weights, ref, m)


def test_openrlhf_overflow() -> None:
    # OpenRLHF: exp(L) unclamped -> inf for L = 100 in float32 inside a kept row; klest refuses
    # to return inf (float64 weights or log_weights say the value)
    tr = torch.zeros(1, 1000)
    tr[0, 0] = 100.0
    assert torch.isinf(tr.exp()).any()
    with pytest.raises(KlestError, match="dtype"):
        rl.importance_weights(tr, torch.zeros_like(tr), preset="openrlhf@0.11.2:seq-mask-tis")
    iw = rl.importance_weights(
        tr, torch.zeros_like(tr), preset="openrlhf@0.11.2:seq-mask-tis", dtype=torch.float64
    )
    assert float(iw.weights[0, 0]) == pytest.approx(math.exp(100.0), rel=1e-12)


@pytest.mark.parametrize("kind", ["tis", "icepop", "seq-mask-tis"])
def test_nemo_rl(kind) -> None:
    # NeMo-RL 0.7.0 algorithms/loss/loss_functions.py: w = nan_to_num(exp(prev − gen), nan=0,
    # posinf=0, neginf=0); tis clamp(min=ratio_min or 0, max=ratio); icepop zero outside
    # [min, max]; seq-mask-tis rows kept iff exp(masked_mean(log ratio, token_mask)) in [min, max]
    tr, ro, m = peer_batch()
    lo, hi = 0.7, 1.6
    w = torch.nan_to_num(torch.exp(tr - ro), nan=0.0, posinf=0.0, neginf=0.0)
    if kind == "tis":
        ref = w.clamp(min=lo, max=hi)
    elif kind == "icepop":
        ref = torch.where((w >= lo) & (w <= hi), w, 0.0)
    else:
        geo = torch.exp(((tr - ro) * m).sum(-1) / (m.sum(-1) + 1e-8))
        ref = w * ((geo >= lo) & (geo <= hi)).float().unsqueeze(-1)
    got = rl.importance_weights(tr, ro, m, preset=f"nemo_rl@0.7.0:{kind}", low=lo, high=hi)
    close(got.weights, ref, m)
    with pytest.raises(KlestError, match="high"):
        rl.importance_weights(tr, ro, m, preset=f"nemo_rl@0.7.0:{kind}", low=lo)


def test_nemo_rl_overflow_becomes_zero() -> None:
    # where NeMo-RL's numerics fail: an overflowing ratio is mapped to 0 by nan_to_num(posinf=0)
    # before the truncation, so "tis" gives weight 0 where it should give the cap
    L = torch.tensor([[100.0, 0.0]])
    nemo = torch.nan_to_num(torch.exp(L), posinf=0.0).clamp(min=0.0, max=2.0)
    assert float(nemo[0, 0]) == 0.0
    got = rl.importance_weights(L, torch.zeros_like(L), preset="nemo_rl@0.7.0:tis", high=2.0)
    assert float(got.weights[0, 0]) == 2.0


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("normalize", [False, True])
def test_verl_rollout_is(level, normalize) -> None:
    # verl 0.9.1 trainer/ppo/rollout_corr_helper.py::compute_rollout_correction_weights:
    # token exp(clamp(L, ±20)), sequence exp(clamp(masked_sum L, ±20)); ·mask; clamp(max=2.0);
    # batch normalise by the masked mean (token) or the mean over valid rows (sequence)
    tr, ro, m = peer_batch(seed=12)
    L = tr - ro
    if level == "token":
        raw = torch.exp(L.clamp(-20, 20)) * m
    else:
        raw = torch.exp((L * m).sum(-1, keepdim=True).clamp(-20, 20)).expand_as(L) * m
    w = raw.clamp(max=2.0)
    if normalize:
        if level == "token":
            mean = (w * m).sum() / (m.sum() + 1e-8)
        else:
            seqw = (w * m).sum(-1) / (m.sum(-1) + 1e-8)
            has = (m.sum(-1) > 0).float()
            mean = (seqw * has).sum() / has.sum()
        w = w / mean
    got = rl.importance_weights(
        tr, ro, m, preset=f"verl@0.9.1:rollout_is:{level}", batch_normalize=normalize
    )
    close(got.weights, w, m)


def test_verl_icepop_and_clamp_floor() -> None:
    tr, ro, m = peer_batch(seed=13)
    raw = torch.exp((tr - ro).clamp(-20, 20)) * m
    ref = torch.where((raw >= 0.5) & (raw <= 1.5), raw, 0.0)  # "0.5_1.5": IcePop
    got = rl.importance_weights(tr, ro, m, preset="verl@0.9.1:rollout_is:token", low=0.5, high=1.5)
    close(got.weights, ref, m)
    # verl's SAFETY_BOUND floors a sequence weight at e^-20 = 2e-9; the exact 0.7^300 is 3e-47
    x = torch.full((1, 300), math.log(0.7), dtype=torch.float64)
    verl = torch.exp((x.sum(-1)).clamp(-20, 20))
    exact = rl.importance_weights(x, torch.zeros_like(x), preset="verl@0.9.1:rollout_is:sequence")
    assert float(verl) == pytest.approx(math.exp(-20))
    assert float(exact.weights[0, 0]) == pytest.approx(0.7**300, rel=1e-12)


@pytest.mark.parametrize(
    "option",
    [
        "token_k1",
        "token_k2",
        "token_k3",
        "seq_sum_k1",
        "seq_sum_k3",
        "seq_mean_k1",
        "seq_mean_k2",
        "seq_max_k2",
        "seq_max_k3",
    ],
)
def test_verl_rollout_rs(option) -> None:
    # compute_rollout_rejection_mask: k1 = −L', k2 = ½L'², k3 = e^L' − 1 − L' with L' = clamp(L,
    # ±20); k1 options keep log(lower) <= stat <= log(upper) (lower = 1/upper by default), the
    # others stat <= upper; seq_sum / seq_mean (÷ Σm + 1e-8) / seq_max over valid tokens
    tr, ro, m = peer_batch(seed=21)
    L = (tr - ro).clamp(-20, 20)
    stats = {"k1": -L, "k2": 0.5 * L**2, "k3": torch.exp(L) - 1 - L}
    k = option[-2:]
    v = stats[k]
    if option.startswith("seq_sum"):
        v = (torch.where(m.bool(), v, 0.0) * m).sum(-1, keepdim=True)
    elif option.startswith("seq_mean"):
        v = (torch.where(m.bool(), v, 0.0) * m).sum(-1, keepdim=True) / (
            m.sum(-1, keepdim=True) + 1e-8
        )
    elif option.startswith("seq_max"):
        v = v.masked_fill(~m.bool(), -math.inf).max(-1, keepdim=True).values
    hi = {"k1": 1.3, "k2": 0.05, "k3": 0.05}[k] * (3 if option.startswith("seq_sum") else 1)
    keep = (v >= math.log(1 / hi)) & (v <= math.log(hi)) if k == "k1" else v <= hi
    keep = keep.expand_as(L) & m.bool()
    got = rl.importance_weights(tr, ro, m, preset=f"verl@0.9.1:rollout_rs:{option}", high=hi)
    assert torch.equal(got.keep, keep)
    assert torch.equal(got.weights, keep.float())


def test_verl_k1_bounds_are_inverted_ratios() -> None:
    # verl compares k1 = −L with log(lower), log(upper): "0.1_1.2" keeps w = e^L in [1/1.2, 10]
    L = torch.tensor([[math.log(5.0), math.log(1.1), math.log(0.5)]])
    got = rl.importance_weights(
        L, torch.zeros_like(L), preset="verl@0.9.1:rollout_rs:token_k1", low=0.1, high=1.2
    )
    assert got.keep.tolist() == [[True, True, False]]


@pytest.mark.parametrize("kind", ["token_tis", "sequence_tis", "geometric_mask", "product_mask"])
def test_skyrl(kind) -> None:
    # SkyRL 0.3.0 backends/skyrl_train/utils/off_policy_correction_utils.py, safe_exp_delta(clip=20)
    # in float32: token min(w, 2.0); sequence min(exp(Σ L·m), 5.0); geometric mask keeps rows with
    # exp(Σ L·m / max(Σ m, 1)) in [0.99, 1.01]; product mask exp(Σ L·m) in [0.5, 2.0]
    tr, ro, m = peer_batch(seed=30)
    tr = ro + 0.02 * (tr - ro)  # small log-ratios so that the geometric band matters
    L = tr - ro

    def sexp(x):
        return torch.clamp(x.float(), -20, 20).exp()

    if kind == "token_tis":
        ref = sexp(L).clamp(max=2.0)
    elif kind == "sequence_tis":
        ref = sexp((L * m).sum(-1, keepdim=True)).clamp(max=5.0).expand_as(L)
    elif kind == "geometric_mask":
        geo = sexp((L * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1))
        ref = ((geo >= 0.99) & (geo <= 1.01)).float().expand_as(L)
    else:
        s = sexp((L * m).sum(-1, keepdim=True))
        ref = ((s >= 0.5) & (s <= 2.0)).float().expand_as(L)
    close(rl.importance_weights(tr, ro, m, preset=f"skyrl@0.3.0:{kind}").weights, ref, m)


@pytest.mark.parametrize(
    "name",
    [
        "token:mask:ratio",
        "token:clamp:kl_k2",
        "sequence:mask:ratio:mean",
        "sequence:mask:ratio:sum",
        "sequence:mask:ratio:max",
        "sequence:mask:kl_k3:max",
        "sequence:mask:kl_k1:mean",
        "sequence:clamp:ratio:mean",
        "sequence:clamp:kl_k2:sum",
    ],
)
def test_areal(name) -> None:
    # AReaL 1.0.4 utils/functional/functional.py::apply_rejection_sampling with
    # RejectionSamplingConfig(upper=1.4, lower=0.8): metric ratio = e^L, kl_k1 = L, kl_k2 = L²/2,
    # kl_k3 = e^{−L} − 1 + L; sequence ratio metrics aggregate log ratios (sum, mean, max) and
    # use the geometric mean as the weight; clamp clips the weight (at token level always, at
    # sequence level in rejected rows only) to [lower, upper]
    tr, ro, m = peer_batch(seed=40)
    lo, hi = 0.8, 1.4
    L = tr - ro
    mb = m.bool()
    level, action, metric, *agg = name.split(":")
    metric_v = {"ratio": L.exp(), "kl_k1": L, "kl_k2": L**2 / 2, "kl_k3": (-L).exp() - 1 + L}[
        metric
    ]
    w = L.exp()
    if level == "token":
        if action == "mask":
            keep = (metric_v >= lo) & (metric_v <= hi)
            ref = torch.where(keep & mb, w, 0.0)
        else:
            ref = w.clamp(min=lo, max=hi)
    else:
        n = m.sum(-1, keepdim=True).clamp(min=1)
        vals = L if metric == "ratio" else metric_v
        masked = torch.where(mb, vals, 0.0)
        if metric == "ratio":
            w = torch.exp(masked.sum(-1, keepdim=True) / n).expand_as(L)
        a = agg[0]
        if a == "sum":
            s = masked.sum(-1, keepdim=True)
        elif a == "mean":
            s = masked.sum(-1, keepdim=True) / n
        else:
            s = vals.masked_fill(~mb, -math.inf).max(-1, keepdim=True).values
        s = s.exp() if metric == "ratio" else s
        inb = ((s >= lo) & (s <= hi)).expand_as(L)
        if action == "mask":
            ref = torch.where(inb & mb, w, 0.0)
        else:
            ref = torch.where(inb, w, w.clamp(min=lo, max=hi))
    got = rl.importance_weights(tr, ro, m, preset=f"areal@1.0.4:{name}", low=lo, high=hi)
    close(got.weights, ref, m)


def test_unknown_preset() -> None:
    x = torch.zeros(1, 2)
    with pytest.raises(KlestError, match="preset"):
        rl.importance_weights(x, x, preset="trl:token_mask")
