"""Bad input: each case raises klest.KlestError (or, for -inf ref_logp, says +inf, not NaN)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import klest  # noqa: E402
import klest.rl as rl  # noqa: E402
from klest import KlestError  # noqa: E402

ENTRY_POINTS = {
    "kl_loss": lambda lp, ref, **kw: rl.kl_loss(lp, ref, **kw).loss,
    "kl_per_token": rl.kl_per_token,
    "kl_penalty": lambda lp, ref, old_logp=None, **kw: rl.kl_penalty(lp, ref, **kw),
}


def _pair(B=2, T=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(B, T, generator=g).to(dtype)
    ref = (logp.float() + 0.1 * torch.randn(B, T, generator=g)).to(dtype)
    return logp, ref


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_shape_mismatches(entry):
    f = ENTRY_POINTS[entry]
    logp, ref = _pair()
    with pytest.raises(KlestError, match="ref_logp"):
        f(logp, ref[:, :4])
    with pytest.raises(KlestError, match="ref_logp"):
        f(logp, ref[:1])  # broadcastable, still refused
    with pytest.raises(KlestError, match="mask"):
        f(logp, ref, mask=torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(KlestError, match="mask"):
        f(logp, ref, mask=torch.ones(5, 2, dtype=torch.bool))
    with pytest.raises(KlestError, match="logp"):
        f(logp[0, 0], ref[0, 0])
    if entry != "kl_penalty":
        with pytest.raises(KlestError, match="old_logp"):
            f(logp, ref, old_logp=logp[:, :3])


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_integer_and_non_torch_inputs(entry):
    f = ENTRY_POINTS[entry]
    logp, ref = _pair()
    with pytest.raises(KlestError, match="token ids"):
        f(torch.ones(2, 5, dtype=torch.int64), ref)
    with pytest.raises(KlestError, match="ref_logp"):
        f(logp, torch.ones(2, 5, dtype=torch.int32))
    with pytest.raises(KlestError, match="torch tensors"):
        f(logp.numpy(), ref)
    with pytest.raises(KlestError, match="mask"):
        f(logp, ref, mask=torch.full((2, 5), 2))
    with pytest.raises(KlestError, match="mask"):
        f(logp, ref, mask=np.ones((2, 5), dtype=bool))
    # 0/1 integer and float masks are fine and mean the same as bool
    m = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    torch.testing.assert_close(f(logp, ref, mask=m), f(logp, ref, mask=m.bool()))
    torch.testing.assert_close(f(logp, ref, mask=m.float()), f(logp, ref, mask=m.bool()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_computed_in_float32(dtype):
    logp16, ref16 = _pair(dtype=dtype)
    lp = logp16.clone().requires_grad_(True)
    out = rl.kl_loss(lp, ref16, estimator="k3")
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert lp.grad.dtype == dtype  # gradients come back in the input's dtype
    lp32 = logp16.float().requires_grad_(True)
    ref32 = ref16.float()
    want = rl.kl_loss(lp32, ref32, estimator="k3")
    want.loss.backward()
    assert out.loss.item() == want.loss.item()  # identical: same float32 computation
    torch.testing.assert_close(lp.grad, lp32.grad.to(dtype))
    assert rl.kl_penalty(logp16, ref16).dtype == torch.float32
    assert rl.kl_per_token(logp16, ref16).dtype == torch.float32
    # float64 anywhere promotes to float64
    assert rl.kl_penalty(logp16, ref16.double()).dtype == torch.float64


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_nan_and_inf_log_probs_raise_in_validation_mode(entry):
    f = ENTRY_POINTS[entry]
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False
    cases = [
        ("logp", 0, float("nan")),
        ("logp", 0, math.inf),
        ("logp", 0, -math.inf),
        ("ref_logp", 1, float("nan")),
        ("ref_logp", 1, math.inf),
    ]
    for name, which, bad in cases:
        logp, ref = _pair()
        (logp, ref)[which][0, 2] = bad
        with pytest.raises(KlestError, match=name) as err:
            f(logp, ref, mask=mask)
        assert "1 valid token" in str(err.value)
        # on a masked (padding) token the same value is ignored
        logp, ref = _pair()
        (logp, ref)[which][1, 4] = bad
        assert torch.isfinite(f(logp, ref, mask=mask)).all()
    if entry != "kl_penalty":
        logp, ref = _pair()
        for bad in (float("nan"), math.inf, -math.inf):
            old = logp.clone()
            old[0, 1] = bad
            with pytest.raises(KlestError, match="old_logp"):
                f(logp, ref, old_logp=old)
    # validation off: no check (and no error); NaN goes through as NaN
    logp, ref = _pair()
    logp[0, 2] = float("nan")
    with klest.options(validate=False):
        assert torch.isnan(f(logp, ref)).any()


def test_minus_inf_reference_is_infinite_kl_not_nan():
    logp, ref = _pair()
    ref[0, 3] = -math.inf
    lp = logp.clone().requires_grad_(True)
    with pytest.warns(RuntimeWarning, match=r"ref_logp = -inf at 1 valid token"):
        per_tok = rl.kl_penalty(lp, ref, estimator="k3")
    assert per_tok[0, 3].item() == math.inf
    assert torch.isfinite(per_tok[torch.arange(2)[:, None] * 5 + torch.arange(5) != 3]).all()
    for est in ("k1", "k2", "k3", "abs"):
        with pytest.warns(RuntimeWarning):
            assert rl.kl_penalty(lp, ref, estimator=est)[0, 3].item() == math.inf
    with pytest.warns(RuntimeWarning):
        out = rl.kl_loss(lp, ref, estimator="k3", gradient="forward_kl")
    assert out.loss.item() == math.inf
    assert out.diagnostics is not None
    assert out.diagnostics.n_infinite.item() == 1
    assert out.diagnostics.std.item() == math.inf
    (g,) = torch.autograd.grad(out.loss, lp)
    assert torch.isfinite(g).all()  # forward-KL coefficient 1 - r = 1 there
    with pytest.warns(RuntimeWarning):
        out = rl.kl_loss(lp, ref, estimator="k3", gradient="reverse_kl")
    (g,) = torch.autograd.grad(out.loss, lp)
    assert g[0, 3].item() == math.inf and not torch.isnan(g).any()
    # the forward-KL estimators are finite there (π_ref(y) = 0 contributes r log r = 0): no
    # warning claiming +inf values
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fwd = rl.kl_penalty(lp, ref, estimator="forward_k3")
    assert fwd[0, 3].item() == 1.0  # r L - (r - 1) at r = 0
    # masked: ignored, silently
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3] = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.isfinite(rl.kl_loss(lp, ref, mask=mask).loss)


@pytest.mark.parametrize("est", ["k1", "k2", "k3", "abs"])
def test_no_infinite_value_warning_where_a_clamp_makes_the_value_finite(est):
    """ref_logp = -inf (L = -inf): with ``clamp=c`` the value is v(-c), with ``value_clamp=c``
    it is c; both finite, so no warning may claim +inf values."""
    logp, ref = _pair()
    ref[0, 3] = -math.inf
    c = 4.0
    L = torch.tensor(-c, dtype=torch.float64)  # L = ref - logp = -inf, clamped to [-c, c]
    at = {
        "k1": -L,
        "k2": L * L / 2,
        "k3": torch.expm1(L) - L,
        "abs": L.abs(),
    }[est]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = rl.kl_penalty(logp, ref, estimator=est, clamp=c)
        assert got[0, 3].item() == pytest.approx(at.item(), rel=1e-6)  # float32 output
        got = rl.kl_penalty(logp, ref, estimator=est, value_clamp=c)
        assert got[0, 3].item() == c


def test_option_errors():
    logp, ref = _pair()
    with pytest.raises(KlestError, match="unknown estimator"):
        rl.kl_loss(logp, ref, estimator="k4")
    with pytest.raises(KlestError, match="per-token form"):
        rl.kl_loss(logp, ref, estimator="k_opt")
    with pytest.raises(KlestError, match="unknown gradient"):
        rl.kl_loss(logp, ref, gradient="reverse")
    with pytest.raises(KlestError, match="weight"):
        rl.kl_loss(logp, ref, weight="yes")
    with pytest.raises(KlestError, match="as_written"):
        rl.kl_loss(logp, ref, old_logp=logp, weight="differentiable", gradient="reverse_kl")
    with pytest.raises(KlestError, match="old_logp"):
        rl.kl_loss(logp, ref, old_logp=logp, gradient="sequence_reverse_kl")
    with pytest.raises(KlestError, match="contain 0"):
        rl.kl_loss(logp, ref, clamp=(0.5, 2.0))
    with pytest.raises(KlestError, match="contain 1"):
        rl.kl_loss(logp, ref, old_logp=logp, weight_clamp=0.5)
    with pytest.raises(KlestError, match="lo < hi"):
        rl.kl_loss(logp, ref, value_clamp=(1.0, -1.0))


def test_float32_k3_is_accurate_near_zero():
    """k3 in float32 to a few ulp (not the percent-level errors of exp(L) - 1 - L at |L| ~ 1e-3)."""
    L = torch.tensor([1e-7, -3e-6, 1e-4, -1e-3, 2e-3, -0.05, 0.3, -2.0, 5.0], dtype=torch.float32)
    logp = torch.full_like(L, -1.0)
    ref = logp + L
    got = rl.kl_penalty(logp, ref, estimator="k3")[None]
    L64 = (ref.double() - logp.double())[None]
    exact = torch.expm1(L64) - L64  # float64 is exact enough here
    rel = ((got.double() - exact).abs() / exact).max().item()
    assert rel < 4 * 2.0**-24
    naive = torch.exp(L[None]) - 1 - L[None]
    assert ((naive.double() - exact).abs() / exact).max().item() > 1e-2


@pytest.mark.parametrize("aggregation", rl.AGGREGATIONS)
def test_float32_fused_k3_loss_is_accurate(aggregation):
    """The fused float32 path reduces k3 in float64 blocks: the loss is the float64 result
    rounded once, not a float32 sum of cancelling terms (several blocks, ragged last one)."""
    g = torch.Generator().manual_seed(5)
    B, T = 37, 5000
    logp = -torch.rand(B, T, generator=g) * 3
    ref = logp + 1e-3 * torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.9
    got = rl.kl_loss(logp, ref, mask=mask, aggregation=aggregation, diagnostics=False).loss
    assert got.dtype == torch.float32
    L = ref.double() - logp.double()
    want = rl.aggregate(torch.expm1(L) - L, mask, aggregation)
    assert abs(got.item() - want.item()) <= 2 * 2.0**-24 * abs(want.item())
    with_diag = rl.kl_loss(logp, ref, mask=mask, aggregation=aggregation).loss
    assert abs(with_diag.item() - want.item()) <= 2 * 2.0**-24 * abs(want.item())


@pytest.mark.parametrize("masked", [False, True])
def test_float32_blockwise_diagnostics_match_float64(masked):
    g = torch.Generator().manual_seed(6)
    B, T = 41, 7000  # several float64 blocks and a ragged last one
    logp = -torch.rand(B, T, generator=g) * 3
    ref = logp + 0.3 * torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.6 if masked else None
    if masked:
        mask[:5] = False  # whole empty blocks of rows
    d = rl.kl_loss(logp, ref, mask=mask).diagnostics
    assert d is not None
    L = ref.double() - logp.double()
    k3 = torch.expm1(L) - L
    kept = k3[mask] if masked else k3.flatten()
    assert float(d.n_tokens) == kept.numel()
    assert float(d.mean) == pytest.approx(float(kept.mean()), rel=1e-6)
    assert float(d.std) == pytest.approx(float(kept.std()), rel=1e-6)
    assert float(d.max_abs_log_ratio) == pytest.approx(
        float((L[mask] if masked else L).abs().max()), rel=1e-6
    )
    empty = rl.kl_loss(logp, ref, mask=torch.zeros(B, T, dtype=torch.bool)).diagnostics
    assert empty is not None
    assert all(v == 0 for v in empty.as_dict().values())


def test_score_plus_pathwise_has_no_cancellation():
    """k3 × differentiable weight: d/dlogp = w·(k3 + 1 - r) = w·ℓ exactly, even where k3 and r
    are ~e^40 (the eager autograd loses every digit there)."""
    logp0 = torch.tensor([[-45.0, -1.0, -3.0]], dtype=torch.float64)
    ref = torch.tensor([[-5.0, -1.5, -2.0]], dtype=torch.float64)
    old = logp0 + torch.tensor([[0.1, -0.2, 0.3]], dtype=torch.float64)
    lp = logp0.clone().requires_grad_(True)
    out = rl.kl_per_token(
        lp, ref, old_logp=old, estimator="k3", gradient="as_written", weight="differentiable"
    )
    (g,) = torch.autograd.grad(out.sum(), lp)
    want = (logp0 - ref) * torch.exp(logp0 - old)
    torch.testing.assert_close(g, want, rtol=1e-15, atol=0)
    lp = logp0.clone().requires_grad_(True)
    eager = (torch.expm1(ref - lp) - (ref - lp)) * torch.exp(lp - old)
    (g_eager,) = torch.autograd.grad(eager.sum(), lp)
    assert abs(float(g_eager[0, 0] - want[0, 0])) > 1.0  # the eager formula's cancellation


def test_everything_after_ref_logp_is_keyword_only():
    """A float 0/1 mask passed third must not be taken for old_logp (or vice versa)."""
    from klest.rl import presets

    logp, ref = _pair()
    mask = torch.ones_like(logp)
    calls = {
        "kl_loss": rl.kl_loss,
        "kl_per_token": rl.kl_per_token,
        "kl_penalty": rl.kl_penalty,
        "preset": presets.get("openrlhf:k3:unbiased_gradient"),
        "preset.loss": presets.get("verl:low_var_kl").loss,
    }
    for f in calls.values():
        with pytest.raises(TypeError, match="positional"):
            f(logp, ref, mask)
        with pytest.raises(TypeError, match="positional"):
            f(logp, ref, None, mask)
        f(logp, ref, mask=mask)  # the keyword form works
    with pytest.raises(TypeError, match="positional"):
        rl.reward_to_go(logp, mask, 0.9)
    rl.reward_to_go(logp, mask, gamma=0.9)


def test_std_of_a_few_large_values_under_heavy_masking():
    """k3 ~ e^20 with a spread of 1e-4 in L, 1 % of the tokens kept: the centred sum of squares
    must come from the valid tokens only (subtracting the masked tokens' share afterwards cancels
    every digit of it)."""
    g = torch.Generator().manual_seed(9)
    B, T = 64, 4096  # several float64 blocks
    logp = -30.0 + torch.rand(B, T, generator=g)
    ref = logp + 20.0 + 1e-4 * torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.01
    d = rl.kl_loss(logp, ref, mask=mask).diagnostics
    assert d is not None
    L = (ref - logp).numpy().astype(np.float64)[mask.numpy()]  # the float32 L klest computes
    k3 = np.expm1(L) - L
    assert float(d.n_tokens) == k3.size
    assert float(d.mean) == pytest.approx(float(k3.mean()), rel=1e-12)
    # two-pass float64 gives ~1e-14 here; subtracting the masked share was off by 1e-7 to 2e-6
    assert float(d.std) == pytest.approx(float(k3.std(ddof=1)), rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_control_variate_overflows_to_inf_not_nan(dtype):
    """r log r - (r - 1) with r = e^L: +inf once e^L overflows (never inf - inf = NaN), and exact
    below that, on both sides of the switch between its two forms (L = 1)."""
    Ls = [1e-3, 0.5, 1.0, 1.0 + 1e-6, 1.5, 30.0, 80.0, 100.0, 700.0, 800.0, 1e30]
    L = torch.tensor([Ls], dtype=dtype)
    logp = torch.full_like(L, -1.0)
    ref = logp + L
    lp = logp.clone().requires_grad_(True)
    v = rl.kl_per_token(lp, ref, estimator="forward_k3", gradient="as_written")
    assert not torch.isnan(v).any()
    L64 = (ref - logp).double()  # the L that klest sees
    truth = L64 * torch.exp(L64) - torch.expm1(L64)  # no cancellation at these L
    truth = torch.nan_to_num(truth, nan=math.inf)  # inf - inf: L·e^L dominates, +inf
    want = truth.to(dtype)  # float32 overflows from L ~ 84 on
    big = torch.isinf(want)
    assert big.sum() >= 2 and (v[big] == math.inf).all()
    torch.testing.assert_close(v[~big], want[~big], rtol=1e-6, atol=0)
    (g,) = torch.autograd.grad(v.sum(), lp)
    assert not torch.isnan(g).any()
    with klest.options(validate=False):  # the fused loss and its diagnostics too
        out = rl.kl_loss(logp, ref, estimator="forward_k3")
    assert out.loss.item() == math.inf
    assert out.diagnostics is not None and not math.isnan(out.diagnostics.std.item())


@pytest.mark.parametrize("weight", ["detached", "differentiable"])
def test_float32_importance_weights_past_exp_overflow(weight, monkeypatch):
    """π/π_old = e^90 overflows float32 (max e^88.7); the weighted k3 w·(e^L − 1 − L) does not
    (ℓ = 0.01: w·v ≈ 6e34), and where v = 0 the term is 0, not inf·0 = NaN.
    Truth: mpmath at 40 digits from the float32 inputs."""
    mpmath = pytest.importorskip("mpmath")
    monkeypatch.setattr(mpmath.mp, "dps", 40)  # restored afterwards
    logp = torch.tensor([[-0.5, -0.5, -0.25]])
    ref = torch.tensor([[-0.5, -0.51, -0.26]])
    old = logp - 90.0
    lp = logp.clone().requires_grad_(True)
    out = rl.kl_per_token(
        lp, ref, old_logp=old, estimator="k3", gradient="as_written", weight=weight
    )
    (g,) = torch.autograd.grad(out.sum(), lp)
    for t in range(3):
        w = mpmath.exp(mpmath.mpf(float(logp[0, t])) - mpmath.mpf(float(old[0, t])))
        L = mpmath.mpf(float(ref[0, t])) - mpmath.mpf(float(logp[0, t]))
        v = mpmath.exp(L) - 1 - L
        # d(w·v)/dlogp: w·(e^L − 1) pathwise (dL/dlogp = −1), plus w·v with a differentiable w
        dv = w * (1 - mpmath.exp(L)) + (w * v if weight == "differentiable" else 0)
        for got, want in ((float(out.detach()[0, t]), w * v), (float(g[0, t]), dv)):
            if want == 0:
                assert got == 0.0
            else:
                assert math.isfinite(got) and abs(got - want) <= 1e-6 * abs(want), (t, got, want)
