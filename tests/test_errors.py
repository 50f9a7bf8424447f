"""Bad input raises one exception type whose message names the argument, its shape and dtype."""

from __future__ import annotations

import math

import numpy as np
import pytest

import klest

GOOD = np.zeros(4)


@pytest.mark.parametrize(
    ("kwargs", "argument", "words"),
    [
        ({"logq": np.array([0.0, -np.inf, 0.0, 0.0]), "logp": GOOD}, "logq", "inf"),
        ({"logq": np.array([0.0, np.nan, 0.0, 0.0]), "logp": GOOD}, "logq", "NaN"),
        ({"logq": GOOD, "logp": np.array([np.nan, 0.0, 0.0, 0.0])}, "logp", "NaN"),
        ({"logq": GOOD, "logp": np.array([np.inf, 0.0, 0.0, 0.0])}, "logp", "+inf"),
        ({"logq": GOOD, "logp": np.zeros(3)}, "logp", "broadcast"),
        ({"logq": np.zeros(4, dtype=np.int64), "logp": GOOD}, "logq", "floating"),
        ({"logq": GOOD, "logp": np.zeros(4, dtype=bool)}, "logp", "floating"),
        ({"logq": GOOD, "logp": GOOD.astype(np.complex128)}, "logp", "floating"),
        ({"log_ratio": np.array([np.inf])}, "log_ratio", "+inf"),
        ({"logq": GOOD}, "logp", "required"),
    ],
)
@pytest.mark.parametrize("fn", [klest.k1, klest.k2, klest.k3, klest.forward_k3])
def test_bad_input(fn, kwargs, argument, words):
    with pytest.raises(klest.KlestError) as info:
        fn(**kwargs)
    err = info.value
    assert err.argument == argument
    assert words in str(err)
    assert f"`{argument}`" in str(err)
    if argument in kwargs:
        value = kwargs[argument]
        assert str(value.shape) in str(err) and str(value.dtype) in str(err)
        assert err.shape == value.shape


@pytest.mark.parametrize(
    "kwargs",
    [
        {"logq": np.array([0.0, -np.inf]), "logp": np.zeros(2)},
        {"logq": np.zeros(2), "logp": np.array([np.nan, 0.0])},
        {"log_ratio": np.array([np.inf, 0.0], dtype=np.float32)},
    ],
)
def test_bad_input_in_estimate_fast_path(kwargs):
    with pytest.raises(klest.KlestError):
        klest.estimate(estimator="k3", **kwargs)


def test_two_libraries():
    torch = pytest.importorskip("torch")
    with pytest.raises(klest.KlestError, match="two different libraries") as info:
        klest.k3(GOOD, torch.zeros(4))
    assert "torch" in str(info.value) and "numpy" in str(info.value)


def test_validation_can_be_switched_off():
    bad = np.array([0.0, np.nan])
    with klest.options(validate=False):
        v = klest.k3(bad, np.zeros(2))
    assert np.isnan(v[1])
    with pytest.raises(klest.KlestError):
        klest.k3(bad, np.zeros(2))


def test_bad_estimator_and_mask_and_axis():
    with pytest.raises(klest.KlestError, match="unknown estimator"):
        klest.estimate(GOOD, GOOD, "k4")
    with pytest.raises(klest.KlestError, match="mask"):
        klest.estimate(GOOD, GOOD, "k3", mask=np.ones(3, dtype=bool))
    with pytest.raises(klest.KlestError, match="axis"):
        klest.estimate(GOOD, GOOD, "k3", axis=2)
    with pytest.raises(klest.KlestError, match="clamp"):
        klest.k3(GOOD, GOOD, clamp=(1.0, -1.0))
    with pytest.raises(klest.KlestError, match="unknown divergence"):
        klest.fdiv(GOOD, GOOD, "nope")
    with pytest.raises(klest.KlestError, match="both"):
        klest.k3(GOOD, GOOD, log_ratio=GOOD)


def test_user_divergence_registry():
    # Neyman χ²: f(t) = (1 - t)²/t = (t - 1)²/t, f'(1) = 0
    div = klest.FDivergence("neyman_chi2_test", lambda t: (t - 1) ** 2 / t, 0.0)
    klest.register_divergence(div)
    try:
        _check_user_divergence(div)
    finally:
        from klest import divergences

        divergences._REGISTRY.pop(div.name)


def _check_user_divergence(div):
    with pytest.raises(klest.KlestError, match="exists"):
        klest.register_divergence(div)
    L = np.array([-1.0, 0.3, 2.0])
    t = np.exp(L)
    np.testing.assert_allclose(
        klest.fdiv(log_ratio=L, divergence="neyman_chi2_test"), (t - 1) ** 2 / t
    )
    assert "neyman_chi2_test" in klest.estimator_names()
    r = klest.estimate(log_ratio=L, estimator=div)
    assert r.mean == pytest.approx(np.mean((t - 1) ** 2 / t))


@pytest.mark.parametrize(
    ("div", "words"),
    [
        (klest.FDivergence(3, lambda t: (t - 1) ** 2, 0.0), "non-empty string"),
        (klest.FDivergence("", lambda t: (t - 1) ** 2, 0.0), "non-empty string"),
        (klest.FDivergence("k3", lambda t: (t - 1) ** 2, 0.0), "estimator's name"),
        (klest.FDivergence("forward_k1", lambda t: (t - 1) ** 2, 0.0), "estimator's name"),
        (klest.FDivergence("k_opt", lambda t: (t - 1) ** 2, 0.0), "estimator's name"),
        (klest.FDivergence("alpha:7", lambda t: (t - 1) ** 2, 0.0), "reserved"),
        (
            klest.FDivergence("shifted_test", lambda t: (t - 1) ** 2 + 0.1, 0.0),
            "f\\(1\\) must be 0",
        ),
        (klest.FDivergence("concave_test", lambda t: -((t - 1) ** 2), 0.0), "convex"),
        (klest.FDivergence("log_test", lambda t: math.log(t), 1.0), "convex"),
        (klest.FDivergence("slope_test", lambda t: (t - 1) ** 2, 1.0), "not a slope"),
        (
            klest.FDivergence("form_test", lambda t: (t - 1) ** 2, 0.0, lambda xp, L: L * L),
            "log_form disagrees",
        ),
        (klest.FDivergence("raises_test", lambda t: 1 / (t - 1), 0.0), "ZeroDivisionError"),
    ],
)
def test_divergence_registration_is_checked(div, words):
    with pytest.raises(klest.KlestError, match=words):
        klest.register_divergence(div)
    assert div.name not in klest.divergence_names() or div.name == "k3"


def test_builtin_divergences_pass_the_registration_checks():
    from klest import divergences

    for name in klest.divergence_names():
        if name == "log_squared":  # ½(log t)² is convex only for t <= e (f'' = (1 - log t)/t²)
            with pytest.raises(klest.KlestError, match=r"convex: f\(2\.8"):
                divergences._check_f(divergences.get_divergence(name))
            continue
        divergences._check_f(divergences.get_divergence(name))
    for a in (-1.0, 0.5, 2.0, 3.0):
        divergences._check_f(divergences.alpha_divergence(a))


@pytest.mark.parametrize(
    "kwargs",
    [{"validate": "false"}, {"validate": 0}, {"threads": True}, {"threads": 0}, {"nope": True}],
)
def test_options_check_their_types(kwargs):
    # validate="false" used to be truthy: validation stayed on, silently
    with pytest.raises(klest.KlestError):
        with klest.options(**kwargs):
            pass
    with pytest.raises(klest.KlestError):
        klest.set_options(**kwargs)
    assert klest.get_options().validate is True
