r"""The experiments: :func:`reproduce` (the seed's table), :func:`compare` (any pair) and
:func:`sweep` (a parameter grid, written point by point and resumable).

Every experiment returns rows, one per (p, estimator), as plain dicts with the stable keys of
:data:`ROW_KEYS`; ``report.py`` turns them into tables, Markdown, CSV or JSON.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import struct
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np

import klest
from klest import KlestError

from . import distributions as D
from .engine import EstimatorResult, run_many
from .specs import as_distribution, parse, variables_used
from .truth import Truth, _expm1mx, estimator_target, exact_mean_sd, ground_truth

__all__ = [
    "REPRODUCE_ESTIMATORS",
    "REPRODUCE_SHIFTS",
    "ROW_KEYS",
    "compare",
    "normal_shift_expected",
    "probe_writable",
    "read_rows",
    "reproduce",
    "sweep",
    "sweep_values",
]

REPRODUCE_SHIFTS = (0.1, 1.0)
REPRODUCE_ESTIMATORS = ("k1", "k2", "k3", "forward_k3", "k_opt")
DEFAULT_ESTIMATORS = REPRODUCE_ESTIMATORS

#: Keys of every row, in order (``compare`` and ``sweep`` add nothing else except a sweep's
#: configuration and point, :data:`SWEEP_KEYS`: ``q_template``/``p_template``/``param``/
#: ``sweep_seed``/``estimators``/``grid``/``value``).
ROW_KEYS = (
    "q",
    "p",
    "estimator",
    "target",
    "true_value",
    "truth_source",
    "truth_stderr",
    "mean",
    "bias_over_true",
    "stdev_over_true",
    "expected_bias_over_true",
    "expected_stdev_over_true",
    "stderr_bias_over_true",
    "stdev_reliable",
    "variance_finite",
    "max_share",
    "lambda",
    "n",
    "seed",
    "truth_note",
    "values_overflow",
)


# ------------------------------------------------------- closed forms for a Gaussian shift
def normal_shift_expected(mu: float, estimator: str) -> tuple[float, float]:
    """(bias/true, stdev/true) of ``estimator`` for q = N(0, 1), p = N(μ, 1), in closed form.

    There L = μx - μ²/2 ~ N(-μ²/2, μ²): k1 has stdev/true 2/μ, k2 has bias/true μ²/4 and
    stdev/true √(2 + μ²), k3 has stdev/true √(e^{μ²} - 1 - μ²)/(μ²/2), and the forward-KL
    control variate √(e^{μ²}(1 - 2μ² + 9μ⁴/4) - (1 - μ² + μ⁴/4))/(μ²/2).

    The true value is μ²/2 for both KL directions. ``k_opt`` is at λ* = μ²/(e^{μ²} - 1), its
    large-n limit: stdev/true = √(μ² - μ⁴/(e^{μ²} - 1)) / (μ²/2).

    >>> [round(v, 5) for v in normal_shift_expected(1.0, "k3")]
    [0.0, 1.69503]
    """
    m2 = mu * mu
    true = m2 / 2
    em = math.expm1(m2)
    # k = e^{μ²} - 1 - μ², from the series near 0: the variances below are written through it
    # so that nothing cancels for near-equal pairs (μ = 1e-6: e^{μ²} - 1 - μ² ~ 5e-25)
    k = _expm1mx(m2)
    if estimator == "k1":
        return 0.0, 2.0 / abs(mu)
    if estimator == "k2":
        return m2 / 4, math.sqrt(2 + m2)
    if estimator == "k3":
        return 0.0, math.sqrt(k) / true
    if estimator == "forward_k3":
        # e^{μ²}(1 - 2μ² + 9μ⁴/4) - (1 - μ² + μ⁴/4) = k(1 - 2μ²) + (9/4)μ⁴(e^{μ²} - 1)
        var = k * (1 - 2 * m2) + 2.25 * m2 * m2 * em
        return 0.0, math.sqrt(var) / true
    if estimator in ("k_opt", "k_opt_crossfit"):
        return 0.0, math.sqrt(m2 * k / em) / true  # μ² - μ⁴/(e^{μ²} - 1) = μ²·k/(e^{μ²} - 1)
    raise KlestError(f"no closed form for {estimator!r}", argument="estimator")


# --------------------------------------------------------------------------------- rows
def _row(
    q: D.Distribution,
    p: D.Distribution,
    name: str,
    res: EstimatorResult,
    t: Truth,
    expected: tuple[float, float] | None,
    variance_finite: bool | None,
    seed: int,
) -> dict[str, Any]:
    true = t.value
    std = res.std
    reliable = bool(res.reliable) and variance_finite is not False
    # p = q (a sweep crossing it): the truth is 0, every ratio to it is undefined ('-'); so is
    # every ratio to a truth of +inf (a sweep point recorded with its reason)
    defined = true != 0 and math.isfinite(true)
    # a finite truth is the mean of values finite almost surely: a mean of ±inf (or NaN) then
    # means the per-sample values left float64's range (k2 = L²/2 past |L| ≈ 1.9e154), and no
    # ratio is measured (refused, not printed as inf)
    overflow = math.isfinite(true) and not math.isfinite(res.mean)
    measured = defined and not overflow
    return {
        "q": q.spec,
        "p": p.spec,
        "estimator": name,
        "target": estimator_target(name),
        "true_value": true,
        "truth_source": t.source,
        "truth_stderr": t.stderr if t.approximate else None,
        "mean": res.mean,
        "bias_over_true": (res.mean - true) / true if measured else None,
        "stdev_over_true": std / abs(true) if measured else None,
        "expected_bias_over_true": None if expected is None or not defined else expected[0],
        "expected_stdev_over_true": None if expected is None or not defined else expected[1],
        "stderr_bias_over_true": std / abs(true) / math.sqrt(res.n) if measured else None,
        "stdev_reliable": reliable and not overflow,
        "variance_finite": variance_finite,
        "max_share": res.max_share,
        "lambda": res.lam,
        "n": res.n,
        "seed": seed,
        "truth_note": t.note or None,
        "values_overflow": overflow,
    }


def infinite_reason(t: Truth, target: str) -> tuple[str, bool]:
    """(why the truth ``t`` of ``target`` is +inf, whether it truly is): a support mismatch, a
    divergent integral or sum (told per direction: the reverse KL E_q[log q/p] diverges where q
    puts too much mass where p is small, the forward KL E_p[log p/q] where p does so where q is
    small), or mere overflow (a finite value beyond float64: not +inf).

    >>> infinite_reason(Truth(math.inf, "support mismatch"), "reverse_kl")
    ('support mismatch: p is zero where q has mass', True)
    """
    if t.source == "support mismatch":
        return "support mismatch: p is zero where q has mass", True
    diverges = "diverges" in t.note or t.source in ("closed form", "exact sum", "torch registry")
    if not diverges:
        return (
            f"overflow in the {t.source}: a value or a term exceeds float64's range, the "
            "divergence itself may be finite"
        ), False
    where = f" ({t.note})" if t.note else ""
    if target == "reverse_kl":
        return (
            f"{t.source}: q puts too much mass where p is small, E_q[log q/p] = +inf{where}",
            True,
        )
    if target == "forward_kl":
        return (
            f"{t.source}: p puts too much mass where q is small, E_p[log p/q] = +inf{where}",
            True,
        )
    return f"{t.source}: the integral E_q[f(p/q)] diverges{where}", True


def _checked_truth(
    q: D.Distribution, p: D.Distribution, target: str, seed: int, record: bool = False
) -> Truth:
    """The truth, refused where it is +inf or overflows (bias/true is undefined); with
    ``record`` (a sweep point) a true +inf comes back as such, its reason in the note."""
    t = ground_truth(q, p, target, seed=seed + 1)
    if math.isinf(t.value):
        why, infinite = infinite_reason(t, target)
        if record and infinite:
            return Truth(math.inf, t.source, note=why)
        what = "is +inf" if infinite else "cannot be computed"
        raise KlestError(
            f"the true {target} of p = {p.spec} from q = {q.spec} {what} ({why}); "
            "bias/true is undefined",
            argument="p",
        )
    if not math.isfinite(t.value):
        raise KlestError(f"the true {target} could not be computed", argument="p")
    return t


def _rows_for(
    q: D.Distribution,
    targets: Sequence[D.Distribution],
    estimators: Sequence[str],
    n: int,
    seed: int,
    workers: int | None,
    progress: Callable[[int, int], None] | None,
    expected: Callable[[D.Distribution, str], tuple[tuple[float, float] | None, bool | None]],
    executor: Executor | None = None,
    record: bool = False,
) -> list[dict[str, Any]]:
    truths = {
        (j, tgt): _checked_truth(q, p, tgt, seed, record)
        for j, p in enumerate(targets)
        for tgt in dict.fromkeys(estimator_target(e) for e in estimators)
    }
    results = run_many(
        q, targets, estimators, n, seed, workers=workers, progress=progress, executor=executor
    )
    rows = []
    for j, p in enumerate(targets):
        for name in estimators:
            t = truths[(j, estimator_target(name))]
            exp, finite = expected(p, name) if math.isfinite(t.value) else (None, None)
            rows.append(_row(q, p, name, results[j][name], t, exp, finite, seed))
    return rows


def _expected_generic(
    q: D.Distribution, p: D.Distribution, name: str, t: Truth
) -> tuple[tuple[float, float] | None, bool | None]:
    if t.approximate:
        return None, None
    try:
        mom = exact_mean_sd(q, p, name)
    except (KlestError, ValueError, ArithmeticError):
        return None, None
    if mom is None:
        return None, None
    mean, sd = mom
    if t.value == 0:  # p = q: the ratios to the truth are undefined
        return None, math.isfinite(sd)
    # The exact mean E_q[v] over q's support: every estimator but k2 is unbiased only when
    # E_q[r] = 1, which fails where p puts mass outside q's support (q = Exponential(1),
    # p = N(0, 1): E_q[r - 1] = -1/2). Quadrature's last digits read as 0: |bias| < 1e-9, or
    # below 1e-9 of sd/true where the values' spread dwarfs their mean (k1 for p ≈ q:
    # E_q|L| ~ sd ~ 2e9·KL, whose rounding alone leaves ~1e-7 of KL in the sum).
    bias = mean / t.value - 1.0
    spread = sd / abs(t.value) if math.isfinite(sd) else 1.0
    if name in ("k_opt", "k_opt_crossfit"):  # its mean is -E[L] + λ*·E[r - 1]: k1's spread
        k1 = exact_mean_sd(q, p, "k1")
        if k1 is not None and math.isfinite(k1[1]):
            spread = max(spread, k1[1] / abs(t.value))
    if abs(bias) < 1e-9 * max(1.0, spread):
        bias = 0.0
    return (bias, sd / abs(t.value)), math.isfinite(sd)


# ---------------------------------------------------------------------------- reproduce
def reproduce(
    n: int = 10_000_000,
    seed: int = 0,
    *,
    shifts: Sequence[float] = REPRODUCE_SHIFTS,
    estimators: Sequence[str] = REPRODUCE_ESTIMATORS,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    executor: Executor | None = None,
) -> list[dict[str, Any]]:
    """The seed's experiment: q = N(0, 1), p = N(μ, 1) for each shift μ, n samples.

    One set of n draws from q serves every shift. Expected columns come from the closed forms of
    :func:`normal_shift_expected`, the truth (μ²/2) from the closed-form registry. ``executor``
    (any :class:`concurrent.futures.Executor`, e.g. a Dask client's) runs the sampling blocks;
    the numbers do not depend on it (:func:`klest.lab.run`).
    """
    q = D.Normal(0.0, 1.0)
    targets = [D.Normal(float(mu), 1.0) for mu in shifts]

    def expected(p: D.Distribution, name: str) -> tuple[tuple[float, float] | None, bool | None]:
        assert isinstance(p, D.Normal)
        if p.loc == 0:  # p = q: the ratios to the truth (0) are undefined
            return None, True
        try:
            return normal_shift_expected(p.loc, name), True
        except KlestError:
            return _expected_generic(q, p, name, ground_truth(q, p, estimator_target(name)))

    return _rows_for(q, targets, list(estimators), n, seed, workers, progress, expected, executor)


# ------------------------------------------------------------------------------ compare
def compare(
    q: Any,
    p: Any,
    estimators: Sequence[str] = DEFAULT_ESTIMATORS,
    n: int = 1_000_000,
    seed: int = 0,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    executor: Executor | None = None,
    record_infinite: bool = False,
) -> list[dict[str, Any]]:
    """The same table for any pair: q and p are specs, lab distributions, frozen SciPy
    distributions or torch.distributions objects.

    Expected columns come from exact sums (discrete q) or quadrature (univariate continuous q),
    and are ``None`` elsewhere; ``variance_finite`` is False where the per-sample variance is
    infinite. ``executor``: as in :func:`reproduce`. A truth of +inf is an error, or with
    ``record_infinite`` (what a sweep does) rows with ``true_value`` +inf, the reason in
    ``truth_note`` and every ratio to the truth ``None``.
    """
    qd = as_distribution(q)
    pd = as_distribution(p)

    def expected(pp: D.Distribution, name: str) -> tuple[tuple[float, float] | None, bool | None]:
        return _expected_generic(
            qd, pp, name, ground_truth(qd, pp, estimator_target(name), seed=seed + 1)
        )

    return _rows_for(
        qd,
        [pd],
        list(estimators),
        n,
        seed,
        workers,
        progress,
        expected,
        executor,
        record_infinite,
    )


# -------------------------------------------------------------------------------- sweep
def sweep_values(text: str) -> tuple[str, list[float], bool]:
    """Parse ``NAME=START:STOP:COUNT[:log]`` or ``NAME=v1,v2,...`` into (name, values, log).

    >>> sweep_values("mu=0.5:2:4")
    ('mu', [0.5, 1.0, 1.5, 2.0], False)
    """
    if "=" not in text:
        raise KlestError("expected NAME=START:STOP:COUNT[:log] or NAME=v1,v2,...", argument="vary")
    name, _, rest = text.partition("=")
    name = name.strip()
    if not name.isidentifier() or not name.isascii():
        raise KlestError(f"{name!r} is not a valid variable name", argument="vary")
    try:
        if ":" in rest:
            parts = rest.split(":")
            log = len(parts) == 4 and parts[3].strip() == "log"
            if len(parts) not in (3, 4) or (len(parts) == 4 and not log):
                raise ValueError
            start, stop, count = float(parts[0]), float(parts[1]), int(parts[2])
            if not (math.isfinite(start) and math.isfinite(stop)):
                raise KlestError("START and STOP must be finite numbers", argument="vary")
            if count < 1 or count > 10_000:
                raise KlestError("COUNT must be between 1 and 10000", argument="vary")
            if log:
                if start <= 0 or stop <= 0:
                    raise KlestError("a log grid needs positive START and STOP", argument="vary")
                vals = np.geomspace(start, stop, count)
            else:
                vals = np.linspace(start, stop, count)
            return name, [float(v) for v in vals], log
        values = [float(v) for v in rest.split(",") if v.strip()]
        if not values:
            raise ValueError
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            raise KlestError(f"sweep values must be finite numbers, got {bad[0]}", argument="vary")
        return name, values, False
    except KlestError:
        raise
    except ValueError:
        raise KlestError(
            f"cannot read {rest!r}; expected START:STOP:COUNT[:log] or v1,v2,...", argument="vary"
        ) from None


def _point_seed(seed: int, value: float) -> int:
    """The seed of the sweep point at ``value``: derived from (seed, the value's bits), so the
    same value gets the same seed on any grid."""
    bits = struct.unpack("<Q", struct.pack("<d", float(value) + 0.0))[0]  # -0.0 reads as 0.0
    return int(np.random.SeedSequence([seed, bits]).generate_state(1, np.uint64)[0] >> 1)


def _grid_text(values: Sequence[float]) -> str:
    return ",".join(repr(float(v)) for v in values)


def sweep(
    q: str,
    p: str,
    param: str,
    values: Sequence[float],
    estimators: Sequence[str] = DEFAULT_ESTIMATORS,
    n: int = 1_000_000,
    seed: int = 0,
    *,
    out: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    on_point: Callable[[int, int, list[dict[str, Any]]], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    executor: Executor | None = None,
) -> list[dict[str, Any]]:
    """Run :func:`compare` at every value of ``param`` (a name used in the q and/or p spec).

    With ``out`` (``.json`` or ``.csv``) each finished point is appended to the file atomically
    (written to a temporary file, then renamed over it), so an interrupted sweep leaves a valid
    file; running the same sweep again keeps the finished points and computes only the rest.
    A file holding a different sweep (other specs, n, seed, estimators or grid of values) is an
    error. The point at value v uses its own seed derived from (seed, v), so resumed and
    uninterrupted sweeps agree, and a value shared by two grids gets the same numbers in both.
    ``executor`` runs each point's sampling blocks (as in :func:`reproduce`); the points are
    computed and saved one after another, in grid order. A point whose true divergence is +inf
    is recorded as such (``true_value`` inf, the reason in ``truth_note``, the ratios to it
    ``None``) and the sweep goes on. Specs are compared as parsed (canonical) text on resuming:
    ``normal(0,1)`` and ``normal(0, 1)`` are the same sweep.
    """
    estimators = list(estimators)
    values = [float(v) for v in values]
    if not values:
        raise KlestError("no values to sweep", argument="values")
    if not all(math.isfinite(v) for v in values):
        raise KlestError("sweep values must be finite numbers", argument="values")
    if len(set(values)) != len(values):
        raise KlestError("sweep values must be distinct", argument="values")
    if param not in variables_used(q) | variables_used(p):
        raise KlestError(f"neither spec uses the swept variable {param!r}", argument="param")
    # parse both at the first value now, so that a bad spec fails before any work
    for v in values:
        parse(q, variables={param: v})
        parse(p, variables={param: v})
    for e in estimators:
        estimator_target(e)
    config: dict[str, Any] = {
        "q_template": q,
        "p_template": p,
        "param": param,
        "n": n,
        "sweep_seed": seed,
        "estimators": ",".join(estimators),
        "grid": _grid_text(values),
    }
    path = Path(out) if out is not None else None
    if path is None:
        return _sweep_points(
            q,
            p,
            param,
            values,
            estimators,
            n,
            seed,
            config,
            None,
            [],
            workers,
            on_point,
            progress,
            executor,
        )
    try:
        probe_writable(path)  # before any work: a run must not end in an unwritable file
    except OSError as e:
        raise KlestError(f"cannot write {path}: {e.strerror or e}", argument="out") from None
    with _sweep_lock(path):
        rows = _read_sweep(path, config) if path.exists() else []
        return _sweep_points(
            q,
            p,
            param,
            values,
            estimators,
            n,
            seed,
            config,
            path,
            rows,
            workers,
            on_point,
            progress,
            executor,
        )


def _read_sweep(path: Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of the sweep file ``path``, refused unless they hold the sweep of ``config``."""
    rows = read_rows(path)
    for i, r in enumerate(rows):
        missing = [k for k in (*config, "value", "estimator") if k not in r]
        if missing:
            raise KlestError(
                f"{path} is not a sweep file of this version: row {i + 1} has no "
                f"{missing[0]!r}; choose another output file or delete it",
                argument="out",
            )
        if not isinstance(r["value"], (int, float)) or isinstance(r["value"], bool):
            raise KlestError(
                f"{path} is not a sweep file: row {i + 1} has value = {r['value']!r}",
                argument="out",
            )
        for k, want in config.items():
            if k in ("q_template", "p_template"):
                same = _same_template(r.get(k), want, config)
            else:
                same = _same_setting(r.get(k), want)
            if not same:
                raise KlestError(
                    f"{path} holds a different sweep ({k} = {r.get(k)!r}, not {want!r}); "
                    "choose another output file or delete it",
                    argument="out",
                )
    return rows


def _same_template(got: Any, want: str, config: dict[str, Any]) -> bool:
    """Two spec templates name the same distributions: parsed at every value of the grid, they
    give the same canonical specs (``normal(0,1)``, ``normal(0, 1.0)`` and
    ``gaussian(loc=0, scale=1)`` are one spec)."""
    if got == want:
        return True
    if not isinstance(got, str):
        return False
    values = [float(v) for v in str(config["grid"]).split(",")]
    try:
        return all(
            parse(got, variables={config["param"]: v}).spec
            == parse(want, variables={config["param"]: v}).spec
            for v in values
        )
    except KlestError:
        return False


def _same_setting(got: Any, want: Any) -> bool:
    """A configuration cell read back equals the setting. CSV cells lose their type (a one-value
    grid ``"0.5"`` reads back as the number 0.5): text settings are compared as CSV writes them."""
    if got == want:
        return True
    if isinstance(want, str) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return _cell_text(got) == want
    return False


def _cell_text(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def _sweep_points(
    q: str,
    p: str,
    param: str,
    values: list[float],
    estimators: list[str],
    n: int,
    seed: int,
    config: dict[str, Any],
    path: Path | None,
    rows: list[dict[str, Any]],
    workers: int | None,
    on_point: Callable[[int, int, list[dict[str, Any]]], None] | None,
    progress: Callable[[int, int], None] | None,
    executor: Executor | None = None,
) -> list[dict[str, Any]]:
    done = {(float(r["value"]), r["estimator"]) for r in rows}
    for i, v in enumerate(values):
        if all((v, e) in done for e in estimators):
            continue
        point = [
            {**config, "value": float(v), **r}
            for r in compare(
                parse(q, variables={param: v}),
                parse(p, variables={param: v}),
                estimators,
                n,
                _point_seed(seed, v),
                workers=workers,
                progress=progress,
                executor=executor,
                record_infinite=True,
            )
        ]
        if path is not None:
            # re-read under the lock before writing: a file changed behind the lock's back
            # (deleted, replaced, or written by a process that does not lock) is reported
            rows = _recheck(path, config, rows)
        rows = [r for r in rows if float(r["value"]) != float(v)] + point
        if path is not None:
            write_rows_atomic(path, rows)
        if on_point is not None:
            on_point(i, len(values), point)
    order = {float(v): i for i, v in enumerate(values)}
    rows.sort(key=lambda r: (order.get(float(r["value"]), math.inf), r["estimator"]))
    return rows


def _recheck(
    path: Path, config: dict[str, Any], rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The file's rows, refused if the file no longer holds what this sweep last wrote or read."""
    if not path.exists():
        if rows:
            raise KlestError(
                f"{path} was deleted while this sweep was writing it; its finished points are "
                "lost from the file (run the same command again to recompute them)",
                argument="out",
            )
        return rows
    now = _read_sweep(path, config)
    if _row_keys(now) != _row_keys(rows):
        raise KlestError(
            f"{path} was changed by another program while this sweep was writing it "
            f"({len(now)} rows there, {len(rows)} expected); choose another output file",
            argument="out",
        )
    return now


def _row_keys(rows: list[dict[str, Any]]) -> list[tuple[float, str]]:
    return sorted((float(r["value"]), str(r["estimator"])) for r in rows)


class _sweep_lock(contextlib.AbstractContextManager["_sweep_lock"]):
    """An exclusive lock on a sweep's output file, held for the whole sweep: a second sweep on
    the same file is refused at once (naming the process holding it), never left to overwrite
    the first one's points. The lock is ``.<name>.lock`` beside the file (``fcntl.flock``, or an
    ``O_EXCL`` lock file where there is no fcntl), removed on exit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = path.with_name(f".{path.name}.lock")
        self.fd: int | None = None

    def __enter__(self) -> _sweep_lock:
        try:
            import fcntl
        except ImportError:  # no fcntl (Windows): an exclusive creation is the lock
            try:
                self.fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raise self._busy() from None
            os.write(self.fd, str(os.getpid()).encode())
            return self
        while True:
            fd = os.open(self.lock, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise self._busy() from None
            # the holder before us may have removed the file after we opened it: retry then
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def _busy(self) -> KlestError:
        try:
            holder = self.lock.read_text().strip()
        except OSError:
            holder = ""
        who = f" (process {holder})" if holder.isdigit() else ""
        return KlestError(
            f"another sweep{who} is writing {self.path}; wait for it or choose another output "
            f"file (lock: {self.lock})",
            argument="out",
        )

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.lock)  # while still holding it: a waiter re-checks the inode
            os.close(self.fd)
            self.fd = None


def probe_writable(path: str | os.PathLike[str]) -> None:
    """Raise OSError unless ``path`` can be written now; nothing is left changed: an existing
    file is opened for appending (and closed), a new one created exclusively and removed."""
    p = Path(path)
    if p.exists():
        with open(p, "ab"):
            return
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.close(fd)
    os.unlink(p)


SWEEP_KEYS = (
    "q_template",
    "p_template",
    "param",
    "sweep_seed",
    "estimators",
    "grid",
    "value",
    *ROW_KEYS,
)


# ------------------------------------------------------------------------ file helpers
def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        # JSON has no infinity: +inf is the string "inf" (as the CSV writes it), so that +inf
        # and "unavailable" (null, an empty CSV cell) stay apart; NaN is never a result
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (np.floating,)):
        return _json_safe(float(v))
    if isinstance(v, (np.integer,)):
        return int(v)
    return v


def rows_to_json(rows: Sequence[dict[str, Any]]) -> str:
    """A JSON list; ±inf is written as the string "inf"/"-inf" (JSON has no infinity), an
    unavailable value (None) as null, as in the CSV (``inf``, an empty cell)."""
    return json.dumps([{k: _json_safe(v) for k, v in r.items()} for r in rows], indent=2)


def rows_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """CSV with a header; floats written with repr (exact round trip), None as empty."""
    if not rows:
        return ""
    keys = list(rows[0].keys())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(keys)
    for r in rows:
        w.writerow(
            [
                "" if r.get(k) is None else repr(r[k]) if isinstance(r[k], float) else r[k]
                for k in keys
            ]
        )
    return buf.getvalue()


def write_rows_atomic(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write rows (format from the suffix) to a temporary file beside ``path``, then rename."""
    text = rows_to_csv(rows) if path.suffix.lower() == ".csv" else rows_to_json(rows) + "\n"
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # name the user's file, not the temporary one
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        # mkstemp creates the file 0o600; give it the mode a plain open() would (0o666 - umask)
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _parse_cell(s: str) -> Any:
    if s == "":
        return None
    if s in ("True", "False"):
        return s == "True"
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return s


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read rows written by :func:`write_rows_atomic` (JSON or CSV)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        return []
    try:
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(io.StringIO(text))
            return [{k: _parse_cell(v) for k, v in r.items()} for r in reader]
        data = json.loads(text)
    except (ValueError, csv.Error) as e:
        raise KlestError(f"{path} is not a sweep file ({e})", argument="out") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise KlestError(f"{path} is not a sweep file (expected a JSON list)", argument="out")
    return [
        {k: _INFINITIES.get(v, v) if isinstance(v, str) else v for k, v in r.items()} for r in data
    ]


_INFINITIES = {"inf": math.inf, "-inf": -math.inf}


def estimator_names_for_cli() -> list[str]:
    """Estimators the lab can stream (every core name but the cross-fitted k_opt)."""
    return [e for e in klest.estimator_names() if e != "k_opt_crossfit"]
