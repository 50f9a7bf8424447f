"""The experiment lab: distributions from specs, ground truth, a streaming Monte Carlo engine, and
the experiments behind ``klest reproduce``, ``klest compare`` and ``klest sweep``; the exact
gradient lab behind ``klest gradients`` is :mod:`klest.lab.gradients` (torch, imported on use).

``import klest`` does not import this package; importing it loads NumPy only. SciPy (quantiles,
quadrature, special functions), matplotlib, rich and torch are imported by the functions that
need them.

>>> from klest.lab import compare
>>> rows = compare("normal(0, 1)", "normal(1, 1)", ["k3"], n=100_000, seed=0)
>>> rows[0]["truth_source"], rows[0]["expected_stdev_over_true"] > 1.69
('closed form', True)
"""

from ._executors import dask_executor
from .distributions import Distribution
from .engine import EstimatorResult, run, run_many
from .experiments import compare, reproduce, sweep
from .specs import SpecError, as_distribution, parse
from .truth import Truth, ground_truth, register_truth

__all__ = [
    "Distribution",
    "EstimatorResult",
    "SpecError",
    "Truth",
    "as_distribution",
    "compare",
    "dask_executor",
    "ground_truth",
    "parse",
    "register_truth",
    "reproduce",
    "run",
    "run_many",
    "sweep",
]
