"""Every preset equals the framework's documented formula, in value and gradient.

The reference formulas below are written out eagerly, as each framework's description states them,
and differentiated by autograd. Inputs are random, with log-ratios and importance weights large
enough that every clamp binds somewhere.
"""

from __future__ import annotations

import math
import warnings

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
    """NeMo-RL 0.6.0 (tag 5fb5889, loss_functions.py): the clamped estimate times
    exp(curr_logprobs - generation_logprobs).detach() (with NaN/inf set to 0; finite here)."""

    def f(logp, ref, old):
        w = torch.nan_to_num(_w(logp, old).detach(), nan=0.0, posinf=0.0, neginf=0.0)
        return nemo(kind)(logp, ref, old) * w

    return f


def nemo7(kind, importance_weight=False):
    """NeMo-RL 0.7.0: the KL term always carries exp(x - sg x) (or π/π_gen); calculate_kl clamps
    the product w·v to [-10, 10]; where the input clamp (±20) binds, nothing carries gradient."""

    def f(logp, ref, old):
        w = _w(logp, old if importance_weight else None)
        L_raw = ref - logp
        inside = L_raw.abs() <= 20
        L = torch.where(inside, L_raw, L_raw.clamp(-20, 20).detach())
        w = torch.where(inside, w, w.detach())
        v = {"k1": -L, "k2": L * L / 2, "k3": torch.exp(L) - 1 - L}[kind]
        return (w * v).clamp(-10, 10)

    return f


def slime(kind, unbiased):
    """slime compute_approx_kl: k1/k2/k3 (no clamp before exp), × π/π_old with
    --use-unbiased-kl, then low_var_kl alone clipped to [-10, 10]."""

    def f(logp, ref, old):
        lr = logp - ref
        kl = {"k1": lr, "k2": lr**2 / 2}.get(kind, torch.exp(-lr) - 1 + lr)
        if unbiased:
            kl = _w(logp, old) * kl
        return kl.clamp(-10, 10) if kind == "low_var_kl" else kl

    return f


def trl_sequence(logp, ref, old, mask):
    """TRL importance_sampling_level='sequence': coef_1 = exp(masked mean of logp - old)."""
    old = logp.detach() if old is None else old
    m = mask.to(logp.dtype)
    lw = ((logp - old) * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    return trl(logp, ref, old) * torch.exp(lw)[:, None]


VERL, ORL, TRL, SLIME = "verl@0.9.1", "openrlhf@0.11.2", "trl@1.16.0", "slime@0.3.1"
NEMO6, NEMO7 = "nemo_rl@0.6.0", "nemo_rl@0.7.0"
_ALIASES = (("k1", "kl"), ("k2", "mse"), ("k3", "low_var_kl"))
REFERENCE = {
    **{f"{VERL}:{k}": verl(k) for k in ("kl", "abs", "mse", "low_var_kl")},
    **{f"{VERL}:{k}+": verl_plus(k) for k in ("kl", "abs", "mse", "low_var_kl")},
    **{f"{VERL}:{a}": verl(k) for a, k in _ALIASES},
    **{f"{VERL}:{a}+": verl_plus(k) for a, k in _ALIASES},
    **{f"{ORL}:{k}": openrlhf(k) for k in ("k1", "k2", "k3")},
    **{f"{ORL}:{k}:unbiased_gradient": openrlhf_unbiased(k) for k in ("k1", "k2", "k3")},
    f"{TRL}:grpo": trl,
    f"{TRL}:grpo:bias_correction": trl_bias_correction,
    f"{TRL}:grpo:bias_correction:sequence": trl_sequence,
    **{f"{NEMO6}:{k}": nemo(k) for k in ("k1", "k2", "k3")},
    **{f"{NEMO6}:{k}:importance_weight": nemo_is(k) for k in ("k1", "k2", "k3")},
    **{f"{NEMO7}:{k}": nemo7(k) for k in ("k1", "k2", "k3")},
    **{f"{NEMO7}:{k}:importance_weight": nemo7(k, True) for k in ("k1", "k2", "k3")},
    **{f"{SLIME}:{k}": slime(k, False) for k in ("k1", "k2", "k3", "low_var_kl")},
    **{f"{SLIME}:{k}:unbiased_kl": slime(k, True) for k in ("k1", "k2", "k3", "low_var_kl")},
}
NEEDS_MASK = {f"{TRL}:grpo:bias_correction:sequence"}


def _reference(name, logp, ref, old, mask):
    f = REFERENCE[name]
    return f(logp, ref, old, mask) if name in NEEDS_MASK else f(logp, ref, old)


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
    # |ℓ| up to 30, and both edges of the ±20 log-ratio clamp exactly
    ref[3, :6] = logp[3, :6] + torch.tensor([30.0, -30.0, 20.0, -20.0, 19.5, -10.0], dtype=dtype)
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
    theirs = _reference(name, lp, ref, old, mask) * m
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
        "nemo_rl:k3:importance_weight",
        "slime:low_var_kl:unbiased_kl",
        "trl:grpo:bias_correction:sequence",
    ],
)
@pytest.mark.parametrize("mode", [*rl.AGGREGATIONS, *rl.TRL_LOSS_TYPES])
def test_preset_loss_matches_aggregated_formula(name, mode):
    logp0, ref, old, mask, _ = _inputs(2)
    lp = logp0.clone().requires_grad_(True)
    out = presets.get(name).loss(lp, ref, old_logp=old, mask=mask, aggregation=mode)
    (g_ours,) = torch.autograd.grad(out.loss, lp)
    lp = logp0.clone().requires_grad_(True)
    theirs = rl.aggregate(_reference(presets.get(name).name, lp, ref, old, mask), mask, mode)
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


