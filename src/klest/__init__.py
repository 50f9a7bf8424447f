"""klest: Monte Carlo estimators of KL and other f-divergences, exact, stable and backend-agnostic.

Samples come from q; p is the target; ``L = log p - log q``. k1, k2, k3 estimate the reverse
KL(q‖p); ``forward_*`` the forward KL(p‖q); :func:`fdiv` any f-divergence.
"""

from ._config import get_options, options, set_options
from ._stream import register_kernel
from .divergences import (
    FDivergence,
    alpha_divergence,
    divergence_names,
    get_divergence,
    register_divergence,
)
from .errors import KlestError
from .estimators import (
    clamped_log_ratio,
    fdiv,
    forward_k1,
    forward_k3,
    k1,
    k2,
    k3,
    k_lambda,
    k_opt,
    optimal_lambda,
)
from .stats import Estimate, Moments, estimate, estimator_names
from .table import Estimator, get_estimator, register_estimator

__version__ = "0.1.0"

__all__ = [
    "Estimate",
    "Estimator",
    "FDivergence",
    "KlestError",
    "Moments",
    "__version__",
    "alpha_divergence",
    "clamped_log_ratio",
    "divergence_names",
    "estimate",
    "estimator_names",
    "fdiv",
    "forward_k1",
    "forward_k3",
    "get_divergence",
    "get_estimator",
    "get_options",
    "k1",
    "k2",
    "k3",
    "k_lambda",
    "k_opt",
    "optimal_lambda",
    "options",
    "register_divergence",
    "register_estimator",
    "register_kernel",
    "set_options",
]
