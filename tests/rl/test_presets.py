"""Every preset equals the framework's documented formula, in value and gradient.

The reference formulas below are written out eagerly, as each framework's description states them,
and differentiated by autograd. Inputs are random, with log-ratios and importance weights large
enough that every clamp binds somewhere.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import klest.rl as rl  # noqa: E402
from klest import KlestError  # noqa: E402
from klest.rl import presets  # noqa: E402

B, T = 6, 40


def _k2(logp, ref):
    return 0.5 * (logp - ref) ** 2


def _straight_through(value, logp, ref):
    k2 = _k2(logp, ref)
    return k2 - k2.detach() + value.detach()


def _w(logp, old):
    return torch.exp(logp - (logp.detach() if old is None else old))


def verl(kind):
    def f(logp, ref, old):
        if kind == "kl":
            return logp - ref
        if kind == "abs":
            return (logp - ref).abs()
        if kind == "mse":
            return _k2(logp, ref)
        kl = (ref - logp).clamp(-20, 20)
        return (torch.exp(kl) - kl - 1).clamp(-10, 10)

    return f


def verl_plus(kind):
    return lambda logp, ref, old: _straight_through(verl(kind)(logp, ref, old), logp, ref)


def openrlhf(kind):
    def f(logp, ref, old):
        log_ratio = logp - ref
        if kind == "k1":
            out = log_ratio
        elif kind == "k2":
            out = log_ratio**2 / 2
        else:
            L = -log_ratio.clamp(min=-10)
            out = L.exp() - 1 - L
        return out.clamp(-10, 10)

    return f


def openrlhf_unbiased(kind):
    """peers.md: "value of kN, gradient of k2 times a detached, clamped (10) weight π/π_old"."""

    def f(logp, ref, old):
        w = torch.ones_like(logp) if old is None else torch.exp(logp - old).clamp(max=10)
        k2 = _k2(logp, ref)
        return openrlhf(kind)(logp, ref, old).detach() + w.detach() * (k2 - k2.detach())

    return f


def trl(logp, ref, old):
    return torch.exp(ref - logp) - (ref - logp) - 1


def trl_bias_correction(logp, ref, old):
    return trl(logp, ref, old) * _w(logp, old)


def nemo(kind):
    def f(logp, ref, old):
        L = (ref - logp).clamp(-20, 20)
        out = {"k1": -L, "k2": L * L / 2, "k3": torch.exp(L) - 1 - L}[kind]
        return out.clamp(-10, 10)

    return f


def nemo_is(kind):
    return lambda logp, ref, old: nemo(kind)(logp, ref, old) * _w(logp, old)


REFERENCE = {
    **{f"verl:{k}": verl(k) for k in ("kl", "abs", "mse", "low_var_kl")},
    **{f"verl:{k}+": verl_plus(k) for k in ("kl", "abs", "mse", "low_var_kl")},
    **{f"verl:{a}": verl(k) for a, k in (("k1", "kl"), ("k2", "mse"), ("k3", "low_var_kl"))},
    **{f"verl:{a}+": verl_plus(k) for a, k in (("k1", "kl"), ("k2", "mse"), ("k3", "low_var_kl"))},
    **{f"openrlhf:{k}": openrlhf(k) for k in ("k1", "k2", "k3")},
    **{f"openrlhf:{k}:unbiased_gradient": openrlhf_unbiased(k) for k in ("k1", "k2", "k3")},
    "trl:grpo": trl,
    "trl:grpo:bias_correction": trl_bias_correction,
    **{f"nemo_rl:{k}": nemo(k) for k in ("k1", "k2", "k3")},
    **{f"nemo_rl:{k}:importance_weight": nemo_is(k) for k in ("k1", "k2", "k3")},
}


def test_every_preset_has_a_reference_and_says_what_it_follows():
    assert sorted(REFERENCE) == presets.names()
    for name in presets.names():
        p = presets.get(name)
        assert p.__doc__.startswith("Gradient follows ")
        assert "\n" not in p.follows and p.follows


def _inputs(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 6
    ref = logp + 3 * torch.randn(B, T, generator=g, dtype=dtype)
    ref[0, :6] = logp[0, :6] + torch.tensor([25.0, -25.0, 12.0, -12.0, 3.0, -3.0], dtype=dtype)
    old = logp + 0.8 * torch.randn(B, T, generator=g, dtype=dtype)
    old[1, :4] = logp[1, :4] - torch.tensor([3.0, 2.5, 4.0, 0.1], dtype=dtype)  # w > 10
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[2] = False  # an empty row
    upstream = torch.randn(B, T, generator=g, dtype=dtype)
    return logp, ref, old, mask, upstream


def _assert_grad_close(ours, theirs, logp, ref, old, upstream=1.0):
    """Equal to 1e-10 relative, up to the rounding of the peer's own autograd: where e^{-ℓ} is
    large, d(k3·w)/dlogp = w·(k3 + 1 - r) cancels two terms of size w·r in the eager formula
    (klest forms w·ℓ directly), so the tolerance allows a few ulp of w·r there."""
    w = torch.ones_like(logp) if old is None else torch.exp(logp - old)
    r = torch.exp((ref - logp).clamp(max=700))
    atol = 1e-12 + 8 * torch.finfo(logp.dtype).eps * (w * (r + 1) * abs(upstream))
    bad = (ours - theirs).abs() > 1e-10 * theirs.abs() + atol
    assert not bad.any(), ((ours - theirs)[bad], theirs[bad])


@pytest.mark.parametrize("name", sorted(REFERENCE))
@pytest.mark.parametrize("with_old", [False, True])
def test_preset_matches_the_framework_formula(name, with_old):
    logp0, ref, old, mask, up = _inputs(1)
    old = old if with_old else None
    preset = presets.get(name)
    m = mask.to(logp0.dtype)

    lp = logp0.clone().requires_grad_(True)
    ours = preset(lp, ref, old_logp=old, mask=mask)
    (g_ours,) = torch.autograd.grad((ours * up).sum(), lp)

    lp = logp0.clone().requires_grad_(True)
    theirs = REFERENCE[name](lp, ref, old) * m
    (g_theirs,) = torch.autograd.grad((theirs * up).sum(), lp)

    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    _assert_grad_close(g_ours, g_theirs, logp0, ref, old, up)


@pytest.mark.parametrize(
    "name",
    [
        "verl:low_var_kl+",
        "openrlhf:k3:unbiased_gradient",
        "trl:grpo",
        "trl:grpo:bias_correction",
        "nemo_rl:k2:importance_weight",
    ],
)
@pytest.mark.parametrize("mode", rl.AGGREGATIONS)
def test_preset_loss_matches_aggregated_formula(name, mode):
    logp0, ref, old, mask, _ = _inputs(2)
    lp = logp0.clone().requires_grad_(True)
    out = presets.get(name).loss(lp, ref, old_logp=old, mask=mask, aggregation=mode)
    (g_ours,) = torch.autograd.grad(out.loss, lp)
    lp = logp0.clone().requires_grad_(True)
    theirs = rl.aggregate(REFERENCE[name](lp, ref, old), mask, mode)
    (g_theirs,) = torch.autograd.grad(theirs, lp)
    torch.testing.assert_close(out.loss, theirs, rtol=1e-10, atol=1e-12)
    _assert_grad_close(g_ours, g_theirs, logp0, ref, old)


def test_clamps_bind_and_are_counted():
    logp, ref, old, mask, _ = _inputs(1)
    out = presets.get("verl:low_var_kl").loss(logp, ref, mask=mask)
    d = out.diagnostics
    assert d is not None
    L = (ref - logp)[mask]
    n = L.numel()
    assert float(d.frac_clamped) == pytest.approx(float((L.abs() > 20).sum()) / n)
    k3 = torch.expm1(L.clamp(-20, 20)) - L.clamp(-20, 20)
    assert float(d.frac_value_clamped) == pytest.approx(float((k3 > 10).sum()) / n)
    assert float(d.frac_value_clamped) > 0 and float(d.frac_clamped) > 0
    out = presets.get("openrlhf:k3:unbiased_gradient").loss(logp, ref, old_logp=old, mask=mask)
    assert out.diagnostics is not None
    w = (logp - old).exp()[mask]
    assert float(out.diagnostics.frac_weight_clamped) == pytest.approx(float((w > 10).sum()) / n)
    assert float(out.diagnostics.frac_weight_clamped) > 0
    # the value it reports is k3 itself, not weighted by π/π_old (peers.md: "value of kN")
    k3 = openrlhf("k3")(logp, ref, old)[mask]
    assert float(out.diagnostics.mean) == pytest.approx(float(k3.mean()), rel=1e-12)


def test_unknown_preset_and_verl_full():
    with pytest.raises(KlestError, match="unknown preset"):
        presets.get("verl:nope")
    with pytest.raises(KlestError, match="full"):
        presets.get("verl:full")
    with pytest.raises(KlestError, match="exists"):
        presets.register(presets.get("trl:grpo"))
