"""Shared fixtures: the array backends every core test runs on, NumPy being the reference.

Statistical-test policy (written once, used by every test that draws random samples):
every Monte Carlo assertion uses a fixed seed and a tolerance of 4 standard errors, where the
standard error comes from the closed-form per-sample stdev (math.md §3) divided by √n. For one
Gaussian-like statistic the false-alarm probability of a correct implementation is 6.3e-5 per
assertion; with fixed seeds a test either always passes or always fails, so a failure is a real
change, not noise. Tolerances are never tuned by eye to make a run pass.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

if importlib.util.find_spec("jax") is not None:
    import jax

    jax.config.update("jax_enable_x64", True)

N_SIGMA = 4.0  # the statistical tolerance, in standard errors (see the policy above)

# Property tests explore new examples on every local run; under CI they replay a fixed sequence,
# so that a landing never depends on a random draw.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, database=None, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@dataclass(frozen=True)
class Backend:
    name: str
    asarray: Callable[[np.ndarray], Any]
    to_numpy: Callable[[Any], np.ndarray]
    array_type: type
    float32: Any
    float64: Any


def _numpy() -> Backend:
    return Backend("numpy", lambda a: np.asarray(a), np.asarray, np.ndarray, np.float32, np.float64)


def _torch() -> Backend:
    torch = pytest.importorskip("torch")
    dtypes = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}

    def asarray(a: np.ndarray) -> Any:
        a = np.asarray(a)
        if a.dtype in dtypes:
            return torch.tensor(a, dtype=dtypes[a.dtype])
        return torch.tensor(a)

    return Backend(
        "torch",
        asarray,
        lambda t: t.detach().cpu().numpy(),
        torch.Tensor,
        torch.float32,
        torch.float64,
    )


def _jax() -> Backend:
    pytest.importorskip("jax")
    import jax.numpy as jnp

    return Backend(
        "jax",
        lambda a: jnp.asarray(a),
        lambda t: np.asarray(t),
        jax.Array,
        jnp.float32,
        jnp.float64,
    )


def _strict() -> Backend:
    xs = pytest.importorskip("array_api_strict")

    def asarray(a: np.ndarray) -> Any:
        a = np.asarray(a)
        dtype = {
            np.dtype(np.float32): xs.float32,
            np.dtype(np.float64): xs.float64,
            np.dtype(np.bool_): xs.bool,
        }.get(a.dtype)
        return xs.asarray(a, dtype=dtype) if dtype is not None else xs.asarray(a)

    return Backend(
        "array_api_strict",
        asarray,
        lambda t: np.asarray(t),
        type(xs.asarray(0.0)),
        xs.float32,
        xs.float64,
    )


BACKENDS = {"numpy": _numpy, "torch": _torch, "jax": _jax, "array_api_strict": _strict}


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    return BACKENDS[request.param]()


def ulp_error(got: np.ndarray, ref: list[Any], dtype: Any) -> np.ndarray:
    """|got - ref| in units of the dtype's spacing at ref (ref: high-precision mpmath values)."""
    ref_f = np.array([float(r) for r in ref], dtype=np.float64)
    spacing = np.spacing(np.abs(ref_f).astype(dtype)).astype(np.float64)
    import mpmath

    pairs = zip(got.astype(np.float64), ref, strict=True)
    err = np.array([float(abs(mpmath.mpf(float(g)) - r)) for g, r in pairs])
    return err / spacing