def test_names_carry_the_release_and_plain_names_mean_the_newest():
    names = presets.names()
    assert all("@" in n for n in names)
    assert {"nemo_rl@0.6.0:k3", "nemo_rl@0.7.0:k3", "verl@0.9.1:low_var_kl"} <= set(names)
    assert presets.get("nemo_rl:k3").name == "nemo_rl@0.7.0:k3"  # newest known release
    assert presets.get("nemo_rl@0.6.0:k3").name == "nemo_rl@0.6.0:k3"
    assert presets.get("verl:low_var_kl") is presets.get("verl@0.9.1:low_var_kl")
    for name in REFERENCE:  # every old-style name still resolves, to the newest release
        fw, _, option = name.partition(":")
        short = f"{fw.partition('@')[0]}:{option}"
        assert presets.get(short).name.startswith(fw.partition("@")[0] + "@")
    with pytest.raises(KlestError, match="unknown preset"):
        presets.get("nemo_rl@0.5.0:k3")
    with pytest.raises(KlestError, match="full"):
        presets.get("verl@0.9.1:full")


def test_nemo_rl_070_own_test_cases():
    """NeMo-RL 0.7.0's calculate_kl test cases, through klest's options and the preset."""
    # logp = [-3, -1], ref 0, input clamp 2, k3 with a differentiable weight of 1: the first
    # token's clamp binds, so it gets no gradient at all; the second gets w·(k3 - k3') = -ℓ = -1
    lp = torch.tensor([[-3.0, -1.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.zeros(1, 2, dtype=torch.float64)
    kw = dict(estimator="k3", gradient="as_written", weight="differentiable")
    out = rl.kl_per_token(lp, ref, clamp=2.0, clamp_stops_gradient=True, **kw)
    (g,) = torch.autograd.grad(out.sum(), lp)
    torch.testing.assert_close(g, torch.tensor([[0.0, -1.0]], dtype=torch.float64))
    torch.testing.assert_close(  # values: k3 at the clamped L = 2, and at L = 1
        out.detach(), torch.tensor([[math.e**2 - 3, math.e - 2]], dtype=torch.float64)
    )
    # a weight of 100 with an output clamp of 1 on the product: value 1, gradient 0
    lp = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    old = lp.detach() - math.log(100.0)
    out = rl.kl_per_token(
        lp,
        torch.zeros(1, 1, dtype=torch.float64),
        old_logp=old,
        value_clamp=1.0,
        clamp_weighted=True,
        **kw,
    )
    (g,) = torch.autograd.grad(out.sum(), lp)
    assert out.item() == 1.0 and g.item() == 0.0
    # the same through the 0.7.0 preset, and what 0.6.0 did instead (weight outside the clamp)
    p7, p6 = presets.get("nemo_rl@0.7.0:k3:importance_weight"), presets.get("nemo_rl@0.6.0:k3")
    lp = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    v7 = p7(lp, torch.zeros(1, 1, dtype=torch.float64), old_logp=lp.detach() - math.log(100.0))
    assert v7.item() == 10.0  # 100 · (e - 2) clipped to 10
    (g,) = torch.autograd.grad(v7.sum(), lp)
    assert g.item() == 0.0
    v6 = p6(lp, torch.tensor([[-25.0]], dtype=torch.float64))
    (g6,) = torch.autograd.grad(v6.sum(), lp)
    assert v6.item() == 10.0 and g6.item() == 0.0  # 0.6.0: the value clamp of k3 itself


def _trl_normaliser(loss_type, per_token_loss, mask, max_completion_length, n_global):
    """TRL GRPOTrainer._compute_loss's reductions, written out (one process)."""
    m = mask.to(per_token_loss.dtype)
    x = per_token_loss * m
    if loss_type == "grpo":
        return (x.sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return x.sum() / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return x.sum() / (per_token_loss.size(0) * max_completion_length)
    return x.sum() / n_global  # dapo: num_items_in_batch / num_processes, one process


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_trl_loss_types_match_trl_normalisers(loss_type):
    logp0, ref, _, mask, _ = _inputs(3)
    assert not mask[2].any()  # an empty row: TRL's grpo still counts it
    lp = logp0.clone().requires_grad_(True)
    x = trl(lp, ref, None)
    ours = rl.aggregate(x, mask, f"trl:{loss_type}", horizon=64)
    theirs = _trl_normaliser(loss_type, x, mask, 64, mask.sum())
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    (g1,) = torch.autograd.grad(ours, lp, retain_graph=True)
    (g2,) = torch.autograd.grad(theirs, lp)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=0)
    fused = presets.get("trl:grpo").loss(
        logp0, ref, mask=mask, aggregation=f"trl:{loss_type}", horizon=64
    )
    torch.testing.assert_close(fused.loss, theirs.detach(), rtol=1e-10, atol=0)


def test_verl_token_sum_and_sum_norm_with_an_empty_row():
    logp0, ref, _, mask, _ = _inputs(4)
    x = verl("low_var_kl")(logp0, ref, None)
    m = mask.to(x.dtype)
    torch.testing.assert_close(rl.aggregate(x, mask, "token-sum"), (x * m).sum())
    non_empty = int((m.sum(-1) > 0).sum())
    assert non_empty == B - 1
    torch.testing.assert_close(
        rl.aggregate(x, mask, "seq-mean-token-sum-norm", horizon=50),
        (x * m).sum() / (non_empty * 50),
    )


def test_nemo_rl_060_importance_weight_is_held_fixed():
    """0.6.0 multiplies the clamped k3 by a detached π/π_gen: the gradient is the weight times
    the plain estimate's gradient, with no score term; 0.7.0's weight is differentiable."""
    lp0 = torch.tensor([[-1.0, -0.5]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -25.0]], dtype=torch.float64)  # second token: k3 clipped to 10
    old = lp0 - torch.tensor([[math.log(3.0), math.log(2.0)]], dtype=torch.float64)
    plain = presets.get("nemo_rl@0.6.0:k3")
    weighted = presets.get("nemo_rl@0.6.0:k3:importance_weight")
    assert weighted.follows == plain.follows
    lp = lp0.clone().requires_grad_(True)
    v = weighted(lp, ref, old_logp=old)
    (g,) = torch.autograd.grad(v.sum(), lp)
    # L = ref - logp = -0.5: k3 = e^L - 1 - L, d/dlogp = 1 - e^L; w = 3. Token 2: 10 · 2, gradient 0
    L = -0.5
    torch.testing.assert_close(
        v.detach(), torch.tensor([[3 * (math.exp(L) - 1 - L), 20.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(g, torch.tensor([[3 * (1 - math.exp(L)), 0.0]], dtype=torch.float64))
    # without old_logp the weight is 1: the plain preset exactly
    lp = lp0.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(weighted(lp, ref).sum(), lp)
    lp = lp0.clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(plain(lp, ref).sum(), lp)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


def test_slime_040_names_are_deprecated_aliases_of_031(recwarn):
    assert presets.RELEASES["slime"] == ("0.3.1",)
    assert not any(n.startswith("slime@0.4.0") for n in presets.names())
    presets._WARNED.discard("slime@0.4.0:k2")
    with pytest.warns(FutureWarning, match="slime@0.3.1:k2"):
        p = presets.get("slime@0.4.0:k2")
    assert p is presets.get("slime@0.3.1:k2") is presets.get("slime:k2")
    recwarn.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # even so: once per name per process
        assert presets.get("slime@0.4.0:k2") is p
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]
    presets._WARNED.discard("slime@0.4.0:low_var_kl:unbiased_kl")
    with pytest.warns(FutureWarning):  # another name warns once too
        assert presets.get("slime@0.4.0:low_var_kl:unbiased_kl").name == (
            "slime@0.3.1:low_var_kl:unbiased_kl"
        )
    recwarn.clear()
    with pytest.raises(KlestError, match="unknown preset"):
        presets.get("slime@0.4.0:nope")
    # no deprecation warning for an option that does not exist under either name
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]
