"""klest.rl.sequence_kl: the sequence-level KL and its gradient, proved by exact enumeration.

The autoregressive toy policy of :mod:`klest.lab.gradients` lists every sequence (V^T of them)
with its prefix rows; the expectation of a per-sequence quantity is a finite sum. Truth is
computed here, independently, by autograd through the enumerated closed form
Σ_y π(y) Σ_t m_t (log π(y_t|y_<t) − log π_ref(y_t|y_<t)), in float64, to 1e-10.

Statistical policy (sampled tests): fixed seeds; a sampled mean is compared with its enumerated
expectation within 4 standard errors (tests/conftest.py's N_SIGMA), the standard error being the
sample stdev of M independent batch estimates over √M. A gradient is compared through two scalar
projections (on the exact gradient's direction and on a fixed random direction), each one such
test. Variances are compared with a relative tolerance of 4·√(2/(M−1)) (the standard error of a
sample variance of Gaussian-like data).
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import klest.rl as rl  # noqa: E402
from klest import KlestError  # noqa: E402
from klest.lab.gradients import toy_model  # noqa: E402
from klest.logits import full_kl  # noqa: E402

F64 = torch.float64
TOL = 1e-10
N_SIGMA = 4.0


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is much faster than waking a pool on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    assert torch.allclose(a, b, rtol=0, atol=tol), (a, b, (a - b).abs().max())


def _inputs(model, theta):
    """Per-token inputs of every sequence: logits [N,T,V], logp, ref_logp, old_logp, mask."""
    logits = theta[model.prefix]
    lq = torch.log_softmax(logits, -1).gather(-1, model.seqs[..., None]).squeeze(-1)
    lr = torch.log_softmax(model.ref, -1)[model.prefix, model.seqs]
    lo = None if model.old is None else torch.log_softmax(model.old, -1)[model.prefix, model.seqs]
    return logits, lq, lr, lo


def _truth(model):
    """∇θ of the sequence KL(π‖π_ref), autograd of the enumerated closed form."""
    th = model.theta.clone().requires_grad_(True)
    lq = torch.log_softmax(th, -1)[model.prefix, model.seqs]
    lr = torch.log_softmax(model.ref, -1)[model.prefix, model.seqs]
    kl = (lq.sum(1).exp() * ((lq - lr) * model.mask).sum(1)).sum()
    (g,) = torch.autograd.grad(kl, th)
    return float(kl.detach()), g


def _expected(model, terms_fn, sampler="pi"):
    """(E[row sum], E[∇θ row sum]) over every sequence, rows weighted by π (or μ)."""
    th = model.theta.clone().requires_grad_(True)
    logits, lq, lr, lo = _inputs(model, th)
    table = th if sampler == "pi" else model.old
    prob = torch.log_softmax(table.detach(), -1)[model.prefix, model.seqs].sum(1).exp()
    rows = terms_fn(logits, lq, lr, lo).sum(1)
    (g,) = torch.autograd.grad((prob * rows).sum(), th)
    return float((prob * rows.detach()).sum()), g


def _kl(logits, model):
    return full_kl(logits, model.ref[model.prefix], mask=model.mask)


MODELS = [(3, 3, False, 0), (3, 3, True, 1), (2, 4, True, 2)]


@pytest.mark.parametrize(("V", "T", "eos", "seed"), MODELS)
def test_on_policy_estimators_are_exact(V, T, eos, seed):
    model = toy_model(V, T, distance=1.0, eos=eos, seed=seed)
    kl_true, g_true = _truth(model)
    m = model.mask
    for estimator, kw in (
        ("k1", {}),
        ("full", {}),
        ("mix", {"alpha": 0.3}),
        ("mix", {"alpha": -1.5}),
    ):

        def terms(logits, lq, lr, lo, estimator=estimator, kw=kw):
            kl = _kl(logits, model) if estimator != "k1" else None
            return rl.sequence_kl(lq, lr, kl=kl, mask=m, estimator=estimator, **kw).terms

        value, grad = _expected(model, terms)
        assert abs(value - kl_true) < TOL, estimator
        _close(grad, g_true)
    # the per-position KL alone (no score term) misses how a token changes the later KLs
    _, g_path = _expected(model, lambda logits, *_: _kl(logits, model))
    assert (g_path - g_true).abs().max() > 1e-3


def test_full_estimator_with_an_independent_float64_kl():
    """The same, with the per-position KL written out naively here instead of klest.logits."""
    model = toy_model(3, 3, eos=True, seed=4)
    _, g_true = _truth(model)

    def terms(logits, lq, lr, lo):
        a = torch.log_softmax(logits, -1)
        b = torch.log_softmax(model.ref[model.prefix], -1)
        kl = (a.exp() * (a - b)).sum(-1)
        return rl.sequence_kl(lq, kl=kl, mask=model.mask).terms

    _close(_expected(model, terms)[1], g_true)


@pytest.mark.parametrize(("V", "T", "eos", "seed"), MODELS)
def test_off_policy_per_decision_and_sequence_weights_are_exact(V, T, eos, seed):
    model = toy_model(V, T, distance=1.0, off_policy=0.8, eos=eos, seed=seed)
    kl_true, g_true = _truth(model)
    m = model.mask
    for estimator in ("k1", "full", "mix"):
        for weighting in ("per_decision", "sequence"):

            def terms(logits, lq, lr, lo, estimator=estimator, weighting=weighting):
                kl = _kl(logits, model) if estimator != "k1" else None
                return rl.sequence_kl(
                    lq,
                    lr,
                    kl=kl,
                    old_logp=lo,
                    mask=m,
                    estimator=estimator,
                    alpha=0.7,
                    weighting=weighting,
                ).terms

            value, grad = _expected(model, terms, sampler="mu")
            assert abs(value - kl_true) < TOL, (estimator, weighting)
            _close(grad, g_true)
    # a weight cap above every weight changes nothing
    w_max = float(
        (model.logp(model.theta) - model.logp(model.old)).masked_fill(~m, 0).cumsum(1).exp().max()
    )

    def capped(cap, weighting="per_decision"):
        def terms(logits, lq, lr, lo):
            return rl.sequence_kl(
                lq,
                kl=_kl(logits, model),
                old_logp=lo,
                mask=m,
                weighting=weighting,
                weight_clamp=cap,
            ).terms

        return _expected(model, terms, sampler="mu")[1]

    _close(capped(w_max * 1.01), g_true)


def test_per_token_weights_and_clipping_are_biased():
    model = toy_model(3, 3, distance=1.0, off_policy=1.0, seed=5)
    _, g_true = _truth(model)
    m = model.mask

    def err(**kw):
        def terms(logits, lq, lr, lo):
            kl = _kl(logits, model)
            return rl.sequence_kl(lq, lr, kl=kl, old_logp=lo, mask=m, **kw).terms

        g = _expected(model, terms, sampler="mu")[1]
        return float((g - g_true).norm() / g_true.norm())

    assert err(estimator="k1", weighting="per_token") > 0.05
    assert err(estimator="full", weighting="per_token") > 0.05
    assert err(weight_clamp=1.0) > 1e-3
    # without any weight (the sampler ignored) it is biased too
    assert err(estimator="full", weighting="per_token", weight_clamp=1.0) > 0.05


def _two_step():
    """math.md §4: π(a) = 0.5, π_ref(a) = 0.9; after a the policy (almost surely) emits a token
    with log-ratio 3; after b the policy equals the reference."""
    big = 60.0  # π(x|a) = 1 - e^{-60}: deterministic to far below the test tolerance
    logits = torch.tensor(
        [[[0.0, 0.0], [big, 0.0]], [[0.0, 0.0], [0.3, -0.2]]], dtype=F64
    )  # rows: y_1 = a, y_1 = b
    after_a = [0.0, math.log(math.exp(3.0) - 1)]  # π_ref(x|a) = e^{-3}
    ref = torch.tensor(
        [[[math.log(9.0), 0.0], after_a], [[math.log(9.0), 0.0], [0.3, -0.2]]], dtype=F64
    )
    tokens = torch.tensor([[0, 0], [1, 0]])
    prob = torch.tensor([0.5, 0.5], dtype=F64)  # π(y) of the two sequences that have mass
    return logits, ref, tokens, prob


def test_two_step_counterexample_full_kl_can_have_more_variance_than_k1():
    logits, ref, tokens, prob = _two_step()
    k1 = rl.sequence_kl_from_logits(logits, ref, tokens, estimator="k1").terms.sum(1)
    full = rl.sequence_kl_from_logits(logits, ref, tokens, estimator="full").terms.sum(1)
    # closed forms, derived by hand: ℓ_1 = log(0.5/0.9) or log(0.5/0.1); ℓ_2 = 3 or 0;
    # KL_1 = ½(log(0.5/0.9) + log(0.5/0.1)); KL_2 = 3 or 0
    la, lb = math.log(0.5 / 0.9), math.log(0.5 / 0.1)
    kl1 = 0.5 * (la + lb)
    _close(k1, torch.tensor([la + 3.0, lb], dtype=F64), 1e-12)
    _close(full, torch.tensor([kl1 + 3.0, kl1], dtype=F64), 1e-12)

    def var(x):
        mean = (prob * x).sum()
        return float((prob * (x - mean) ** 2).sum()), float(mean)

    (v1, m1), (vf, mf) = var(k1), var(full)
    assert m1 == pytest.approx(mf, abs=1e-12) and m1 == pytest.approx(2.011, abs=1e-3)
    assert v1 == pytest.approx(0.25 * (la + 3 - lb) ** 2, abs=1e-12)  # 0.161
    assert vf == pytest.approx(0.25 * 9.0, abs=1e-12)  # 2.25
    assert round(v1, 3) == 0.161 and vf > 10 * v1
    # the variance-optimal mix does at least as well as the better of the two
    a = torch.linspace(-1, 2, 301, dtype=F64)
    mixes = [var(ai * k1 + (1 - ai) * full)[0] for ai in a]
    assert min(mixes) <= min(v1, vf) + 1e-12
    # here the two sums are perfectly correlated: the best mix has zero variance
    assert min(mixes) < 1e-3


def _sample_batches(model, B, M, seed, sampler="pi"):
    g = torch.Generator().manual_seed(seed)
    table = model.theta if sampler == "pi" else model.old
    prob = model.seq_logprob(table).exp()
    return torch.multinomial(prob, B * M, replacement=True, generator=g).reshape(M, B)


def _batch_estimates(model, idx, **kw):
    """Per batch: (value = mean row sum, gradient of the mean row sum) [M], [M, P·V]."""
    values, grads = [], []
    for rows in idx:
        th = model.theta.clone().requires_grad_(True)
        logits = th[model.prefix[rows]]
        seqs, m = model.seqs[rows], model.mask[rows]
        lq = torch.log_softmax(logits, -1).gather(-1, seqs[..., None]).squeeze(-1)
        lr = torch.log_softmax(model.ref, -1)[model.prefix[rows], seqs]
        lo = None
        if model.old is not None and kw.get("sampler") == "mu":
            lo = torch.log_softmax(model.old, -1)[model.prefix[rows], seqs]
        kl = full_kl(logits, model.ref[model.prefix[rows]], mask=m)
        opts = {k: v for k, v in kw.items() if k != "sampler"}
        out = rl.sequence_kl(lq, lr, kl=kl, old_logp=lo, mask=m, **opts)
        loss = rl.aggregate(out.terms, m, "seq-mean-token-sum")
        (gr,) = torch.autograd.grad(loss, th)
        values.append(float(loss.detach()))
        grads.append(gr.reshape(-1))
    return torch.tensor(values, dtype=F64), torch.stack(grads)


def _agrees(samples: torch.Tensor, exact: float) -> None:
    M = samples.shape[0]
    se = float(samples.std()) / math.sqrt(M)
    assert abs(float(samples.mean()) - exact) <= N_SIGMA * se + 1e-12, (
        float(samples.mean()),
        exact,
        se,
    )


@pytest.mark.parametrize(
    "kw",
    [
        {"estimator": "full"},
        {"estimator": "k1"},
        {"estimator": "mix"},  # cross-fitted α
        {"estimator": "mix", "sampler": "mu"},
        {"estimator": "full", "sampler": "mu"},
    ],
)
def test_sampled_estimates_agree_with_the_enumerated_truth(kw):
    model = toy_model(3, 3, distance=1.0, off_policy=0.5, eos=True, seed=7)
    kl_true, g_true = _truth(model)
    idx = _sample_batches(model, 32, 150, seed=11, sampler=kw.get("sampler", "pi"))
    values, grads = _batch_estimates(model, idx, **kw)
    _agrees(values, kl_true)
    direction = g_true.reshape(-1) / g_true.norm()
    rand = torch.randn(direction.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    for u in (direction, rand / rand.norm()):
        _agrees(grads @ u, float(g_true.reshape(-1) @ u))


def test_cross_fitted_mix_is_never_much_worse_than_the_better_of_the_two():
    """The two-step example, sampled: the cross-fitted α tracks the optimum, so the mix's value
    variance is within its sampling error of the better estimator's (here far below both)."""
    logits, ref, tokens, prob = _two_step()
    g = torch.Generator().manual_seed(0)
    B, M = 32, 200
    rows = torch.multinomial(prob, B * M, replacement=True, generator=g).reshape(M, B)
    est = {}
    for name, kw in (("k1", {"estimator": "k1"}), ("full", {}), ("mix", {"estimator": "mix"})):
        means = []
        for r in rows:
            out = rl.sequence_kl_from_logits(logits[r], ref[r], tokens[r], **kw)
            means.append(out.terms.sum(-1).mean())
        est[name] = torch.stack(means)  # the batch means [M]
    v = {k: float(x.var()) for k, x in est.items()}
    tol = N_SIGMA * math.sqrt(2 / (M - 1))
    assert v["mix"] <= min(v["k1"], v["full"]) * (1 + tol)
    for x in est.values():  # all three unbiased
        _agrees(x, 0.5 * (math.log(0.5 / 0.9) + math.log(5.0)) + 1.5)


