"""The estimator table: one registration reaches estimate, the lab's CLI and klest.rl; names that
could be confused are refused with a suggestion; derivatives agree with mpmath; typed Estimate."""

from __future__ import annotations

import json
import math

import mpmath
import numpy as np
import pytest

import klest
from klest import table

RNG = np.random.default_rng(11)
L = RNG.normal(-0.2, 0.8, size=(5, 300))


@pytest.fixture
def squared_log_ratio():
    """A user estimator v(L) = L² (E_q[L²] = Var L + (E L)²), registered for one test."""
    rec = klest.Estimator(
        "test_squared_log_ratio",
        "reverse_kl",
        lambda xp, L: L * L,
        derivative=lambda xp, L: 2 * L,
        unbiased=False,
    )
    klest.register_estimator(rec)
    try:
        yield rec
    finally:
        table.unregister_estimator(rec.name)


def test_a_registered_estimator_reaches_estimate(squared_log_ratio):
    r = klest.estimate(log_ratio=L, estimator="test_squared_log_ratio")
    direct = (L * L).ravel()
    assert r.n == direct.size
    assert r.mean == pytest.approx(direct.mean(), rel=1e-13)
    assert r.std == pytest.approx(direct.std(ddof=1), rel=1e-12)
    by_row = klest.estimate(log_ratio=L, estimator="test_squared_log_ratio", axis=1)
    np.testing.assert_allclose(by_row.mean, (L * L).mean(axis=1), rtol=1e-13)
    assert "test_squared_log_ratio" in klest.estimator_names()


