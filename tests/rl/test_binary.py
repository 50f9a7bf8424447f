"""klest.rl.binary_kl / binary_tv against mpmath, next to probability 1 and at tiny probabilities,
with gradients; the verl and OpenRLHF presets against their formulas as written."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
mpmath = pytest.importorskip("mpmath")

import klest.rl as rl  # noqa: E402
from klest import KlestError  # noqa: E402


def kl_ref(a: float, b: float) -> mpmath.mpf:
    with mpmath.workdps(max(mpmath.mp.dps, 60)):  # never below 60 digits, whatever is set
        p, q = mpmath.exp(mpmath.mpf(a)), mpmath.exp(mpmath.mpf(b))
        return +(p * mpmath.log(p / q) + (1 - p) * mpmath.log((1 - p) / (1 - q)))


def tv_ref(a: float, b: float) -> mpmath.mpf:
    with mpmath.workdps(max(mpmath.mp.dps, 60)):
        return +abs(mpmath.exp(mpmath.mpf(a)) - mpmath.exp(mpmath.mpf(b)))


NEAR_ONE = math.log1p(-1e-12)  # log(1 - 1e-12)
TINY = math.log(1e-30)
PAIRS = [
    (NEAR_ONE, math.log1p(-2e-12)),
    (NEAR_ONE, math.log1p(-1e-13)),
    (NEAR_ONE, -0.5),
    (-0.5, NEAR_ONE),
    (TINY, math.log(3e-30)),
    (TINY, TINY + 1e-3),
    (TINY, -1.0),
    (-1.0, TINY),
    (-0.2, -0.25),
]


@pytest.mark.parametrize(("a", "b"), PAIRS)
def test_binary_kl_matches_mpmath(a: float, b: float) -> None:
    got = rl.binary_kl(
        torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
    )
    ref = kl_ref(a, b)
    assert float(got) >= 0.0
    assert abs(float(got) - float(ref)) <= 1e-12 * float(ref) + 1e-300


@pytest.mark.parametrize(("a", "b"), PAIRS)
def test_binary_tv_matches_mpmath(a: float, b: float) -> None:
    got = rl.binary_tv(
        torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
    )
    ref = tv_ref(a, b)
    assert abs(float(got) - float(ref)) <= 1e-13 * float(ref) + 1e-300


@pytest.mark.parametrize(("a", "b"), PAIRS)
def test_binary_kl_gradients_match_mpmath(a: float, b: float) -> None:
    ta = torch.tensor([a], dtype=torch.float64, requires_grad=True)
    tb = torch.tensor([b], dtype=torch.float64, requires_grad=True)
    rl.binary_kl(ta, tb).sum().backward()
    with mpmath.workdps(60):
        da = mpmath.diff(lambda x: kl_ref(x, b), mpmath.mpf(a))
        db = mpmath.diff(lambda x: kl_ref(a, x), mpmath.mpf(b))
    for got, ref in ((ta.grad, da), (tb.grad, db)):
        assert got is not None and math.isfinite(float(got))
        assert abs(float(got) - float(ref)) <= 1e-8 * abs(float(ref)) + 1e-300


def test_float32_near_one_and_tiny() -> None:
    # float32 inputs: computed in float64, returned in float32 with float32 accuracy
    a = torch.tensor([NEAR_ONE, TINY], dtype=torch.float32)
    b = torch.tensor([math.log1p(-3e-12), math.log(2e-30)], dtype=torch.float32)
    got = rl.binary_kl(a, b)
    assert got.dtype == torch.float32
    for i in range(2):
        ref = kl_ref(float(a[i]), float(b[i]))  # the float32 inputs, exactly
        assert abs(float(got[i]) - float(ref)) <= 2e-7 * float(ref)


def test_limits() -> None:
    # p = 1: KL = -log q; q = 1 > p: +inf; p = q: 0
    kl = rl.binary_kl(torch.tensor([0.0, -0.3, -0.7]), torch.tensor([-0.1, 0.0, -0.7]))
    assert float(kl[0]) == pytest.approx(0.1, rel=1e-6)
    assert float(kl[1]) == math.inf
    assert float(kl[2]) == 0.0


def test_gradient_at_p_equal_q_equal_one_is_zero() -> None:
    # old_logp = logp = 0 (float32 log-probs of near-certain tokens round to 0): p = q is the
    # KL's minimum, so both derivatives are 0 (as along the whole diagonal a = b), never NaN
    ta = torch.tensor([0.0, -0.3], requires_grad=True)
    tb = torch.tensor([0.0, -0.3], requires_grad=True)
    rl.binary_kl(ta, tb).sum().backward()
    assert ta.grad is not None and tb.grad is not None
    assert ta.grad.tolist() == [0.0, 0.0]
    assert tb.grad.tolist() == [0.0, 0.0]
    # p = 1 > q: KL = −log q, so ∂/∂logp = −1 exactly
    tb2 = torch.tensor([-1e-3], dtype=torch.float64, requires_grad=True)
    rl.binary_kl(torch.tensor([0.0], dtype=torch.float64), tb2).sum().backward()
    assert tb2.grad is not None and float(tb2.grad) == -1.0
    # q = 1 > p: ∂/∂logp = (q − p)/(1 − q) → +inf (the KL grows as q → 1), not −inf
    tb3 = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
    rl.binary_kl(torch.tensor([-1e-3], dtype=torch.float64), tb3).sum().backward()
    assert tb3.grad is not None and float(tb3.grad) == math.inf


def test_refusals() -> None:
    with pytest.raises(KlestError, match="old_logp"):
        rl.binary_kl(torch.tensor([0.1]), torch.tensor([-1.0]))
    with pytest.raises(KlestError, match="old_logp"):
        rl.binary_kl(torch.tensor([-math.inf]), torch.tensor([-1.0]))
    with pytest.raises(KlestError, match="preset"):
        rl.binary_kl(torch.tensor([-1.0]), torch.tensor([-1.0]), preset="verl")


def test_verl_preset_as_written() -> None:
    # verl 0.9.1 core_algos.compute_policy_loss_dppo_kl: old_prob·(old − new)
    # + (1 − old_prob)·log((1 − old_prob + 1e-8)/(1 − prob + 1e-8)), in the input dtype
    a = torch.tensor([NEAR_ONE, TINY, -0.2], dtype=torch.float64)
    b = torch.tensor([math.log1p(-2e-12), -69.0, -0.25], dtype=torch.float64)
    p, q = a.exp(), b.exp()
    ref = p * (a - b) + (1 - p) * torch.log((1 - p + 1e-8) / (1 - q + 1e-8))
    got = rl.binary_kl(a, b, preset="verl@0.9.1")
    assert torch.equal(got, ref)
    exact = rl.binary_kl(a, b)
    # where verl's own numerics fail: 3.3x too large next to 1 (the +1e-8), negative when tiny
    assert float(got[0]) / float(exact[0]) > 3.0
    assert float(got[1]) < 0.0 < float(exact[1])
    tv = rl.binary_tv(a, b, preset="verl@0.9.1")
    assert torch.equal(tv, (q - p).abs())


def test_openrlhf_preset_as_written() -> None:
    a = torch.tensor([-0.1, -30.0], dtype=torch.float64)
    b = torch.tensor([-0.3, -20.0], dtype=torch.float64)
    p, q = a.exp().clamp(1e-6, 1 - 1e-6), b.exp().clamp(1e-6, 1 - 1e-6)
    ref = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    assert torch.equal(rl.binary_kl(a, b, preset="openrlhf@0.11.2"), ref)
