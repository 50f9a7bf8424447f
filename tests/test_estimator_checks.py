"""What a registered estimator must return, and the checks that hold it to that; the one place
where estimator and divergence names are checked; kernels chosen by the engine (including one a
user registers); KLEST_FAST values.

Expected values are computed here from the formulas (the mean of -L/2 written out), never taken
from klest's output."""

from __future__ import annotations

import math

import numpy as np
import pytest

import klest
from klest import _names, _stream, divergences, table

RNG = np.random.default_rng(5)
L = RNG.normal(-0.1, 0.3, size=10_000)


def _register(name, value, **kw):
    rec = klest.Estimator(name, "reverse_kl", value, unbiased=False, **kw)
    klest.register_estimator(rec)
    return rec


@pytest.fixture
def registered():
    """Register estimators for one test; all are removed afterwards."""
    names = []

    def add(name, value, **kw):
        names.append(name)
        return _register(name, value, **kw)

    yield add
    for n in names:
        table.unregister_estimator(n)


BAD = {
    "drops_one": (lambda xp, L: xp.reshape(L, (-1,))[1:], "shape"),
    "scalar": (lambda xp, L: xp.sum(L), "shape"),
    "python_float": (lambda xp, L: 1.0, "not an array"),
    "integer": (lambda xp, L: xp.astype(L > 0, xp.int64), "dtype"),
    "narrower": (lambda xp, L: xp.astype(L, xp.float32), "dtype"),
    "nan": (lambda xp, L: L * math.nan, "NaN"),
    "one_nan": (lambda xp, L: xp.where(L == xp.max(L), math.nan, -L), "NaN"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("axis", [None, 0])
def test_a_bad_value_function_is_refused_by_estimate_on_numpy(registered, case, axis):
    fn, what = BAD[case]
    name = f"bad_{case}"
    registered(name, fn)
    data = L if axis is None else L.reshape(100, 100).T  # axis 0: reduced columns
    with pytest.raises(klest.KlestError, match=what) as err:
        klest.estimate(log_ratio=data, estimator=name, axis=axis)
    assert f"estimator '{name}'" in str(err.value)


@pytest.mark.parametrize("case", ["drops_one", "scalar", "integer", "nan", "one_nan"])
def test_a_bad_value_function_is_refused_on_the_generic_path(registered, case):
    xs = pytest.importorskip("array_api_strict")
    fn, what = BAD[case]
    name = f"bad_generic_{case}"
    registered(name, fn)
    with pytest.raises(klest.KlestError, match=what) as err:
        klest.estimate(log_ratio=xs.asarray(L), estimator=name)
    assert name in str(err.value)


def test_a_value_function_of_another_library_is_refused(registered):
    torch = pytest.importorskip("torch")
    registered("torch_out", lambda xp, L: torch.zeros(tuple(L.shape), dtype=torch.float64))
    with pytest.raises(klest.KlestError, match="torch array"):
        klest.estimate(log_ratio=L, estimator="torch_out")


def test_good_values_pass_and_what_is_not_their_fault_is_not_refused(registered):
    registered("half_k1_chk", lambda xp, L: -L / 2)
    got = klest.estimate(log_ratio=L, estimator="half_k1_chk")
    assert got.n == L.size
    assert got.mean == pytest.approx(float(np.mean(-L / 2)), rel=1e-13)
    # NaN only where masked out: not data, so not the estimator's fault
    registered("nan_where_big", lambda xp, L: xp.where(L > 0.5, math.nan, -L))
    keep = L <= 0.5
    got = klest.estimate(log_ratio=L, estimator="nan_where_big", mask=keep)
    assert got.n == int(keep.sum())
    assert got.mean == pytest.approx(float(np.mean(-L[keep])), rel=1e-13)
    with pytest.raises(klest.KlestError, match="nan_where_big"):
        klest.estimate(log_ratio=L, estimator="nan_where_big")
    # +inf and -inf values (no NaN value): the mean is NaN by the reduction's rule, not refused
    registered("signed_inf", lambda xp, L: xp.where(L > 0, math.inf, -math.inf))
    got = klest.estimate(log_ratio=L, estimator="signed_inf")
    assert math.isnan(got.mean)
    # NaN where L itself is NaN (validation off): passed through, the input's NaN
    registered("minus_L", lambda xp, L: -L)
    with klest.options(validate=False):
        got = klest.estimate(log_ratio=np.array([0.1, math.nan, 0.3]), estimator="minus_L")
    assert math.isnan(got.mean)
    # a wider dtype than L's is fine
    registered("wider", lambda xp, L: xp.astype(-L, xp.float64))
    got = klest.estimate(log_ratio=L.astype(np.float32), estimator="wider")
    assert got.mean == pytest.approx(float(np.mean(-L.astype(np.float32).astype(np.float64))))


def test_check_values_directly():
    rec = klest.Estimator("direct", "reverse_kl", lambda xp, L: -L)
    x = np.array([0.5, -1.0, np.nan])
    v = np.array([-0.5, 1.0, np.nan])
    assert table.check_values(rec, x, v) is v  # NaN where L is NaN: allowed
    with pytest.raises(klest.KlestError, match="'direct' returned NaN"):
        table.check_values(rec, x, np.array([np.nan, 1.0, 0.0]))
    table.check_values(rec, x, np.array([np.nan, 1.0, 0.0]), keep=np.array([False, True, True]))
    table.check_values(rec, x, np.array([np.nan, 1.0, 0.0]), nan=False)
    with pytest.raises(klest.KlestError, match=r"shape \(2,\)"):
        table.check_values(rec, x, v[:2])
    with pytest.raises(klest.KlestError, match="complex"):
        table.check_values(rec, x, v.astype(complex))


def test_a_record_checks_its_values_on_every_call():
    rec = klest.Estimator("unregistered_drop", "reverse_kl", lambda xp, L: L[1:])
    with pytest.raises(klest.KlestError, match="unregistered_drop"):
        rec.values(np, np.zeros(4))
    with pytest.raises(klest.KlestError, match="unregistered_drop"):
        klest.estimate(log_ratio=np.zeros(4), estimator=rec)


@pytest.mark.parametrize("field", ["value", "derivative", "value_minus_derivative"])
def test_register_estimator_refuses_what_cannot_be_called(field):
    kw = {"value": lambda xp, L: -L, field: 3.0}
    rec = klest.Estimator("not_callable", "reverse_kl", **kw)
    with pytest.raises(klest.KlestError, match=f"not_callable.*{field.split('_')[0]}"):
        klest.register_estimator(rec)
    assert "not_callable" not in klest.estimator_names()


def test_names_are_checked_in_one_place_for_both_registries():
    """An estimator may not take a divergence's name and the other way round; unregistering an
    estimator frees its name for a divergence."""
    with pytest.raises(klest.KlestError, match="divergence name"):
        _register("squared_hellinger", lambda xp, L: -L)
    rec = _register("names_shared", lambda xp, L: -L)
    div = klest.FDivergence("names_shared", lambda t: (t - 1.0) ** 2, 0.0)
    try:
        with pytest.raises(klest.KlestError, match="estimator's name"):
            klest.register_divergence(div)
    finally:
        table.unregister_estimator(rec.name)
    klest.register_divergence(div)
    try:
        assert "names_shared" in klest.divergence_names()
        with pytest.raises(klest.KlestError, match="divergence name"):
            _register("names_shared", lambda xp, L: -L)
    finally:  # divergences have no public unregister: undo by hand for the other tests
        divergences._REGISTRY.pop("names_shared")
        _names._divergences.discard("names_shared")


def test_edit_distance_at_most_one():
    close = _names.edit_distance_at_most_one
    assert close("forward_kl", "forward_k1")  # substitution
    assert close("k3", "k3") and close("chi2", "chi") and close("chi", "chi2")
    assert not close("k1", "k23") and not close("chi2", "ihc2")


def test_klest_functions_map_to_their_records():
    for fn in (klest.k1, klest.k2, klest.k3, klest.forward_k1, klest.forward_k3):
        assert klest.get_estimator(fn) is klest.get_estimator(fn.__name__)
    with pytest.raises(klest.KlestError, match="k_opt"):
        klest.get_estimator(klest.k_opt)

    def mine(*, log_ratio):
        return log_ratio * log_ratio

    rec = klest.get_estimator(mine)
    assert rec.name == "mine" and not table.is_builtin(rec)
    got = klest.estimate(log_ratio=L, estimator=mine)
    assert got.mean == pytest.approx(float(np.mean(L * L)), rel=1e-13)


def test_a_registered_kernel_is_used_and_tied_to_its_value_function(registered):
    """klest.register_kernel: the engine uses the user's chunk kernel (compiled kernels on) for
    the estimator it was registered for, not for a later record of the same name."""
    calls = []

    def kernel(x):
        v = -np.asarray(x, dtype=np.float64) / 2
        calls.append(v.size)
        return float(v.mean()), float(((v - v.mean()) ** 2).sum()), float(v.min()), float(v.max())

    rec = registered("half_k1_kernel", lambda xp, L: -L / 2)
    klest.register_kernel("half_k1_kernel", kernel)
    with klest.options(fast=True):
        assert _stream.kernel_for(rec) is kernel
        got = klest.estimate(log_ratio=L, estimator="half_k1_kernel")
    assert sum(calls) == L.size
    assert got.mean == pytest.approx(float(np.mean(-L / 2)), rel=1e-13)
    assert got.std == pytest.approx(float(np.std(-L / 2, ddof=1)), rel=1e-12)
    with klest.options(fast=False):
        assert _stream.kernel_for(rec) is None
    other = klest.Estimator("half_k1_kernel", "reverse_kl", lambda xp, L: -L, unbiased=False)
    klest.register_estimator(other, overwrite=True)
    with klest.options(fast=True):
        assert _stream.kernel_for(other) is None
        got = klest.estimate(log_ratio=L, estimator="half_k1_kernel")
    assert got.mean == pytest.approx(float(np.mean(-L)), rel=1e-13)


def test_a_registered_kernel_returning_nan_is_refused(registered):
    registered("nan_kernel", lambda xp, L: -L)
    klest.register_kernel("nan_kernel", lambda x: (math.nan, math.nan, math.nan, math.nan))
    with klest.options(fast=True), pytest.raises(klest.KlestError, match="nan_kernel"):
        klest.estimate(log_ratio=L, estimator="nan_kernel")


def test_register_kernel_refusals():
    for name in ("k3", "fdiv:chi2", "chi2", "k_opt"):
        with pytest.raises(klest.KlestError, match="registered by name"):
            klest.register_kernel(name, lambda x: (0.0, 0.0, 0.0, 0.0))
    with pytest.raises(klest.KlestError, match="unknown estimator"):
        klest.register_kernel("no_such_estimator", lambda x: (0.0, 0.0, 0.0, 0.0))
    _register("kernel_not_callable", lambda xp, L: -L)
    try:
        with pytest.raises(klest.KlestError, match="callable"):
            klest.register_kernel("kernel_not_callable", 3)  # type: ignore[arg-type]
    finally:
        table.unregister_estimator("kernel_not_callable")


@pytest.mark.parametrize("value", ["maybe", "2", "ture"])
def test_an_unknown_klest_fast_value_is_refused(monkeypatch, value):
    monkeypatch.setenv("KLEST_FAST", value)
    with pytest.raises(klest.KlestError, match=r"KLEST_FAST=.*0 \(off\), 1 \(on\) or auto"):
        klest.estimate(log_ratio=L)


@pytest.mark.parametrize("value", ["", "auto", "AUTO", "0", "off", "1", "yes"])
def test_the_accepted_klest_fast_values(monkeypatch, value):
    monkeypatch.setenv("KLEST_FAST", value)
    got = klest.estimate(log_ratio=L, estimator="k1")
    assert got.mean == pytest.approx(float(np.mean(-L)), rel=1e-13)