def test_a_registered_estimator_reaches_the_cli(squared_log_ratio, capsys):
    from klest.cli import main

    status = main(
        [
            "compare",
            "--q",
            "normal(0, 1)",
            "--p",
            "normal(1, 1)",
            "--estimators",
            "test_squared_log_ratio,k1",
            "--n",
            "200000",
            "--format",
            "json",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0
    rows = {r["estimator"]: r for r in json.loads(out)}
    row = rows["test_squared_log_ratio"]
    assert row["target"] == "reverse_kl"
    # L = x - 1/2 with x ~ N(0, 1): E[L²] = 1 + 1/4, Var[L²] = E[L⁴] - E[L²]² = 2 + 4·(1/4)
    true_kl = 0.5
    mean = true_kl * (1 + row["bias_over_true"])
    se = math.sqrt(3.0 / 200_000)
    assert abs(mean - 1.25) < 4 * se
    assert row["stdev_over_true"] * true_kl == pytest.approx(math.sqrt(3.0), rel=0.02)


def test_a_registered_estimator_reaches_rl(squared_log_ratio):
    torch = pytest.importorskip("torch")
    from klest import rl

    logp = torch.tensor(RNG.normal(-1.0, 0.3, size=(2, 6)), requires_grad=True)
    ref = torch.tensor(RNG.normal(-1.0, 0.3, size=(2, 6)))
    v = rl.kl_per_token(logp, ref, estimator="test_squared_log_ratio", gradient="as_written")
    Lt = (ref - logp).detach()
    torch.testing.assert_close(v.detach(), Lt * Lt, rtol=1e-12, atol=0)
    (g,) = torch.autograd.grad(v.sum(), logp)
    # as written: d(L²)/d logp = -2L (L = ref - logp), from the record's derivative
    torch.testing.assert_close(g, -2 * Lt, rtol=1e-12, atol=0)


def test_confusable_names_are_refused_with_a_suggestion():
    with pytest.raises(klest.KlestError, match=r"did you mean 'fdiv:forward_kl' or 'forward_k1'"):
        klest.estimate(log_ratio=L, estimator="forward_kl")
    with pytest.raises(klest.KlestError, match="did you mean 'fdiv:chi2'"):
        klest.estimate(log_ratio=L, estimator="fdiv:chi3")
    with pytest.raises(klest.KlestError, match="did you mean 'forward_k1'"):
        klest.estimate(log_ratio=L, estimator="forwardk1")
    with pytest.raises(klest.KlestError, match="unknown estimator 'nonsense'"):
        klest.estimate(log_ratio=L, estimator="nonsense")


def test_explicit_and_alias_names_of_f_divergence_estimators():
    r = np.exp(L)
    fk3 = r * L - (r - 1)  # the forward KL's control-variate estimator, written out here
    got = klest.estimate(log_ratio=L, estimator="fdiv:forward_kl")
    assert got.mean == pytest.approx(fk3.mean(), rel=1e-12)
    chi2 = (r - 1) ** 2
    for name in ("fdiv:chi2", "chi2"):  # the bare divergence name stays an accepted alias
        assert klest.estimate(log_ratio=L, estimator=name).mean == pytest.approx(
            chi2.mean(), rel=1e-12
        )
    a = 0.5
    alpha = (r**a - a * r - (1 - a)) / (a * (a - 1))
    got = klest.estimate(log_ratio=L, estimator="fdiv:alpha:0.5")
    assert got.mean == pytest.approx(alpha.mean(), rel=1e-10)


def test_cli_refuses_a_confusable_name(capsys):
    from klest.cli import main

    status = main(
        ["compare", "--q", "normal(0,1)", "--p", "normal(1,1)", "--estimators", "forward_kl"]
    )
    err = capsys.readouterr().err
    assert status != 0
    assert "did you mean 'fdiv:forward_kl' or 'forward_k1'" in err


@pytest.mark.parametrize(
    ("name", "target", "direction", "unbiased", "batch"),
    [
        ("k1", "reverse_kl", "reverse", True, False),
        ("k2", "reverse_kl", "reverse", False, False),
        ("k3", "reverse_kl", "reverse", True, False),
        ("forward_k1", "forward_kl", "forward", True, False),
        ("forward_k3", "forward_kl", "forward", True, False),
        ("k_opt", "reverse_kl", "reverse", True, True),
        ("k_opt_crossfit", "reverse_kl", "reverse", True, True),
        ("fdiv:chi2", "chi2", "f-divergence", True, False),
        ("fdiv:alpha:0.5", "alpha:0.5", "f-divergence", True, False),
    ],
)
def test_records(name, target, direction, unbiased, batch):
    rec = klest.get_estimator(name)
    assert (rec.name, rec.target, rec.direction, rec.unbiased, rec.batch) == (
        name,
        target,
        direction,
        unbiased,
        batch,
    )
    from klest.lab.truth import estimator_target

    assert estimator_target(name) == target


_MP_VALUES = {
    "k1": lambda x: -x,
    "k2": lambda x: x * x / 2,
    "k3": lambda x: mpmath.expm1(x) - x,
    "forward_k1": lambda x: x * mpmath.exp(x),
    "forward_k3": lambda x: x * mpmath.exp(x) - mpmath.expm1(x),
}


@pytest.mark.parametrize("name", list(_MP_VALUES))
def test_values_and_derivatives_against_mpmath(name, monkeypatch):
    import array_api_compat.numpy as npx

    monkeypatch.setattr(mpmath.mp, "dps", 40)  # restored afterwards
    xs = np.array([-30.0, -5.0, -1.0, -1e-3, 1e-6, 0.3, 2.0, 20.0])
    rec = klest.get_estimator(name)
    got_v = rec.values(npx, xs)
    got_d = rec.derivative(npx, xs)
    for x, v, d in zip(xs, got_v, got_d, strict=True):
        f = _MP_VALUES[name]
        assert v == pytest.approx(float(f(mpmath.mpf(x))), rel=1e-13, abs=1e-300)
        assert d == pytest.approx(float(mpmath.diff(f, mpmath.mpf(x))), rel=1e-12, abs=1e-30)
    # v - v' in its own form: against the 40-digit value minus the 40-digit slope
    got_g = rec.value_minus_derivative(npx, xs)
    for x, g in zip(xs, got_g, strict=True):
        f = _MP_VALUES[name]
        want = f(mpmath.mpf(x)) - mpmath.diff(f, mpmath.mpf(x))
        assert g == pytest.approx(float(want), rel=1e-12, abs=1e-30)
    # the limits at L = -inf (log p = -inf): r = 0
    edge = rec.derivative(npx, np.array([-np.inf]))
    if name in ("forward_k1", "forward_k3"):
        assert edge[0] == 0.0


def test_fdiv_records_carry_the_divergences_derivative_forms(monkeypatch):
    """fdiv: records take v' and v - v' from the divergence's closed forms (one place), which
    agree with 40-digit derivatives of f(e^L) - f'(1)(e^L - 1); a divergence registered with
    forms that disagree with its value is refused."""
    import array_api_compat.numpy as npx

    monkeypatch.setattr(mpmath.mp, "dps", 40)  # restored afterwards
    xs = np.array([-20.0, -2.0, -0.5, -1e-4, 1e-5, 0.4, 3.0, 30.0])
    for name in ("fdiv:chi2", "fdiv:squared_hellinger", "fdiv:jensen_shannon", "fdiv:alpha:-0.5"):
        rec = klest.get_estimator(name)
        div = klest.get_divergence(rec.target)
        assert rec.derivative is not None and rec.value_minus_derivative is not None

        def v(x, div=div):
            t = mpmath.exp(x)
            f = div.f if not div.name.startswith("alpha") else None
            if f is None:
                a = mpmath.mpf(dict(div.params)["alpha"])
                return (t**a - a * t - (1 - a)) / (a * (a - 1))
            if div.name == "jensen_shannon":
                return (t * mpmath.log(t) - (1 + t) * mpmath.log((1 + t) / 2)) / 2
            return (t - 1) ** 2 if div.name == "chi2" else (mpmath.sqrt(t) - 1) ** 2

        d = rec.derivative(npx, xs)
        g = rec.value_minus_derivative(npx, xs)
        for x, di, gi in zip(xs, d, g, strict=True):
            dv = mpmath.diff(v, mpmath.mpf(x))
            assert di == pytest.approx(float(dv), rel=1e-10, abs=1e-300), (name, x)
            assert gi == pytest.approx(float(v(mpmath.mpf(x)) - dv), rel=1e-10, abs=1e-12)
    chi2 = klest.get_divergence("chi2")
    wrong = klest.FDivergence(
        "chi2_wrong_slope",
        chi2.f,
        chi2.f_prime_at_1,
        chi2.log_form,
        derivative_forms=(lambda xp, L: xp.expm1(L), *chi2.derivative_forms[1:]),
    )
    with pytest.raises(klest.KlestError, match="derivative_forms"):
        klest.register_divergence(wrong)
    # review: an unregistered copy of a built-in with another f keeps the built-in's forms;
    # klest.rl checks them against the value before using them
    torch = pytest.importorskip("torch")
    import dataclasses

    from klest import rl

    hell = klest.get_divergence("squared_hellinger")
    stale = dataclasses.replace(chi2, f=hell.f, log_form=hell.log_form)
    logp = torch.tensor(RNG.normal(-1.0, 0.3, size=(2, 6)), requires_grad=True)
    ref = torch.tensor(RNG.normal(-1.0, 0.3, size=(2, 6)))
    with pytest.raises(klest.KlestError, match="derivative_forms"):
        rl.kl_per_token(logp, ref, estimator=stale, gradient="as_written")
    fresh = dataclasses.replace(hell, name="hellinger_copy")  # consistent forms: accepted
    v = rl.kl_per_token(logp, ref, estimator=fresh, gradient="as_written")
    assert torch.isfinite(v).all()


def test_registration_errors():
    ok = dict(target="reverse_kl", value=lambda xp, L: -L)
    for bad in ("k3", "chi2", "fdiv:mine", "alpha:2", "", " padded", "a,b"):
        with pytest.raises(klest.KlestError):
            klest.register_estimator(klest.Estimator(bad, **ok))  # type: ignore[arg-type]
    with pytest.raises(klest.KlestError, match="Estimator"):
        klest.register_estimator("k9")  # type: ignore[arg-type]
    with pytest.raises(klest.KlestError, match="unknown divergence"):
        klest.register_estimator(klest.Estimator("mine_t", "no_such_divergence", ok["value"]))
    with pytest.raises(klest.KlestError, match="batch"):
        klest.register_estimator(klest.Estimator("mine_b", "reverse_kl", None, batch=True))
    rec = klest.Estimator("mine_twice", **ok)  # type: ignore[arg-type]
    klest.register_estimator(rec)
    try:
        with pytest.raises(klest.KlestError, match="exists"):
            klest.register_estimator(rec)
        klest.register_estimator(rec, overwrite=True)
    finally:
        table.unregister_estimator("mine_twice")
    with pytest.raises(klest.KlestError, match="unknown estimator"):
        klest.estimate(log_ratio=L, estimator="mine_twice")


def test_estimate_fields_are_typed():
    full = klest.estimate(log_ratio=L)
    assert type(full.n) is int and full.n == L.size
    assert type(full.n_clamped) is int
    rows = klest.estimate(log_ratio=L, axis=1, mask=L > -1)
    assert isinstance(rows.n, np.ndarray) and rows.n.shape == (5,)
    assert np.issubdtype(rows.n.dtype, np.integer)
    np.testing.assert_array_equal(rows.n, np.count_nonzero(L > -1, axis=1))
    both = klest.estimate(log_ratio=L[None], axis=(0, 2))
    assert both.n.shape == (5,) and both.mean.shape == (5,)


def test_estimate_fields_are_typed_on_torch():
    torch = pytest.importorskip("torch")
    t = torch.tensor(L)
    full = klest.estimate(log_ratio=t)
    assert type(full.n) is int and full.n == L.size
    assert isinstance(full.mean, torch.Tensor)
    rows = klest.estimate(log_ratio=t, axis=1)
    assert isinstance(rows.n, torch.Tensor) and rows.n.shape == (5,)
    assert not rows.n.dtype.is_floating_point
    assert rows.n.tolist() == [300] * 5
