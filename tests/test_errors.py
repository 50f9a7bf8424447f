"""Bad input raises one exception type whose message names the argument, its shape and dtype."""

from __future__ import annotations

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
