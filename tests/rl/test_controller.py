"""klest.rl.KLController against the released peers' formula, step by step.

Reference (written out here from the released source, not imported):
- verl 0.9.1, verl/trainer/ppo/core_algos.py, class AdaptiveKLController (lines 153-174 of the
  wheel verl-0.9.1-py3-none-any.whl): ``proportional_error = np.clip(current_kl / target - 1,
  -0.2, 0.2); mult = 1 + proportional_error * n_steps / self.horizon; self.value *= mult``;
  verl/trainer/ppo/ray_trainer.py::apply_kl_penalty calls
  ``update(current_kl, n_steps=batch_size)``.
- OpenRLHF 0.11.2, openrlhf/trainer/ppo_utils/kl_controller.py, class AdaptiveKLController
  (wheel openrlhf-0.11.2): the same three lines (``current``/``target``/``horizon``);
  openrlhf/trainer/ppo_trainer.py calls ``update(status["kl"], rollout_batch_size *
  n_samples_per_prompt)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from klest import KlestError
from klest.rl.controller import KLController


class _PeerAdaptive:
    """verl 0.9.1 / OpenRLHF 0.11.2's AdaptiveKLController, as their source reads."""

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int) -> None:
        self.value = init_kl_coef
        self.target = target_kl
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = np.clip(current_kl / self.target - 1, -0.2, 0.2)
        mult = 1 + proportional_error * n_steps / self.horizon
        self.value *= mult


def _kl_sequence(seed: int, n: int) -> np.ndarray:
    # KLs around the target, some far enough that the clip binds both ways
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 15.0, size=n)


@pytest.mark.parametrize("n_steps", [1, 256])
def test_adaptive_equals_verl_and_openrlhf_step_by_step(n_steps: int) -> None:
    ours = KLController("adaptive", init=0.2, target=6.0, horizon=10000)
    peer = _PeerAdaptive(0.2, 6.0, 10000)
    for kl in _kl_sequence(0, 500):
        ours.update(float(kl), n_steps=n_steps)
        peer.update(float(kl), n_steps)
        assert ours.value == float(peer.value)  # bit for bit, every step
    assert ours.n_updates == 500


def test_adaptive_closed_form() -> None:
    # a KL held at 1.5·target: error clips at 0.2, β = init·(1 + 0.2·n/h)^k
    c = KLController("adaptive", init=0.05, target=2.0, horizon=1000)
    for _ in range(50):
        c.update(3.0, n_steps=10)
    assert math.isclose(c.value, 0.05 * (1 + 0.2 * 10 / 1000) ** 50, rel_tol=1e-13)
    # below the target: error = 0.5/2 - 1 = -0.75, clipped to -0.2
    d = KLController("adaptive", init=1.0, target=2.0, horizon=100)
    d.update(0.5, n_steps=1)
    assert d.value == pytest.approx(1 - 0.2 / 100, rel=1e-15)
    # inside the clip: error = 2.2/2 - 1 = 0.1
    e = KLController("adaptive", init=1.0, target=2.0, horizon=100)
    e.update(2.2, n_steps=5)
    assert e.value == pytest.approx(1 + 0.1 * 5 / 100, rel=1e-15)


def test_fixed_never_moves() -> None:
    c = KLController("fixed", init=0.3)
    for kl in _kl_sequence(1, 20):
        c.update(float(kl), kl_stderr=0.1, n_steps=7)
    assert c.value == 0.3 and c.n_calls == 20 and c.n_updates == 0


def test_adaptive_se_moves_only_outside_the_noise() -> None:
    se, z, target = 0.5, 2.0, 6.0
    c = KLController("adaptive_se", init=0.2, target=target, horizon=100, z=z)
    peer = _PeerAdaptive(0.2, target, 100)
    moved = 0
    for kl in _kl_sequence(2, 300):
        kl = float(kl)
        c.update(kl, kl_stderr=se, n_steps=3)
        if abs(kl - target) > z * se:  # the rule, written out
            peer.update(kl, 3)
            moved += 1
        assert c.value == float(peer.value)
    assert c.n_updates == moved and 0 < moved < 300
    # exactly at the boundary: not "more than z standard errors", so no move
    b = KLController("adaptive_se", init=1.0, target=4.0, horizon=100, z=2.0)
    b.update(5.0, kl_stderr=0.5)
    assert b.value == 1.0
    # with no stderr it is "adaptive"
    a, s = KLController("adaptive", init=1.0), KLController("adaptive_se", init=1.0)
    for kl in _kl_sequence(3, 50):
        a.update(float(kl), n_steps=2)
        s.update(float(kl), n_steps=2)
    assert a.value == s.value
    # z = 0 moves on any deviation, even with an infinite stderr (0·inf is not NaN here):
    # error clip(+inf) = 0.2, so β = 1·(1 + 0.2·1/100)
    z0 = KLController("adaptive_se", init=1.0, target=4.0, horizon=100, z=0.0)
    z0.update(math.inf, kl_stderr=math.inf)
    assert z0.value == 1.0 + 0.2 / 100


