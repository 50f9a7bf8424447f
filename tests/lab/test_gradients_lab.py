"""The gradient lab (klest.lab.gradients, ``klest gradients``): its exact numbers reproduce the
identities of math.md §4, checked against truth computed here independently (autograd through
the enumerated closed forms, and per-sequence gradients by an explicit loop over sequences).

Statistical policy (the one sampled test): fixed seed; the mean of M independent batch gradients,
projected on the exact gradient's direction, must lie within 4 standard errors (sample stdev of
the M projections over √M) of the enumerated expectation (tests/conftest.py's N_SIGMA).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from klest.cli import main  # noqa: E402
from klest.lab import gradients as gl  # noqa: E402

F64 = torch.float64
TOL = 1e-10
N_SIGMA = 4.0


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _truths(model):
    """Independent targets [P·V]: ∇ sequence KL(π‖π_ref), ∇ sequence KL(π_ref‖π), and the
    per-position ("per token") gradients Σ_y π(y) Σ_t ∇KL(·|y_<t) with the prefixes held fixed,
    reverse and forward."""
    th = model.theta.clone().requires_grad_(True)
    a = torch.log_softmax(th, -1)
    b = torch.log_softmax(model.ref, -1)
    lq, lr = a[model.prefix, model.seqs], b[model.prefix, model.seqs]
    m = model.mask.to(F64)
    prob = lq.sum(1).exp()
    rev = (prob * ((lq - lr) * m).sum(1)).sum()
    fwd = (lr.sum(1).exp() * ((lr - lq) * m).sum(1)).sum()
    kl_rev_pos = (a.exp() * (a - b)).sum(-1)[model.prefix]
    kl_fwd_pos = (b.exp() * (b - a)).sum(-1)[model.prefix]
    tok_rev = (prob.detach() * (kl_rev_pos * m).sum(1)).sum()
    tok_fwd = (prob.detach() * (kl_fwd_pos * m).sum(1)).sum()
    out = [torch.autograd.grad(x, th, retain_graph=True)[0].reshape(-1) for x in (rev, fwd)]
    out += [
        torch.autograd.grad(x, th, retain_graph=True)[0].reshape(-1) for x in (tok_rev, tok_fwd)
    ]
    return out


def _by_name(opts):
    return {o.name: o for o in opts}


def _mean(model, opt):
    return gl.exact_gradients(model, opt)[0]


def _close(a, b, tol=TOL):
    assert torch.allclose(a, b, rtol=0, atol=tol), (a - b).abs().max()


@pytest.mark.parametrize(("T", "eos"), [(1, False), (3, False), (3, True)])
def test_lab_reproduces_the_identities_of_math_md_section_4(T, eos):
    model = gl.toy_model(3, T, distance=1.0, off_policy=0.7, eos=eos, seed=T)
    rev, fwd, tok_rev, tok_fwd = _truths(model)
    o = _by_name(gl.options(off_policy=True, presets=False))
    # k1 as a loss does nothing in expectation
    assert float(_mean(model, o["k1 loss"]).norm()) < 1e-13
    # k2 as a loss = k1 in the reward = the per-token reverse-KL gradient
    _close(_mean(model, o["k2 loss"]), _mean(model, o["k1 in reward"]))
    _close(_mean(model, o["k2 loss"]), tok_rev)
    # k3 as a loss follows the forward KL, per token
    _close(_mean(model, o["k3 loss"]), tok_fwd)
    _close(_mean(model, o["full-vocabulary forward KL loss"]), tok_fwd)
    _close(_mean(model, o["full-vocabulary KL loss (no score term)"]), tok_rev)
    # k3 in the reward: reverse minus forward, per token
    _close(_mean(model, o["k3 in reward"]), tok_rev - tok_fwd)
    # these follow the sequence KL exactly (on-policy and, per decision, off-policy)
    for name in (
        "k1 in reward, reward-to-go",
        "k3 value, sequence gradient",
        "full-vocabulary + score (sequence_kl)",
        "sequence_kl k1",
        "mix α*·k1 + (1-α*)·full",
        "sequence_kl k1, per-decision weights",
        "sequence_kl full, per-decision weights",
        "sequence_kl full, sequence weight",
    ):
        opt = gl._with_alpha(o[name], model, model.theta)
        _close(_mean(model, opt), rev)
    if T == 1:  # one decision: per token is the sequence, k3's loss is ∇ forward KL exactly
        _close(_mean(model, o["k3 loss"]), fwd)
        _close(tok_rev, rev)
    else:  # per-token losses miss the later tokens' KL
        assert float((tok_rev - rev).norm() / rev.norm()) > 0.05
        for name in (
            "sequence_kl k1, per-token weights",
            "k1 in reward, reward-to-go, no correction",
        ):
            assert float((_mean(model, o[name]) - rev).norm() / rev.norm()) > 0.05, name


def test_table_rows_and_the_trace_of_the_covariance():
    """tr Cov against per-sequence gradients computed one sequence at a time (a loop, here)."""
    model = gl.toy_model(2, 3, distance=0.8, off_policy=0.6, seed=5)
    opts = [
        o for o in gl.options(presets=True) if o.name in ("k1 in reward, reward-to-go", "k3 loss")
    ]
    opts += [o for o in gl.options() if o.name == "sequence_kl full, per-decision weights"]
    B = 16
    rows = gl.gradient_table(model, opts, B=B)
    rev, fwd, _, _ = _truths(model)
    sampler_table = {False: model.theta, True: model.old}
    for opt, row in zip(opts, rows, strict=True):
        p = model.seq_logprob(sampler_table[opt.off_policy]).exp()
        grads = []
        for n in range(model.n_sequences):  # one sequence as a batch of one
            th = model.theta.clone().requires_grad_(True)
            sub = gl.ToyModel(
                model.V,
                model.T,
                th,
                model.ref,
                model.old,
                model.seqs[n : n + 1],
                model.prefix[n : n + 1],
                model.mask[n : n + 1],
                model.reward[n : n + 1],
            )
            b = gl._batch(sub, th, opt.off_policy, opt.aggregation)
            (g,) = torch.autograd.grad(opt.loss(b), th)
            grads.append(g.reshape(-1))
        G = torch.stack(grads)
        mean = p @ G
        tr = float(p @ ((G - mean) ** 2).sum(1)) / B
        assert row["trace_variance"] == pytest.approx(tr, rel=1e-10)
        rel = float((mean - rev).norm() / rev.norm())
        assert row["relative_error_reverse_kl"] == pytest.approx(rel, rel=1e-9, abs=1e-12)
        cos = float(mean @ fwd / (mean.norm() * fwd.norm()))
        assert row["cosine_forward_kl"] == pytest.approx(cos, rel=1e-9)
        assert row["off_policy"] is opt.off_policy
    by = {r["option"]: r for r in rows}
    assert by["k1 in reward, reward-to-go"]["relative_error_reverse_kl"] < 1e-12
    assert by["k3 loss"]["relative_error_reverse_kl"] > 0.05


def test_every_preset_gets_a_row_and_k1_loss_has_no_cosine():
    model = gl.toy_model(2, 2, off_policy=0.5, seed=0)
    rows = gl.gradient_table(model, gl.options(), B=8)
    from klest.rl import presets

    names = {r["option"] for r in rows}
    assert set(presets.names()) <= names
    k1 = next(r for r in rows if r["option"] == "k1 loss")
    assert k1["cosine_reverse_kl"] is None and k1["relative_error_reverse_kl"] == pytest.approx(1)
    assert all(math.isfinite(r["trace_variance"]) for r in rows)


def test_sampled_gradient_agrees_with_the_enumerated_expectation():
    model = gl.toy_model(3, 3, distance=1.0, off_policy=0.5, seed=9)
    opt = _by_name(gl.options(presets=False))["sequence_kl full, per-decision weights"]
    mean, var1 = gl.exact_gradients(model, opt)
    u = mean / mean.norm()
    p = model.seq_logprob(model.old).exp()
    g = torch.Generator().manual_seed(1)
    M, B = 200, 16
    idx = torch.multinomial(p, M * B, replacement=True, generator=g).reshape(M, B)
    G = gl.per_sequence_gradients(model, opt)  # g(y) for every y; a batch averages B of them
    batches = G[idx].mean(1) @ u
    se = float(batches.std()) / math.sqrt(M)
    assert abs(float(batches.mean()) - float(mean @ u)) <= N_SIGMA * se
    # and the batch variance of the projection is bounded by tr Cov / B
    assert float(batches.var()) <= var1 / B * (1 + N_SIGMA * math.sqrt(2 / (M - 1)))


def test_training_biased_options_end_elsewhere():
    model = gl.toy_model(2, 3, distance=1.0, seed=2)
    o = _by_name(gl.options(off_policy=False, presets=False))
    hist = gl.train(model, [o["k1 loss"], o["full-vocabulary + score (sequence_kl)"]], steps=30)
    exact = hist["exact ∇KL(π‖π_ref)"]
    full = hist["full-vocabulary + score (sequence_kl)"]
    assert len(exact["reverse_kl"]) == 31
    _close(torch.tensor(full["reverse_kl"]), torch.tensor(exact["reverse_kl"]), 1e-8)
    assert hist["k1 loss"]["reverse_kl"][-1] > exact["reverse_kl"][-1] + 0.1
    assert exact["reverse_kl"][0] == pytest.approx(gl.sequence_kl_value(model, model.theta))
    assert gl._groups(hist) == [
        ["exact ∇KL(π‖π_ref)", "full-vocabulary + score (sequence_kl)"],
        ["k1 loss"],
    ]


def test_cli_json_markdown_and_plot(tmp_path, capsys):
    args = ["gradients", "--V", "2", "--T", "2", "--steps", "3", "--no-presets", "--seed", "1"]
    assert main([*args, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    keys = {
        "option",
        "relative_error_reverse_kl",
        "cosine_reverse_kl",
        "relative_error_forward_kl",
        "cosine_forward_kl",
        "trace_variance",
        "off_policy",
    }
    assert all(keys <= set(r) for r in rows)
    assert any(r["off_policy"] for r in rows) and any(not r["off_policy"] for r in rows)
    png = tmp_path / "train.png"
    assert main([*args, "--format", "markdown", "--plot", str(png), "--off-policy", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| option |") and "yes |" not in out
    assert png.stat().st_size > 1000
    assert main([*args, "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("option,")
    assert main(["gradients", "--V", "2", "--T", "2", "--steps", "0", "--no-presets"]) == 0
    assert "KL after training" not in capsys.readouterr().out
    assert main(["gradients", "--steps", "0", "--plot", str(png)]) == 2
    assert "needs --steps" in capsys.readouterr().err
    assert main(["gradients", "--V", "12", "--T", "8"]) == 2
    assert "too many" in capsys.readouterr().err


def test_cli_without_torch_says_so_in_one_line(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    assert main(["gradients", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "needs PyTorch" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("seed", range(4))
def test_mix_never_worse_than_the_better_of_k1_and_full_beyond_the_fitting_error(seed):
    """Exact tr Cov of α·k1 + (1-α)·full is a parabola in α: at the optimum α* it is at most the
    better of α = 0 (full) and α = 1 (k1), and an α off by δ costs exactly δ²·tr Var(g_k1 − g_full)
    (the fitting error)."""
    model = gl.toy_model(3, 3, distance=1.5, off_policy=0.5, seed=seed)
    base = _by_name(gl.options(presets=False))["mix α*·k1 + (1-α*)·full"]

    def var(alpha):
        opt = replace(base, loss=gl._sequence(estimator="mix", alpha=alpha))
        return gl.exact_gradients(model, opt)[1]

    a_star = gl._optimal_alpha(model, model.theta, False)
    v_full, v_k1, v_star = var(0.0), var(1.0), var(a_star)
    assert v_star <= min(v_full, v_k1) + 1e-12
    # D = tr Var(g_k1 - g_full), from the per-sequence gradients of the two estimators
    o = _by_name(gl.options(presets=False))
    g1 = gl.per_sequence_gradients(model, o["sequence_kl k1"])
    gf = gl.per_sequence_gradients(model, o["full-vocabulary + score (sequence_kl)"])
    p = model.seq_logprob(model.theta).exp()
    diff = g1 - gf
    d = float(p @ ((diff - p @ diff) ** 2).sum(1))
    for delta in (0.05, -0.2):
        assert var(a_star + delta) - v_star == pytest.approx(delta**2 * d, rel=1e-8, abs=1e-13)


def test_distance_zero_leaves_relative_errors_undefined():
    """π = π_ref: ∇KL is exactly 0, so ‖g − 0‖/0 and the cosines are 0/0: '-', never numbers."""
    rows, _ = gl.run_gradients(V=3, T=2, distance=0.0, off_policy=0.0, steps=0, presets=False)
    for r in rows:
        for k in ("relative_error_reverse_kl", "cosine_reverse_kl"):
            assert r[k] is None, (r["option"], k, r[k])
        assert r["relative_error_forward_kl"] is None and r["cosine_forward_kl"] is None
    assert "0/0, undefined" in gl.format_gradient_rows(rows)


def test_a_sampler_too_far_for_float64_is_refused():
    model = gl.toy_model(4, 4, off_policy=100.0)
    d = float((model.seq_logprob(model.theta) - model.seq_logprob(model.old)).abs().max())
    assert d > gl.MAX_OFF_POLICY_LOG_RATIO  # the weights e^d (squared: e^2d) leave float64
    with pytest.raises(gl.KlestError, match="sampler μ is too far"):
        gl.gradient_table(model)


def test_training_stops_an_option_whose_gradient_leaves_float64():
    """distance 1e6: after one step π collapses, and k3's π_ref/π = e^(~1e5) is not finite; that
    option's training stops (printed '-', with a note), the others go on; nothing is NaN."""
    rows, hist = gl.run_gradients(V=4, T=4, distance=1e6, off_policy=0.0, steps=3, presets=False)
    stopped = [r for r in rows if r.get("training_stopped_at") is not None]
    assert stopped
    for r in rows:
        for k, v in r.items():
            assert not (isinstance(v, float) and math.isnan(v)), (r["option"], k)
        if r in stopped:
            assert r["final_reverse_kl"] is None
    assert all(math.isfinite(v) for h in hist.values() for v in h["reverse_kl"])
    assert "training stopped at step" in gl.format_gradient_rows(rows)
