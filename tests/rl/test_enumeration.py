"""Gradient truth by exact enumeration, in float64, to 1e-10.

The policy is a softmax categorical (one decision) or a 3-step autoregressive softmax policy over a
3-token vocabulary (27 sequences). Every outcome is listed, so the expectation of a per-sample
gradient is a finite sum: E_q[∇ t(x)] = ∇_θ Σ_x sg(q(x)) t(x). It must equal the gradient of the
divergence each option documents, computed by autograd of the exact divergence.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import klest  # noqa: E402
import klest.rl as rl  # noqa: E402

TOL = 1e-10
K = 5
F64 = torch.float64


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.allclose(a, b, rtol=0, atol=TOL), (a, b, (a - b).abs().max())


class Categorical:
    """q = softmax(θ) (the policy), p = softmax(φ) (the reference), q_old (a sampler)."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.theta = torch.randn(K, generator=g, dtype=F64)
        self.logp_ref = torch.log_softmax(torch.randn(K, generator=g, dtype=F64), 0)
        self.logq_old = torch.log_softmax(
            self.theta + 0.7 * torch.randn(K, generator=g, dtype=F64), 0
        )

    def expected_grad(self, term, sampler: str = "q") -> torch.Tensor:
        """E_{x~sampler}[∇θ term(x)], with term(logq [1,K], logp_ref [1,K], logq_old [1,K])."""
        th = self.theta.clone().requires_grad_(True)
        logq = torch.log_softmax(th, 0)
        probs = (logq if sampler == "q" else self.logq_old).detach().exp()
        t = term(logq[None], self.logp_ref[None], self.logq_old[None])
        (g,) = torch.autograd.grad((probs * t.reshape(-1)).sum(), th)
        return g

    def grad_of(self, divergence) -> torch.Tensor:
        th = self.theta.clone().requires_grad_(True)
        logq = torch.log_softmax(th, 0)
        (g,) = torch.autograd.grad(divergence(logq, self.logp_ref), th)
        return g

    def reverse(self) -> torch.Tensor:
        return self.grad_of(lambda lq, lp: (lq.exp() * (lq - lp)).sum())

    def forward(self) -> torch.Tensor:
        return self.grad_of(lambda lq, lp: (lp.exp() * (lp - lq)).sum())