def test_adaptive_se_does_not_random_walk_at_the_target() -> None:
    # the measured KL is target + noise of known stderr: "adaptive" drifts with the noise,
    # "adaptive_se" moves on ~4.6 % of steps only (P(|N(0,1)| > 2) = 0.0455)
    rng = np.random.default_rng(4)
    se, n = 1.0, 4000
    noise = rng.normal(0.0, se, size=n)
    a = KLController("adaptive", init=1.0, target=6.0, horizon=100)
    s = KLController("adaptive_se", init=1.0, target=6.0, horizon=100, z=2.0)
    for x in noise:
        a.update(6.0 + x, kl_stderr=se)
        s.update(6.0 + x, kl_stderr=se)
    p = math.erfc(2.0 / math.sqrt(2.0))
    tol = 4 * math.sqrt(p * (1 - p) / n)
    assert abs(s.n_updates / n - p) < tol
    assert a.n_updates == n


def test_state_dict_round_trip_resumes_identically() -> None:
    c = KLController("adaptive_se", init=0.1, target=3.0, horizon=500, z=1.5)
    kls = _kl_sequence(5, 40)
    for kl in kls[:20]:
        c.update(float(kl), kl_stderr=0.3, n_steps=4)
    state = c.state_dict()
    r = KLController()
    r.load_state_dict(state)
    assert r.state_dict() == state
    for kl in kls[20:]:
        c.update(float(kl), kl_stderr=0.3, n_steps=4)
        r.update(float(kl), kl_stderr=0.3, n_steps=4)
    assert r.value == c.value and r.n_updates == c.n_updates


def test_accepts_numpy_and_torch_scalars() -> None:
    torch = pytest.importorskip("torch")
    a, b = KLController(init=1.0), KLController(init=1.0)
    a.update(np.float32(7.0))
    b.update(torch.tensor(7.0), kl_stderr=torch.tensor(0.0))
    assert a.value == b.value == 1.0 * (1 + (7.0 / 6.0 - 1) / 10000)


def test_infinite_kl_clips() -> None:
    c = KLController(init=1.0, horizon=100)
    c.update(math.inf)
    assert c.value == 1 + 0.2 / 100


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: KLController("pid"), "kind"),  # type: ignore[arg-type]
        (lambda: KLController(init=0.0), "init"),
        (lambda: KLController(init=math.nan), "init"),
        (lambda: KLController(target=-1.0), "target"),
        (lambda: KLController(horizon=math.inf), "horizon"),
        (lambda: KLController(z=-0.5), "z"),
        (lambda: KLController().update(math.nan), "kl"),
        (lambda: KLController().update("1.0"), "kl"),
        (lambda: KLController().update(True), "kl"),
        (lambda: KLController().update(np.ones(2)), "kl"),
        (lambda: KLController().update(1.0, kl_stderr=-0.1), "kl_stderr"),
        (lambda: KLController().update(1.0, kl_stderr=math.nan), "kl_stderr"),
        (lambda: KLController().update(1.0, n_steps=-1), "n_steps"),
        (lambda: KLController().update(1.0, n_steps=1.5), "n_steps"),  # type: ignore[arg-type]
        (lambda: KLController(horizon=10).update(1.0, n_steps=50), "n_steps"),
        (lambda: KLController().load_state_dict({"kind": "fixed"}), "state"),
    ],
)
def test_bad_input_raises_klest_error(call, argument) -> None:
    with pytest.raises(KlestError) as info:
        call()
    assert info.value.argument == argument


def test_fixed_still_checks_inputs() -> None:
    with pytest.raises(KlestError, match="kl"):
        KLController("fixed").update(math.nan)
