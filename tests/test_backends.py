"""Every estimator on every backend agrees with NumPy and keeps the array type and dtype."""

from __future__ import annotations

import numpy as np
import pytest

import klest

RNG = np.random.default_rng(1234)
LOGQ = RNG.normal(-1.0, 0.5, size=(4, 50))
LOGP = LOGQ + RNG.normal(0.0, 0.7, size=(4, 50))

PER_SAMPLE = {
    "k1": lambda q, p: klest.k1(q, p),
    "k2": lambda q, p: klest.k2(q, p),
    "k3": lambda q, p: klest.k3(q, p),
    "forward_k1": lambda q, p: klest.forward_k1(q, p),
    "forward_k3": lambda q, p: klest.forward_k3(q, p),
    "k_lambda": lambda q, p: klest.k_lambda(q, p, 0.7),
    "k_opt": lambda q, p: klest.k_opt(q, p, axis=1),
    "k_opt_crossfit": lambda q, p: klest.k_opt(q, p, axis=-1, cross_fit=True),
    **{
        f"fdiv:{name}": (lambda name: lambda q, p: klest.fdiv(q, p, name))(name)
        for name in [*klest.divergence_names(), "alpha:0.5", "alpha:-1", "alpha:3"]
    },
    "fdiv:plain_chi2": lambda q, p: klest.fdiv(q, p, "chi2", control_variate=False),
}


@pytest.mark.parametrize("name", list(PER_SAMPLE))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_agrees_with_numpy(backend, name, dtype):
    fn = PER_SAMPLE[name]
    ref = fn(LOGQ.astype(dtype), LOGP.astype(dtype))
    got = fn(backend.asarray(LOGQ.astype(dtype)), backend.asarray(LOGP.astype(dtype)))
    assert isinstance(got, backend.array_type)
    assert got.dtype == (backend.float32 if dtype == np.float32 else backend.float64)
    assert got.shape == LOGQ.shape
    tol = 2e-5 if dtype == np.float32 else 1e-12
    # signed estimators cancel: compare at the scale of the values
    np.testing.assert_allclose(backend.to_numpy(got), ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_half_precision_is_computed_in_float32():
    q = LOGQ.astype(np.float16)
    p = LOGP.astype(np.float16)
    got = klest.k3(q, p)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, klest.k3(q.astype(np.float32), p.astype(np.float32)))


def test_bfloat16_torch_is_computed_in_float32():
    torch = pytest.importorskip("torch")
    q = torch.tensor(LOGQ, dtype=torch.bfloat16)
    p = torch.tensor(LOGP, dtype=torch.bfloat16)
    got = klest.k2(q, p)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), klest.k2(q.float(), p.float()).numpy())


def test_broadcasting():
    got = klest.k3(np.float64(-1.0), LOGP)
    np.testing.assert_allclose(got, klest.k3(np.full_like(LOGP, -1.0), LOGP))
    got = klest.k3(LOGQ[:, :1], LOGP)
    assert got.shape == LOGP.shape


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "forward_k3", "chi2", "k_opt"])
def test_estimate_agrees_with_numpy(backend, estimator):
    ref = klest.estimate(LOGQ, LOGP, estimator)
    got = klest.estimate(backend.asarray(LOGQ), backend.asarray(LOGP), estimator)
    assert isinstance(got.mean, backend.array_type) or backend.name == "numpy"
    for field in ("mean", "std", "stderr", "n"):
        assert float(getattr(got, field)) == pytest.approx(float(getattr(ref, field)), rel=1e-10)
    by_row = klest.estimate(backend.asarray(LOGQ), backend.asarray(LOGP), estimator, axis=1)
    assert isinstance(by_row.mean, backend.array_type)
    ref_rows = klest.estimate(LOGQ, LOGP, estimator, axis=1)
    np.testing.assert_allclose(backend.to_numpy(by_row.mean), ref_rows.mean, rtol=1e-10)
    np.testing.assert_allclose(backend.to_numpy(by_row.std), ref_rows.std, rtol=1e-10)


def test_python_numbers_take_the_arrays_dtype(backend):
    p = backend.asarray(LOGP.astype(np.float32))
    got = klest.k3(-1.0, p)
    assert isinstance(got, backend.array_type)
    assert got.dtype == backend.float32
    np.testing.assert_allclose(
        backend.to_numpy(got), klest.k3(np.float32(-1.0), LOGP.astype(np.float32)), rtol=1e-6
    )
