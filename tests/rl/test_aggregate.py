"""Aggregation: masked equals the kept subset, empty masks, consistency with the fused loss."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import klest.rl as rl  # noqa: E402
from klest import KlestError  # noqa: E402

F64 = torch.float64


def _data(seed, B=5, T=9):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[1] = False  # an empty row
    mask[0, 0] = True
    return x, mask


def _kept_reference(x, mask, mode, horizon=None):
    rows = [x[b][mask[b]] for b in range(x.shape[0])]
    kept = [r for r in rows if r.numel()]
    flat = torch.cat(rows)
    if mode == "token-mean":
        return flat.mean()
    if mode == "seq-mean-token-mean":
        return torch.stack([r.mean() for r in kept]).mean()
    if mode == "seq-mean-token-sum":
        return torch.stack([r.sum() for r in kept]).mean()
    if mode == "seq-mean-token-sum-norm":
        return flat.sum() / (len(kept) * (horizon or x.shape[1]))  # verl: non-empty rows
    return flat.sum()


@pytest.mark.parametrize("mode", rl.AGGREGATIONS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_equals_kept_subset(mode, seed):
    x, mask = _data(seed)
    torch.testing.assert_close(rl.aggregate(x, mask, mode), _kept_reference(x, mask, mode))
    # whatever the masked positions hold (NaN, inf), nothing leaks into value or gradient
    poisoned = torch.where(mask, x, torch.tensor(float("nan"), dtype=F64)).requires_grad_(True)
    poisoned.data[~mask & (torch.arange(x.shape[1]) % 2 == 0)] = float("inf")
    out = rl.aggregate(poisoned, mask, mode)
    torch.testing.assert_close(out, _kept_reference(x, mask, mode))
    out.backward()
    assert torch.isfinite(poisoned.grad).all()
    assert (poisoned.grad[~mask] == 0).all()


def test_no_mask_is_all_valid_and_horizon():
    x, _ = _data(3)
    full = torch.ones_like(x, dtype=torch.bool)
    for mode in rl.AGGREGATIONS:
        torch.testing.assert_close(rl.aggregate(x, None, mode), rl.aggregate(x, full, mode))
    torch.testing.assert_close(
        rl.aggregate(x, None, "seq-mean-token-sum-norm", horizon=100), x.sum() / (5 * 100)
    )
    torch.testing.assert_close(rl.aggregate(x, None, "token-mean"), x.mean())
    one_d = torch.arange(4.0)
    torch.testing.assert_close(rl.aggregate(one_d, None, "token-mean"), torch.tensor(1.5))


@pytest.mark.parametrize("mode", rl.AGGREGATIONS)
def test_empty_mask_gives_zero_without_nan(mode):
    x = torch.full((3, 4), float("nan"), dtype=F64, requires_grad=True)
    out = rl.aggregate(x, torch.zeros(3, 4, dtype=torch.bool), mode)
    assert out.item() == 0.0
    out.backward()
    assert (x.grad == 0).all()
    # through the fused loss, with padding that holds NaN and -inf
    logp = torch.full((3, 4), float("nan"), dtype=F64, requires_grad=True)
    ref = torch.full((3, 4), -math.inf, dtype=F64)
    for gradient in rl.GRADIENTS:
        if gradient == "none":
            continue
        res = rl.kl_loss(logp, ref, mask=torch.zeros(3, 4), aggregation=mode, gradient=gradient)
        assert res.loss.item() == 0.0
        (g,) = torch.autograd.grad(res.loss, logp)
        assert (g == 0).all()
        d = res.diagnostics
        assert d is not None
        assert all(math.isfinite(v) for v in d.as_dict().values())
        assert d.as_dict()["kl/n_tokens"] == 0


@pytest.mark.parametrize("mode", rl.AGGREGATIONS)
@pytest.mark.parametrize(
    "gradient", ["reverse_kl", "forward_kl", "as_written", "sequence_reverse_kl"]
)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "forward_k3", "squared_hellinger"])
def test_fused_loss_equals_per_token_then_aggregate(mode, gradient, estimator):
    g = torch.Generator().manual_seed(7)
    logp0 = -torch.rand(4, 11, generator=g, dtype=F64) * 3
    ref = logp0 + torch.randn(4, 11, generator=g, dtype=F64)
    old = (
        None
        if gradient == "sequence_reverse_kl"
        else logp0 + 0.3 * torch.randn(4, 11, generator=g, dtype=F64)
    )
    mask = torch.rand(4, 11, generator=g) < 0.7
    mask[3] = False
    kw = dict(estimator=estimator, gradient=gradient, clamp=1.5, value_clamp=2.0)
    lp = logp0.clone().requires_grad_(True)
    fused = rl.kl_loss(lp, ref, old_logp=old, mask=mask, aggregation=mode, **kw).loss
    (g1,) = torch.autograd.grad(fused, lp)
    lp = logp0.clone().requires_grad_(True)
    eager = rl.aggregate(rl.kl_per_token(lp, ref, old_logp=old, mask=mask, **kw), mask, mode)
    (g2,) = torch.autograd.grad(eager, lp)
    torch.testing.assert_close(fused, eager, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)


def test_masked_loss_equals_kept_subset_loss():
    g = torch.Generator().manual_seed(8)
    logp = -torch.rand(3, 10, generator=g, dtype=F64)
    ref = logp + torch.randn(3, 10, generator=g, dtype=F64)
    mask = torch.rand(3, 10, generator=g) < 0.5
    full = rl.kl_loss(logp, ref, mask=mask)
    kept = rl.kl_loss(logp[mask][None], ref[mask][None])
    torch.testing.assert_close(full.loss, kept.loss)
    assert full.diagnostics is not None and kept.diagnostics is not None
    for k, v in full.diagnostics.as_dict().items():
        assert v == pytest.approx(kept.diagnostics.as_dict()[k], rel=1e-12, abs=1e-15), k


def test_diagnostics_values():
    g = torch.Generator().manual_seed(9)
    logp = -torch.rand(4, 8, generator=g, dtype=F64)
    ref = logp + 0.5 * torch.randn(4, 8, generator=g, dtype=F64)
    mask = torch.rand(4, 8, generator=g) < 0.7
    d = rl.kl_loss(logp, ref, mask=mask, estimator="k3", clamp=0.6).diagnostics
    assert d is not None
    L = (ref - logp)[mask]
    k3 = torch.expm1(L.clamp(-0.6, 0.6)) - L.clamp(-0.6, 0.6)
    assert float(d.n_tokens) == L.numel()
    assert float(d.mean) == pytest.approx(float(k3.mean()), rel=1e-12)
    assert float(d.std) == pytest.approx(float(k3.std()), rel=1e-12)
    assert float(d.max_abs_log_ratio) == pytest.approx(float(L.abs().max()), rel=1e-15)
    assert float(d.frac_clamped) == pytest.approx(float((L.abs() > 0.6).float().mean()))
    assert float(d.ess) == L.numel()  # on-policy: every weight is 1
    assert rl.kl_loss(logp, ref, mask=mask, diagnostics=False).diagnostics is None


def test_reward_to_go():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], dtype=F64)
    m = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 1]])
    torch.testing.assert_close(
        rl.reward_to_go(x, m),
        torch.tensor([[6.0, 5.0, 3.0, 0.0], [0.0, 14.0, 0.0, 8.0]], dtype=F64),
    )
    gamma = 0.5
    got = rl.reward_to_go(x, None, gamma=gamma)
    want = torch.stack(
        [sum(gamma ** (s - t) * x[:, s] for s in range(t, 4)) for t in range(4)], dim=1
    )
    torch.testing.assert_close(got, want)
    with pytest.raises(KlestError):
        rl.reward_to_go(x, None, gamma=1.5)


def test_aggregation_errors():
    x = torch.randn(2, 3)
    with pytest.raises(KlestError, match="unknown aggregation"):
        rl.aggregate(x, None, "mean")
    with pytest.raises(KlestError, match=r"\[batch, seq\]"):
        rl.aggregate(torch.randn(6), None, "seq-mean-token-mean")
    with pytest.raises(KlestError, match="horizon"):
        rl.aggregate(x, None, "seq-mean-token-sum-norm", horizon=0)
    with pytest.raises(KlestError, match="distributed"):
        rl.aggregate(x, None, "token-mean", distributed=True)
    with pytest.raises(KlestError, match="mask"):
        rl.aggregate(x, torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(KlestError):
        rl.aggregate(torch.ones(2, 3, dtype=torch.int64))
