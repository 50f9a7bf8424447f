"""reproduce / compare / sweep through the Python API: closed-form agreement within 4 SE,
stable JSON keys, determinism, torch and scipy objects, the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from klest import KlestError
from klest.lab.experiments import (
    ROW_KEYS,
    compare,
    normal_shift_expected,
    read_rows,
    reproduce,
    sweep,
    sweep_values,
)
from klest.lab.report import format_rows

N_SIGMA = 4.0
JSON_KEYS = {
    "p",
    "estimator",
    "true_value",
    "bias_over_true",
    "stdev_over_true",
    "expected_bias_over_true",
    "expected_stdev_over_true",
    "stderr_bias_over_true",
    "n",
}


def test_gaussian_shift_table_values() -> None:
    table = {  # independently computed (quadrature), to 5 decimals
        ("k1", 0.1): 20,
        ("k1", 1.0): 2,
        ("k2", 0.1): 1.41774,
        ("k2", 1.0): 1.73205,
        ("k3", 0.1): 1.41657,
        ("k3", 1.0): 1.69503,
        ("forward_k3", 0.1): 1.43422,
        ("forward_k3", 1.0): 3.54844,
        ("k_opt", 0.1): 1.41303,
        ("k_opt", 1.0): 1.29309,
    }
    for (est, mu), sd in table.items():
        assert normal_shift_expected(mu, est)[1] == pytest.approx(sd, abs=6e-5)
    assert normal_shift_expected(0.1, "k2")[0] == pytest.approx(0.0025)
    assert normal_shift_expected(1.0, "k2")[0] == pytest.approx(0.25)


def test_reproduce_agrees_with_closed_forms() -> None:
    n = 1_000_000
    rows = reproduce(n=n, seed=0)
    assert [(r["p"], r["estimator"]) for r in rows] == [
        (p, e)
        for p in ("normal(0.1, 1)", "normal(1, 1)")
        for e in ("k1", "k2", "k3", "forward_k3", "k_opt")
    ]
    for r in rows:
        assert list(r) == list(ROW_KEYS)
        assert r["truth_source"] == "closed form" and r["n"] == n
        se = r["expected_stdev_over_true"] / math.sqrt(n)
        assert abs(r["bias_over_true"] - r["expected_bias_over_true"]) < N_SIGMA * se, r
        assert r["stderr_bias_over_true"] == pytest.approx(r["stdev_over_true"] / math.sqrt(n))
        assert r["stdev_reliable"]
        # stdev/true: a sanity bound, not a statistical claim (the stdev's own error depends on
        # the fourth moment, large for forward_k3 at μ = 1 whose values are lognormal-like)
        rel = 0.05 if r["estimator"] == "forward_k3" else 0.02
        assert r["stdev_over_true"] == pytest.approx(r["expected_stdev_over_true"], rel=rel)
    assert reproduce(n=n, seed=0) == rows  # same seed, same numbers
    assert reproduce(n=n, seed=1) != rows


def test_formats() -> None:
    rows = reproduce(n=20_000, seed=0)
    data = json.loads(format_rows(rows, "json"))
    assert isinstance(data, list) and len(data) == 10
    assert all(JSON_KEYS <= set(d) for d in data)
    csv_text = format_rows(rows, "csv")
    assert csv_text.splitlines()[0].split(",")[: len(ROW_KEYS)] == list(ROW_KEYS)
    md = format_rows(rows, "markdown")
    assert md.startswith("| p | estimator")
    table = format_rows(rows, "table")
    assert "bias/true" in table and "normal(0.1, 1)" in table


def test_compare_torch_objects_use_the_registry() -> None:
    torch = pytest.importorskip("torch")
    q = torch.distributions.Normal(
        torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    )
    p = torch.distributions.Normal(
        torch.tensor(0.5, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    )
    n = 100_000
    rows = compare(q, p, ["k1", "k3"], n=n, seed=2)
    for r in rows:
        assert r["truth_source"] == "torch registry"
        assert r["true_value"] == pytest.approx(math.log(2) + (1 + 0.25) / 8 - 0.5)
        assert abs(r["bias_over_true"]) < N_SIGMA * r["stderr_bias_over_true"]


def test_compare_scipy_and_discrete() -> None:
    stats = pytest.importorskip("scipy.stats")
    n = 100_000
    rows = compare(
        stats.norm(0, 1), stats.laplace(0.3, 1.2), ["k1", "k3", "squared_hellinger"], n=n, seed=4
    )
    for r in rows:
        assert r["truth_source"] == "quadrature"
        sd = r["expected_stdev_over_true"]
        assert abs(r["bias_over_true"]) < N_SIGMA * sd / math.sqrt(n), r
    rows = compare("poisson(3)", "poisson(4)", ["k1", "k2", "k3", "total_variation"], n=n, seed=4)
    for r in rows:
        sd = r["expected_stdev_over_true"]
        assert abs(r["bias_over_true"] - r["expected_bias_over_true"]) < N_SIGMA * sd / math.sqrt(
            n
        ), r


def test_compare_heavy_tail_reports_unreliable_stdev() -> None:
    rows = compare("normal(0, 1)", "student_t(3)", ["k1", "k3"], n=100_000, seed=0)
    by = {r["estimator"]: r for r in rows}
    assert by["k1"]["stdev_reliable"] and by["k1"]["variance_finite"]
    assert not by["k3"]["stdev_reliable"] and by["k3"]["variance_finite"] is False
    text = format_rows(rows)
    assert "unreliable" in text and "exact second moment is infinite" in text


def test_compare_infinite_truth_is_an_error() -> None:
    with pytest.raises(KlestError, match=r"\+inf"):
        compare("normal(0, 1)", "exponential(1)", ["k1"], n=100)
    with pytest.raises(KlestError, match=r"\+inf"):
        compare("normal(0, 1)", "normal(0, 2)", ["chi2"], n=100)  # σp² > 2σq²: χ² diverges
    with pytest.raises(KlestError, match="p = q"):
        compare("normal(0, 1)", "normal(0, 1)", ["k1"], n=100)


def test_sweep_values() -> None:
    assert sweep_values("df=1,2,5") == ("df", [1.0, 2.0, 5.0], False)
    name, vals, log = sweep_values("mu=0.01:3:5:log")
    assert name == "mu" and log and vals[0] == pytest.approx(0.01) and vals[-1] == pytest.approx(3)
    for bad in ("mu", "mu=1:2", "mu=a,b", "mu=0:1:3:log", "1x=1,2", "mu=1:2:0"):
        with pytest.raises(KlestError):
            sweep_values(bad)


def test_sweep_writes_resumes_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    values = [0.5, 1.0, 1.5]
    rows = sweep(
        "normal(0, 1)", "normal(mu, 1)", "mu", values, ["k1", "k3"], n=20_000, seed=1, out=out
    )
    assert len(rows) == 6 and read_rows(out) == rows
    # resume: a file with only the first point is completed to the same rows
    partial = tmp_path / "p.json"
    partial.write_text(json.dumps(rows[:2]))
    calls = []
    again = sweep(
        "normal(0, 1)",
        "normal(mu, 1)",
        "mu",
        values,
        ["k1", "k3"],
        n=20_000,
        seed=1,
        out=partial,
        on_point=lambda i, total, pts: calls.append(i),
    )
    assert calls == [1, 2] and again == rows
    with pytest.raises(KlestError, match="different sweep"):
        sweep("normal(0, 1)", "normal(mu, 1)", "mu", values, ["k1"], n=10_000, seed=1, out=out)
    csv_out = tmp_path / "s.csv"
    rows_csv = sweep(
        "normal(0, 1)", "normal(mu, 1)", "mu", values, ["k1", "k3"], n=20_000, seed=1, out=csv_out
    )
    assert [r["bias_over_true"] for r in read_rows(csv_out)] == [
        r["bias_over_true"] for r in rows_csv
    ]

    from klest.lab.plots import plot_rows, plot_sweep

    png = plot_sweep(rows, tmp_path / "s.png", log_x=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    png2 = plot_rows(reproduce(n=10_000), tmp_path / "r.png")
    assert png2.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_torch_discrete_and_support() -> None:
    torch = pytest.importorskip("torch")
    n = 200_000
    q = torch.distributions.Categorical(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))
    p = torch.distributions.Categorical(torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64))
    rows = compare(q, p, ["k1", "k3", "squared_hellinger"], n=n, seed=1)
    sources = {r["estimator"]: r["truth_source"] for r in rows}
    assert sources == {
        "k1": "torch registry",
        "k3": "torch registry",
        "squared_hellinger": "exact sum",
    }
    for r in rows:
        sd = r["expected_stdev_over_true"]  # exact sums work for torch's discrete families too
        assert sd is not None and abs(r["bias_over_true"]) < N_SIGMA * sd / math.sqrt(n), r
    pois = compare(torch.distributions.Poisson(3.0), torch.distributions.Poisson(4.0), ["k3"], n=n)
    assert pois[0]["true_value"] == pytest.approx(3 * math.log(3 / 4) + 1)
    with pytest.raises(KlestError, match="support mismatch"):
        compare(
            torch.distributions.Normal(0.0, 1.0), torch.distributions.Exponential(1.0), ["k1"], n=10
        )