SEEDS = [0, 1, 2]
VALUES = [
    "k1",
    "k2",
    "k3",
    "abs",
    "forward_k1",
    "forward_k3",
    "chi2",
    "jensen_shannon",
    "alpha:0.5",
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("estimator", VALUES)
def test_reverse_and_forward_options_follow_their_divergence_for_any_value(seed, estimator):
    c = Categorical(seed)
    for gradient, truth in (("reverse_kl", c.reverse()), ("forward_kl", c.forward())):
        got = c.expected_grad(
            lambda lq, lp, lo: rl.kl_per_token(lq, lp, estimator=estimator, gradient=gradient)
        )
        _close(got, truth)
        # through the fused, aggregated loss too ("sum" over the K listed outcomes)
        got = c.expected_grad(
            lambda lq, lp, lo: torch.stack(
                [
                    rl.kl_loss(
                        lq[:, i : i + 1],
                        lp[:, i : i + 1],
                        estimator=estimator,
                        gradient=gradient,
                        aggregation="sum",
                    ).loss
                    for i in range(K)
                ]
            )
        )
        _close(got, truth)
    lq = torch.log_softmax(c.theta.clone().requires_grad_(True), 0)[None]
    none = rl.kl_per_token(lq, c.logp_ref[None], estimator=estimator, gradient="none")
    assert not none.requires_grad  # detached: no gradient at all


@pytest.mark.parametrize("seed", SEEDS)
def test_as_written_gradients_k1_nothing_k2_reverse_k3_forward(seed):
    c = Categorical(seed)

    def as_written(est):
        return c.expected_grad(
            lambda lq, lp, lo: rl.kl_per_token(lq, lp, estimator=est, gradient="as_written")
        )

    _close(as_written("k1"), torch.zeros(K, dtype=F64))
    _close(as_written("k2"), c.reverse())
    _close(as_written("k3"), c.forward())
    # the general rule: ∇D_h with h(r) - r h'(r) = -v'(log r); for r log r - (r - 1) that is
    # h = ½ r (log r)², i.e. ∇ ½E_{π_ref}[ℓ²]
    half_sq_ref = c.grad_of(lambda lq, lp: (lp.exp() * (lp - lq) ** 2).sum() / 2)
    _close(as_written("forward_k3"), half_sq_ref)
    assert (c.reverse() - c.forward()).abs().max() > 1e-3  # the two really differ here


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("estimator", VALUES)
def test_differentiable_weight_follows_the_gradient_of_what_the_value_estimates(seed, estimator):
    """weight="differentiable": E[∇(w v)] = ∇E_π[v] (score + pathwise), on- and off-policy."""
    c = Categorical(seed)
    core = {
        "k1": klest.k1,
        "k2": klest.k2,
        "k3": klest.k3,
        "forward_k1": klest.forward_k1,
        "forward_k3": klest.forward_k3,
    }
    if estimator == "abs":
        v = lambda lq, lp: (lq - lp).abs()  # noqa: E731
    elif estimator in core:
        v = core[estimator]
    else:
        v = lambda lq, lp: klest.fdiv(lq, lp, estimator)  # noqa: E731
    truth = c.grad_of(lambda lq, lp: (lq.exp() * v(lq, lp)).sum())
    on = c.expected_grad(
        lambda lq, lp, lo: rl.kl_per_token(
            lq, lp, estimator=estimator, gradient="as_written", weight="differentiable"
        )
    )
    _close(on, truth)
    off = c.expected_grad(
        lambda lq, lp, lo: rl.kl_per_token(
            lq, lp, old_logp=lo, estimator=estimator, gradient="as_written", weight="differentiable"
        ),
        sampler="old",
    )
    _close(off, truth)
    if estimator in ("k1", "k3"):
        _close(truth, c.reverse())
    if estimator in ("forward_k1", "forward_k3"):
        _close(truth, c.forward())


@pytest.mark.parametrize("seed", SEEDS)
def test_detached_weight_off_policy_keeps_each_option_meaning(seed):
    c = Categorical(seed)
    for gradient, truth in (("reverse_kl", c.reverse()), ("forward_kl", c.forward())):
        for est in ("k1", "k3"):
            for weight in ("detached", "gradient_only"):  # the gradient is the same for both
                got = c.expected_grad(
                    lambda lq, lp, lo: rl.kl_per_token(
                        lq, lp, old_logp=lo, estimator=est, gradient=gradient, weight=weight
                    ),
                    sampler="old",
                )
                _close(got, truth)
    got = c.expected_grad(
        lambda lq, lp, lo: rl.kl_per_token(
            lq, lp, old_logp=lo, estimator="k3", gradient="as_written"
        ),
        sampler="old",
    )
    _close(got, c.forward())
    # the importance-weighted value is unbiased for KL(q‖p) under the sampler
    with torch.no_grad():
        lq = torch.log_softmax(c.theta, 0)
        kl = (lq.exp() * (lq - c.logp_ref)).sum()
        vals = rl.kl_per_token(
            lq[None], c.logp_ref[None], old_logp=c.logq_old[None], estimator="k3"
        )
        assert abs(float((c.logq_old.exp() * vals[0]).sum() - kl)) < TOL
        # weight="gradient_only" reports the unweighted k3 (not unbiased under the sampler)
        plain = rl.kl_per_token(
            lq[None], c.logp_ref[None], old_logp=c.logq_old[None], weight="gradient_only"
        )
        _close(plain, rl.kl_per_token(lq[None], c.logp_ref[None]))


def test_weight_clamp_is_a_bias_and_is_counted():
    c = Categorical(0)
    lq = torch.log_softmax(c.theta, 0)
    w = (lq - c.logq_old).exp()
    cap = float(w.median())  # about half the outcomes are clipped
    clipped = w > cap
    assert 0 < int(clipped.sum()) < K
    got = c.expected_grad(
        lambda lq_, lp, lo: rl.kl_per_token(
            lq_, lp, old_logp=lo, estimator="k1", gradient="reverse_kl", weight_clamp=cap
        ),
        sampler="old",
    )
    # exact expectation with the clipped weight: Σ q_old · min(w, c) · ℓ · ∇log q
    ell = (lq - c.logp_ref).detach()
    coef = c.logq_old.exp() * w.clamp(max=cap) * ell
    truth = c.grad_of(lambda lq_, lp: (coef * lq_).sum())
    _close(got, truth)
    assert (got - c.reverse()).abs().max() > 1e-4
    out = rl.kl_loss(lq[None], c.logp_ref[None], old_logp=c.logq_old[None], weight_clamp=cap)
    assert out.diagnostics is not None
    assert float(out.diagnostics.frac_weight_clamped) == pytest.approx(int(clipped.sum()) / K)
    ess = float(w.sum() ** 2 / (w * w).sum())
    assert float(out.diagnostics.ess) == pytest.approx(ess, rel=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_penalties_in_the_reward(seed):
    """Detached penalty fed to REINFORCE (sg(v)·log q): k1 follows reverse KL, k3 is biased
    (reverse minus forward)."""
    c = Categorical(seed)

    def reward(est):
        return c.expected_grad(
            lambda lq, lp, lo: rl.kl_penalty(lq, lp, estimator=est) * lq  # REINFORCE surrogate
        )

    _close(reward("k1"), c.reverse())
    _close(reward("k3"), c.reverse() - c.forward())


# ------------------------------------------------------------------- autoregressive, 3 steps
V, T = 3, 3


class Autoregressive:
    """π(y_t | y_<t) = softmax(θ[prefix]); π_ref likewise with φ. All V^T sequences listed."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        n_prefix = sum(V**t for t in range(T))
        self.theta = torch.randn(n_prefix, V, generator=g, dtype=F64)
        self.ref = torch.log_softmax(1.5 * torch.randn(n_prefix, V, generator=g, dtype=F64), 1)
        seqs = torch.cartesian_prod(*[torch.arange(V)] * T)  # [V^T, T]
        idx = torch.zeros_like(seqs)
        for t in range(1, T):
            base = sum(V**s for s in range(t))
            code = torch.zeros(len(seqs), dtype=torch.long)
            for s in range(t):
                code = code * V + seqs[:, s]
            idx[:, t] = base + code
        self.seqs, self.idx = seqs, idx
        # a mask that ends a sequence after token 0 (an end-of-sequence token)
        ended = torch.cumsum((seqs == 0).long(), 1) - (seqs == 0).long() > 0
        self.eos_mask = ~ended

    def logps(self, theta):
        lq = torch.log_softmax(theta, 1)[self.idx, self.seqs]
        lp = self.ref[self.idx, self.seqs]
        return lq, lp

    def expected_grad(self, per_row):
        """Σ_y sg(π(y)) per_row(logq [N,T], logp [N,T]) -> ∇θ (per_row returns [N])."""
        th = self.theta.clone().requires_grad_(True)
        lq, lp = self.logps(th)
        prob = lq.sum(1).detach().exp()
        (g,) = torch.autograd.grad((prob * per_row(lq, lp)).sum(), th)
        return g

    def sequence_kl_grad(self, mask):
        th = self.theta.clone().requires_grad_(True)
        lq, lp = self.logps(th)
        kl = (lq.sum(1).exp() * ((lq - lp) * mask).sum(1)).sum()
        (g,) = torch.autograd.grad(kl, th)
        return g

    def per_position_kl_grad(self, mask):
        """Σ_y sg(π(y)) Σ_t m_t ∇KL(π(·|y_<t)‖π_ref(·|y_<t)): prefixes held fixed."""
        th = self.theta.clone().requires_grad_(True)
        lq_all = torch.log_softmax(th, 1)
        kl_prefix = (lq_all.exp() * (lq_all - self.ref)).sum(1)
        lq, _ = self.logps(th)
        prob = lq.sum(1).detach().exp()
        (g,) = torch.autograd.grad((prob * (kl_prefix[self.idx] * mask).sum(1)).sum(), th)
        return g


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("masked", [False, True])
def test_sequence_level_gradients(seed, masked):
    a = Autoregressive(seed)
    mask = a.eos_mask if masked else torch.ones_like(a.eos_mask)
    mf = mask.to(F64)
    seq_truth = a.sequence_kl_grad(mf)
    tok_truth = a.per_position_kl_grad(mf)
    assert (seq_truth - tok_truth).abs().max() > 1e-3  # later tokens' KL matters here

    # per-token reverse-KL gradient: the per-position KL at the sampled prefixes only
    got = a.expected_grad(lambda lq, lp: (rl.kl_per_token(lq, lp, mask=mask) * mf).sum(1))
    _close(got, tok_truth)

    # the sequence option, through the fused loss (one row at a time, "sum")
    def seq_loss(lq, lp):
        return torch.stack(
            [
                rl.kl_loss(
                    lq[i : i + 1],
                    lp[i : i + 1],
                    mask=mask[i : i + 1],
                    gradient="sequence_reverse_kl",
                    aggregation="sum",
                ).loss
                for i in range(len(lq))
            ]
        )

    _close(a.expected_grad(seq_loss), seq_truth)
    # and per token, then aggregated by the user with a row-constant weight
    got = a.expected_grad(
        lambda lq, lp: rl.kl_per_token(lq, lp, mask=mask, gradient="sequence_reverse_kl").sum(1)
    )
    _close(got, seq_truth)

    # k1 in the reward with reward-to-go returns: REINFORCE Σ_t log π_t · sg(G_t)
    def reinforce(lq, lp):
        returns = rl.reward_to_go(rl.kl_penalty(lq, lp, mask=mask), mask)
        return (lq * returns * mf).sum(1)

    _close(a.expected_grad(reinforce), seq_truth)

    # ... which per-token rewards (no return) do not give
    got = a.expected_grad(lambda lq, lp: (lq * rl.kl_penalty(lq, lp, mask=mask) * mf).sum(1))
    assert (got - seq_truth).abs().max() > 1e-3


@pytest.mark.parametrize("seed", SEEDS)
def test_options_that_share_the_per_sample_reverse_kl_gradient(seed):
    """Per sample, not only in expectation: k1 in the reward, k2 as a loss, k3 with the
    reverse-KL gradient and k3 × a differentiable weight all give ℓ·∇log π (the last because
    k3 + (1 - r) = ℓ); off-policy, k3 × differentiable w equals the detached-w reverse gradient.
    k1 × a differentiable weight adds 1·∇log π: same mean, more variance."""
    c = Categorical(seed)
    lq = torch.log_softmax(c.theta.clone().requires_grad_(True), 0)[None]
    ref, old = c.logp_ref[None], c.logq_old[None]

    def per_sample(t):
        return torch.autograd.grad(t.sum(), lq, retain_graph=True)[0]

    base = per_sample(rl.kl_per_token(lq, ref, estimator="k3"))
    _close(base, (lq - ref).detach())
    _close(per_sample(rl.kl_penalty(lq, ref) * lq), base)
    _close(per_sample(rl.kl_per_token(lq, ref, estimator="k2", gradient="as_written")), base)
    k3w = rl.kl_per_token(lq, ref, estimator="k3", gradient="as_written", weight="differentiable")
    _close(per_sample(k3w), base)
    k1w = rl.kl_per_token(lq, ref, estimator="k1", gradient="as_written", weight="differentiable")
    _close(per_sample(k1w), base + 1)
    off_diff = rl.kl_per_token(
        lq, ref, old_logp=old, estimator="k3", gradient="as_written", weight="differentiable"
    )
    off_det = rl.kl_per_token(lq, ref, old_logp=old, estimator="k3", gradient="reverse_kl")
    _close(per_sample(off_diff), per_sample(off_det))


@pytest.mark.parametrize("seed", SEEDS)
def test_each_preset_follows_what_its_docstring_says(seed):
    """The one-line ``follows`` of every preset, checked by enumeration (no clamp binds here)."""
    from klest.rl import presets

    c = Categorical(seed)
    g = torch.Generator().manual_seed(100 + seed)  # a reference close enough that no clamp binds
    c.logp_ref = torch.log_softmax(c.theta + 0.8 * torch.randn(K, generator=g, dtype=F64), 0)
    lq = torch.log_softmax(c.theta, 0)
    assert (lq - c.logp_ref).abs().max() < 2 and ((lq - c.logq_old).exp() < 10).all()
    truths = {
        "nothing": torch.zeros(K, dtype=F64),
        "reverse KL": c.reverse(),
        "forward KL": c.forward(),
        "½E_π[ℓ²]": c.grad_of(lambda lq, lp: (lq.exp() * (lq - lp) ** 2).sum() / 2),
    }
    checked = 0
    for name in presets.names():
        p = presets.get(name)
        key = next((k for k in truths if p.follows.startswith(k)), None)
        if key is None:
            assert p.follows.startswith("no divergence"), name
            continue
        for sampler, old in (("q", False), ("old", True)):
            if old and not p.uses_old_logp:
                continue
            got = c.expected_grad(
                lambda lq, lp, lo: p(lq, lp, old_logp=lo if old else None), sampler=sampler
            )
            assert torch.allclose(got, truths[key], rtol=0, atol=TOL), name
            checked += 1
    assert checked >= len(presets.names())