def test_fit_alpha_matches_the_closed_form_and_is_cross_fitted():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(10, 3, generator=g, dtype=F64)
    b = a + 0.5 * torch.randn(10, 3, generator=g, dtype=F64)
    alpha = rl.fit_alpha(a, b, folds=2)
    for k in range(2):
        other = torch.arange(10) % 2 != k
        # minimise Σ_t Var(α a_t + (1 - α) b_t) over the other fold by brute force
        grid = torch.linspace(-3, 3, 6001, dtype=F64)
        ao, bo = a[other], b[other]
        mix = grid[:, None, None] * ao + (1 - grid[:, None, None]) * bo
        var = (mix - mix.mean(1, keepdim=True)).pow(2).sum((1, 2))
        best = float(grid[var.argmin()])
        assert abs(float(alpha[torch.arange(10) % 2 == k][0]) - best) <= 0.001
    # a row's α never depends on that row
    a2 = a.clone()
    a2[0] += 100.0
    assert float(rl.fit_alpha(a2, b)[0]) == float(alpha[0])
    # too few rows outside a fold: α = 0 (the full estimator)
    assert float(rl.fit_alpha(a[:2], b[:2]).abs().max()) == 0.0


def test_value_is_the_per_position_estimate_and_masked_tokens_are_zero():
    logp = torch.tensor([[-0.7, -0.2, -5.0]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[-0.9, -0.1, 3.0]], dtype=F64)
    kl = torch.tensor([[0.3, 0.5, float("nan")]], dtype=F64, requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    out = rl.sequence_kl(logp, ref, kl=kl, mask=mask, estimator="mix", alpha=0.25)
    _close(
        out.terms.detach(),
        torch.tensor([[0.25 * 0.2 + 0.75 * 0.3, 0.25 * -0.1 + 0.75 * 0.5, 0]], dtype=F64),
    )
    out.terms.sum().backward()
    # d/dlogp: 0.25·(ℓ_1 + ℓ_2, ℓ_2) + 0.75·(KL_2, 0); d/dkl: 0.75 on valid tokens
    _close(logp.grad, torch.tensor([[0.25 * 0.1 + 0.75 * 0.5, 0.25 * -0.1, 0]], dtype=F64))
    _close(kl.grad, torch.tensor([[0.75, 0.75, 0]], dtype=F64))
    assert out.alpha is not None and float(out.alpha[0]) == 0.25


def test_from_logits_equals_the_per_token_form():
    model = toy_model(3, 3, off_policy=0.5, seed=1)
    logits, lq, lr, lo = _inputs(model, model.theta)
    a = rl.sequence_kl_from_logits(logits, model.ref[model.prefix], model.seqs, old_logp=lo)
    b = rl.sequence_kl(lq, lr, kl=_kl(logits, model), old_logp=lo)
    _close(a.terms, b.terms, 1e-12)


def test_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(KlestError, match="estimator"):
        rl.sequence_kl(x, x, kl=x, estimator="k3")  # type: ignore[arg-type]
    with pytest.raises(KlestError, match="needs kl"):
        rl.sequence_kl(x, x)
    with pytest.raises(KlestError, match="needs ref_logp"):
        rl.sequence_kl(x, kl=x, estimator="k1")
    with pytest.raises(KlestError, match="shape"):
        rl.sequence_kl(x, kl=torch.zeros(2, 4))
    with pytest.raises(KlestError, match="weighting"):
        rl.sequence_kl(x, kl=x, weighting="tis")  # type: ignore[arg-type]
    with pytest.raises(KlestError, match=">= 1"):
        rl.sequence_kl(x, kl=x, old_logp=x, weight_clamp=0.5)
    with pytest.raises(KlestError, match="folds"):
        rl.fit_alpha(x, x, folds=1)
    for bad in ("2", 2.0, True, None):  # not integers: a KlestError, never a raw TypeError
        with pytest.raises(KlestError, match="folds"):
            rl.fit_alpha(x, x, folds=bad)  # type: ignore[arg-type]
        with pytest.raises(KlestError, match="folds"):
            rl.sequence_kl(x, x, kl=x, estimator="mix", folds=bad)  # type: ignore[arg-type]


def test_dtypes_and_padding_that_holds_anything():
    logp = torch.tensor([[-0.7, -0.2, -float("inf")]], dtype=torch.bfloat16, requires_grad=True)
    ref = torch.tensor([[-0.9, -0.1, float("nan")]], dtype=torch.bfloat16)
    kl = torch.tensor([[0.3, 0.5, float("inf")]], requires_grad=True)
    old = torch.tensor([[-0.6, -0.3, float("nan")]], dtype=torch.bfloat16)
    mask = torch.tensor([[1, 1, 0]])
    out = rl.sequence_kl(logp, ref, kl=kl, old_logp=old, mask=mask, estimator="mix", alpha=0.5)
    assert out.terms.dtype == torch.float32
    assert torch.isfinite(out.terms).all() and float(out.terms.detach()[0, 2]) == 0.0
    out.terms.sum().backward()
    assert logp.grad is not None and logp.grad.dtype == torch.bfloat16
    assert torch.isfinite(logp.grad.float()).all() and float(logp.grad[0, 2]) == 0.0
    assert kl.grad is not None and torch.isfinite(kl.grad).all() and float(kl.grad[0, 2]) == 0.0


def test_a_zero_probability_reference_token_gives_plus_inf_not_nan():
    """π_ref gives the first sampled token probability 0: ℓ_1 = KL_1 = +inf, so the sequence KL
    is +inf; the score term of a later-infinite return must not turn the value into 0·inf = NaN."""
    logp = torch.tensor([[-0.5, -0.7], [-0.6, -0.2]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[-math.inf, -0.1], [-0.9, -0.3]], dtype=F64)
    kl = torch.tensor([[math.inf, 0.2], [0.1, 0.3]], dtype=F64)
    with pytest.warns(RuntimeWarning, match=r"\+inf"):
        k1 = rl.sequence_kl(logp, ref, estimator="k1").terms
    assert float(k1.detach()[0, 0]) == math.inf and not k1.detach().isnan().any()
    assert float(k1.detach()[1].sum()) == pytest.approx(0.3 + 0.1, abs=1e-12)
    with pytest.warns(RuntimeWarning, match=r"\+inf"):
        for alpha in (0.0, 1.0, -1.5, "cross_fit"):
            mix = rl.sequence_kl(logp, ref, kl=kl, estimator="mix", alpha=alpha).terms
            assert float(mix.detach()[0, 0]) == math.inf and not mix.detach().isnan().any()
    # the infinite row carries no moments: with 3 rows, row 2's α comes from row 1 alone (< 2)
    k1r = torch.tensor([[math.inf], [1.0], [2.0]], dtype=F64)
    fr = torch.tensor([[math.inf], [0.5], [0.0]], dtype=F64)
    assert torch.isfinite(rl.fit_alpha(k1r, fr)).all()


def test_alpha_and_sampled_log_probs_are_checked():
    x = torch.zeros(2, 3)
    for bad in (float("nan"), float("inf"), "fit"):
        with pytest.raises(KlestError, match="alpha"):
            rl.sequence_kl(x, x, kl=x, estimator="mix", alpha=bad)  # type: ignore[arg-type]
    inf = x.clone()
    inf[0, 1] = -math.inf
    with pytest.raises(KlestError, match="old_logp"):  # a token μ sampled cannot have μ = 0
        rl.sequence_kl(x, kl=x, old_logp=inf)
    with pytest.raises(KlestError, match="logp"):
        rl.sequence_kl(inf, kl=x)
    # masked tokens may hold anything
    mask = torch.tensor([[True, False, True]] * 2)
    out = rl.sequence_kl(x, kl=x, old_logp=inf, mask=mask)
    assert torch.isfinite(out.terms).all()


def test_from_logits_does_not_read_masked_positions():
    """Padding positions may hold anything (NaN logits, id -100), as in klest.logits."""
    model = toy_model(3, 3, seed=2)
    logits, *_ = _inputs(model, model.theta)
    ref = model.ref[model.prefix]
    mask = torch.ones(logits.shape[:2], dtype=torch.bool)
    mask[:, -1] = False
    clean = rl.sequence_kl_from_logits(logits, ref, model.seqs, mask=mask, estimator="mix")
    dirty_logits, tokens = logits.clone(), model.seqs.clone()
    dirty_logits[:, -1] = math.nan
    tokens[:, -1] = -100
    dirty = rl.sequence_kl_from_logits(dirty_logits, ref, tokens, mask=mask, estimator="mix")
    _close(dirty.terms, clean.terms, 0.0)


def test_from_logits_gradient_to_a_trainable_reference_is_the_same_for_every_estimator():
    """When ``ref_logits`` requires grad (e.g. a teacher trained too), every estimator's expected
    gradient w.r.t. π_ref is ∇_ref of the sequence KL (sampling does not depend on π_ref): truth
    by autograd of the enumerated closed form Σ_y π(y) Σ_t m_t (log π − log π_ref)."""
    model = toy_model(3, 3, distance=1.0, eos=True, seed=5)
    ref = model.ref.clone().requires_grad_(True)
    lq = model.logp(model.theta)
    lr = torch.log_softmax(ref, -1)[model.prefix, model.seqs]
    prob = lq.sum(1).exp()
    (g_true,) = torch.autograd.grad((prob * ((lq - lr) * model.mask).sum(1)).sum(), ref)
    logits = model.theta[model.prefix]
    for estimator, kw in (("k1", {}), ("full", {}), ("mix", {"alpha": 0.3})):
        r = ref.detach().clone().requires_grad_(True)
        out = rl.sequence_kl_from_logits(
            logits, r[model.prefix], model.seqs, mask=model.mask, estimator=estimator, **kw
        )
        (g,) = torch.autograd.grad((prob * out.terms.sum(1)).sum(), r)
        _close(g, g_true)


# --------------------------------------------------------------- infinities, overflow, bad input


def _prefix_weights(d):
    """W_{1:t} = exp(Σ_{u<=t} d_u) for t = 0..T (W_{1:0} = 1), in Python floats (math.exp)."""
    out, acc = [1.0], 0.0
    for x in d:
        acc += x
        out.append(math.exp(acc))
    return out


@pytest.mark.parametrize("off_policy", [False, True])
def test_an_infinite_kl_at_one_position_leaves_the_other_gradients_finite(off_policy):
    """KL_2 = +inf (π_ref gives some token probability 0 after y_1). Estimator "full", terms
    value_t = W_{1:t-1} KL_t + sg(Σ_{s>t} W_{1:s-1} KL_s)·(log π_t − sg log π_t), so
        d Σ_t terms / d logp_t = Σ_{s>t} W_{1:s-1} KL_s   (+inf for t = 1 only),
        d Σ_t terms / d KL_t   = W_{1:t-1}                 (finite everywhere).
    The mix adds α·Σ_{s>=t} W_{1:s} ℓ_s to the first and scales the second by 1 − α."""
    lp = [-0.7, -0.2, -1.1, -0.4]
    d = [0.3, -0.2, 0.5, 0.1] if off_policy else [0.0] * 4
    ell = [0.2, -0.1, 0.4, 0.3]
    KL = [0.3, math.inf, 0.5, 0.2]
    W = _prefix_weights(d)
    future = [sum(W[s] * KL[s] for s in range(t + 1, 4)) for t in range(4)]
    G = [sum(W[s + 1] * ell[s] for s in range(t, 4)) for t in range(4)]
    old = torch.tensor([[a - b for a, b in zip(lp, d, strict=True)]], dtype=F64)
    ref = torch.tensor([[a - b for a, b in zip(lp, ell, strict=True)]], dtype=F64)
    for estimator, alpha in (("full", 0.0), ("mix", 0.25)):
        logp = torch.tensor([lp], dtype=F64, requires_grad=True)
        kl = torch.tensor([KL], dtype=F64, requires_grad=True)
        out = rl.sequence_kl(
            logp,
            ref,
            kl=kl,
            old_logp=old if off_policy else None,
            estimator=estimator,
            alpha=alpha,
        ).terms
        out.sum().backward()
        a = alpha
        want_value = [a * W[t + 1] * ell[t] + (1 - a) * W[t] * KL[t] for t in range(4)]
        want_logp = [a * G[t] + (1 - a) * future[t] for t in range(4)]
        want_kl = [(1 - a) * W[t] for t in range(4)]
        assert logp.grad is not None and kl.grad is not None
        assert not out.detach().isnan().any() and not logp.grad.isnan().any()
        _close(out.detach(), torch.tensor([want_value], dtype=F64), 1e-12)
        assert float(logp.grad[0, 0]) == math.inf
        _close(logp.grad[:, 1:], torch.tensor([want_logp[1:]], dtype=F64), 1e-12)
        _close(kl.grad, torch.tensor([want_kl], dtype=F64), 1e-12)
        # the same gradients as with a huge finite KL_2 (they do not depend on KL_2)
        logp2 = logp.detach().clone().requires_grad_(True)
        kl2 = kl.detach().clone()
        kl2[0, 1] = 1e300
        kl2.requires_grad_(True)
        rl.sequence_kl(
            logp2,
            ref,
            kl=kl2,
            old_logp=old if off_policy else None,
            estimator=estimator,
            alpha=alpha,
        ).terms.sum().backward()
        assert logp2.grad is not None
        _close(logp2.grad[:, 1:], logp.grad[:, 1:], 1e-12)
        _close(kl2.grad, kl.grad, 0.0)
        # a loss that leaves out the infinite position's ancestors: no 0·inf anywhere
        logp3 = logp.detach().clone().requires_grad_(True)
        kl3 = kl.detach().clone().requires_grad_(True)
        t3 = rl.sequence_kl(
            logp3,
            ref,
            kl=kl3,
            old_logp=old if off_policy else None,
            estimator=estimator,
            alpha=alpha,
        ).terms
        t3[:, 1:].sum().backward()
        assert logp3.grad is not None and kl3.grad is not None
        assert float(logp3.grad[0, 0]) == 0.0 and torch.isfinite(logp3.grad).all()
        assert float(kl3.grad[0, 0]) == 0.0 and torch.isfinite(kl3.grad).all()


def test_prefix_weights_past_exp_overflow_are_formed_in_log_space(monkeypatch):
    """log-ratios of 400 per token: W_{1:2} = e^800 and W_{1:3} = e^1200 overflow float64, but
    the products with tiny ℓ and KL are ordinary numbers (truth: mpmath at 50 digits)."""
    mpmath = pytest.importorskip("mpmath")
    monkeypatch.setattr(mpmath.mp, "dps", 50)  # restored afterwards
    logp = torch.tensor([[-1e-300, -2e-300, -1e-305]], dtype=F64, requires_grad=True)
    ref = 2 * logp.detach()  # ℓ = -logp exactly
    old = logp.detach() - 400.0
    kl = torch.tensor([[1e-200, 1e-300, 1e-310]], dtype=F64, requires_grad=True)
    d = [
        mpmath.mpf(float(a)) - mpmath.mpf(float(b))
        for a, b in zip(logp.detach()[0], old[0], strict=True)
    ]
    W = [mpmath.mpf(1)]
    for x in d:
        W.append(W[-1] * mpmath.exp(x))
    ell = [-mpmath.mpf(float(x)) for x in logp.detach()[0]]
    KL = [mpmath.mpf(float(x)) for x in kl.detach()[0]]

    def rel_close(got, want, rtol=1e-12):
        for g, w in zip(got.tolist(), want, strict=True):
            assert math.isfinite(g) and abs(mpmath.mpf(g) - w) <= rtol * abs(w), (g, w)

    k1 = rl.sequence_kl(logp, ref, old_logp=old, estimator="k1").terms
    rel_close(k1.detach()[0], [W[t + 1] * ell[t] for t in range(3)])
    k1.sum().backward()
    assert logp.grad is not None
    rel_close(logp.grad[0], [sum(W[s + 1] * ell[s] for s in range(t, 3)) for t in range(3)])

    logp.grad = None
    full = rl.sequence_kl(logp, kl=kl, old_logp=old).terms
    rel_close(full.detach()[0], [W[t] * KL[t] for t in range(3)])
    full.sum().backward()
    assert logp.grad is not None and kl.grad is not None
    rel_close(logp.grad[0, :2], [sum(W[s] * KL[s] for s in range(t + 1, 3)) for t in range(2)])
    # d/dKL_3 = W_{1:2} = e^800: beyond float64, said as +inf
    rel_close(kl.grad[0, :2], W[:2])
    assert float(kl.grad[0, 2]) == math.inf

    seq = rl.sequence_kl(logp, kl=kl, old_logp=old, weighting="sequence").terms.detach()
    assert float(seq[0, 0]) == math.inf  # e^1200 · 1e-200 = 1.4e321: beyond float64 indeed
    rel_close(seq[0, 1:], [W[3] * KL[t] for t in (1, 2)])
    # a cap: every weight above it is exactly c
    capped = rl.sequence_kl(logp, kl=kl, old_logp=old, weight_clamp=5.0).terms.detach()
    assert capped.tolist() == [[1e-200, 5 * 1e-300, 5 * 1e-310]]
    # float32 inputs: W_{1:2} = e^120 overflows float32, W_{1:2}·KL_3 = 1.3e22 does not
    lp32 = torch.tensor([[-0.5, -0.5, -0.5]])
    kl32 = torch.tensor([[1e-3, 1e-20, 1e-30]])
    f32 = rl.sequence_kl(lp32, kl=kl32, old_logp=lp32 - 60.0).terms
    assert f32.dtype == torch.float32
    want = [mpmath.exp(60 * t) * mpmath.mpf(float(x)) for t, x in enumerate(kl32[0])]
    rel_close(f32[0], want, rtol=float(torch.finfo(torch.float32).eps))


def test_underflowing_prefix_weights_times_an_infinite_kl_are_inf_not_nan():
    """W_{1:2} = e^{-800} underflows to 0, but W·(+inf) is +inf (every weight is positive)."""
    logp = torch.tensor([[-0.5, -0.4, -0.3]], dtype=F64, requires_grad=True)
    old = logp.detach() + 400.0
    kl = torch.tensor([[0.1, 0.2, math.inf]], dtype=F64, requires_grad=True)
    out = rl.sequence_kl(logp, kl=kl, old_logp=old).terms
    value = out.detach()[0].tolist()
    assert value[0] == 0.1 and value[2] == math.inf
    assert value[1] == pytest.approx(math.exp(-400.0) * 0.2, rel=1e-13)
    out.sum().backward()
    assert logp.grad is not None and kl.grad is not None
    assert logp.grad[0].tolist() == [math.inf, math.inf, 0.0]
    assert kl.grad[0, 0] == 1.0 and kl.grad[0, 1] == pytest.approx(math.exp(-400.0), rel=1e-13)
    assert kl.grad[0, 2] == 0.0  # e^{-800}: below the smallest float64, rounded to 0


def test_bad_kl_old_logp_and_weight_clamp_are_refused():
    x = torch.zeros(2, 3)
    for bad, what in ((math.nan, "NaN"), (-1e-3, "negative")):
        k = x.clone()
        k[1, 2] = bad
        with pytest.raises(KlestError, match=what) as info:
            rl.sequence_kl(x, kl=k)
        assert info.value.argument == "kl"
        # masked out: never read
        mask = torch.ones(2, 3, dtype=torch.bool)
        mask[1, 2] = False
        assert float(rl.sequence_kl(x, kl=k, mask=mask).terms.abs().sum()) == 0.0
    for name in ("old_logp", "ref_logp", "kl"):
        kw = {"kl": x, "ref_logp": x, name: torch.zeros(2, 3, dtype=torch.int64)}
        with pytest.raises(KlestError, match="floating dtype") as info:
            rl.sequence_kl(x, estimator="mix", alpha=0.5, **kw)
        assert info.value.argument == name
    for cap in ("10", True, math.nan, 0.5, [3.0]):
        with pytest.raises(KlestError) as info:
            rl.sequence_kl(x, kl=x, old_logp=x, weight_clamp=cap)  # type: ignore[arg-type]
        assert info.value.argument == "weight_clamp"
    huge = torch.full((2, 3), 1e308, dtype=F64)
    with pytest.raises(KlestError, match="overflows"):
        rl.sequence_kl(-huge, kl=x.double(), old_logp=huge)


def test_the_output_dtype_follows_every_input_old_logp_included():
    x = torch.full((2, 3), -0.5)
    for name in ("logp", "ref_logp", "kl", "old_logp"):
        kw = {"logp": x, "ref_logp": x - 0.1, "kl": x.abs(), "old_logp": x + 0.1}
        kw[name] = kw[name].double()
        out = rl.sequence_kl(
            kw.pop("logp"), kw.pop("ref_logp"), estimator="mix", alpha=0.5, **kw
        ).terms
        assert out.dtype == F64, name
