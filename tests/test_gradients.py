"""Gradients of k1/k2/k3 with respect to log q (math.md §4), with torch and jax."""

from __future__ import annotations

import numpy as np
import pytest

import klest

# L from -50 to 50 including the series/closed-form switch and the tiny region
L_VALUES = np.array(
    [-50.0, -20.0, -1.0001, -1.0, -0.9999, -1e-3, -1e-8, 0.0, 1e-8, 1e-3, 0.5, 1.0, 3.0, 20.0, 50.0]
)

# d(estimator)/d(log q) in terms of L, r = e^L (k = f(L) with dL/dlogq = -1)
EXPECTED = {
    "k1": lambda L: np.ones_like(L),
    "k2": lambda L: -L,
    "k3": lambda L: -np.expm1(L),  # ∇k3 = (1 - r)·∇log q
    "forward_k1": lambda L: -(np.exp(L) + L * np.exp(L)),
    "forward_k3": lambda L: -L * np.exp(L),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(EXPECTED))
def test_torch_gradients(name, dtype):
    torch = pytest.importorskip("torch")
    dt = getattr(torch, dtype)
    logq = torch.full((L_VALUES.size,), -1.5, dtype=dt, requires_grad=True)
    logp = (torch.tensor(L_VALUES, dtype=dt) - 1.5).detach()
    L = (logp - logq).detach().double().numpy()
    getattr(klest, name)(logq, logp).sum().backward()
    grad = logq.grad.double().numpy()
    want = EXPECTED[name](L)
    ok = np.isfinite(want)
    assert np.isfinite(grad[ok]).all()
    # the inputs are rounded to the dtype: allow its precision at the scale of the terms
    rtol = 1e-6 if dtype == "float32" else 1e-13
    scale = 1 + np.exp(L) * (1 + np.abs(L)) + np.abs(L)
    assert (np.abs(grad[ok] - want[ok]) <= rtol * scale[ok]).all(), (grad, want)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_jax_gradients(name):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    logp = jnp.asarray(L_VALUES - 1.5)
    fn = getattr(klest, name)
    with klest.options(validate=True):
        grad = jax.grad(lambda q: jnp.sum(fn(q, logp)))(jnp.full(L_VALUES.shape, -1.5))
    L = np.asarray(logp) + 1.5  # the log-ratio actually seen, after rounding
    want = EXPECTED[name](L)
    scale = 1 + np.exp(L) * (1 + np.abs(L)) + np.abs(L)
    assert (np.abs(np.asarray(grad) - want) <= 1e-13 * scale).all()


def test_gradients_finite_where_logp_is_minus_inf():
    torch = pytest.importorskip("torch")
    logq = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    logp = torch.tensor([-np.inf, -0.5], dtype=torch.float64)
    for name, want in (
        ("k1", 1.0),
        ("k2", np.inf),
        ("k3", 1.0),
        ("forward_k3", 0.0),
        ("forward_k1", 0.0),
    ):
        logq.grad = None
        getattr(klest, name)(logq, logp).sum().backward()
        assert logq.grad[0].item() == want, name
        assert torch.isfinite(logq.grad[1])


def test_fdiv_gradients_match_finite_differences():
    torch = pytest.importorskip("torch")
    L0 = torch.tensor([-3.0, -0.5, -1e-4, 1e-4, 0.7, 2.5], dtype=torch.float64)
    for name in [*klest.divergence_names(), "alpha:0.5", "alpha:3"]:
        if name == "total_variation":
            continue  # |·| has a kink at r = 1
        L = L0.clone().requires_grad_(True)
        klest.fdiv(log_ratio=L, divergence=name).sum().backward()
        h = 1e-6
        num = (
            klest.fdiv(log_ratio=L0 + h, divergence=name)
            - klest.fdiv(log_ratio=L0 - h, divergence=name)
        ) / (2 * h)
        np.testing.assert_allclose(L.grad.numpy(), num.numpy(), rtol=1e-6, atol=1e-9, err_msg=name)
