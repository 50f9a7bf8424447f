"""The lab on executors: thread and process pools and a local Dask cluster give the same bits as a
local run with the same seed (blocks are seeded by SeedSequence(seed, spawn_key=(0, i)) and folded
in block order); sweeps on a cluster resume after an interruption; ``--scheduler`` on the CLI."""

from __future__ import annotations

import json
import math
import multiprocessing
import sys
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import klest
from klest import KlestError
from klest.cli import main
from klest.lab import _executors
from klest.lab.engine import EstimatorResult, run_many
from klest.lab.experiments import compare, reproduce, rows_to_json, sweep

BLOCK: dict[str, Any] = {
    "block": 1 << 13,
    "chunk": 1 << 11,
}  # small blocks: many blocks at a small n
ESTIMATORS = ["k1", "k2", "k3", "k_opt", "forward_k3", "fdiv:chi2"]


def _bits(results: list[dict[str, EstimatorResult]]) -> list[Any]:
    """Every number of the results, as exact bit patterns (NaN equal to NaN)."""

    def h(x: float | None) -> str:
        return "none" if x is None else float(x).hex()

    return [
        {
            k: (h(r.moments.n), h(r.mean), h(r.moments.m2), h(r.max_share), h(r.lam))
            for k, r in d.items()
        }
        for d in results
    ]


def _local_and(executor: Executor, q: str, ps: list[str], n: int, seed: int) -> tuple[Any, Any]:
    local = run_many(q, ps, ESTIMATORS, n, seed, workers=1, **BLOCK)
    remote = run_many(q, ps, ESTIMATORS, n, seed, executor=executor, **BLOCK)
    return _bits(local), _bits(remote)


# --------------------------------------------------------------------- plain executors
def test_thread_pool_gives_the_local_bits() -> None:
    with ThreadPoolExecutor(3) as ex:
        local, remote = _local_and(ex, "normal(0, 1)", ["student_t(5)", "normal(1, 2)"], 50_000, 7)
    assert local == remote


def test_process_pool_gives_the_local_bits_and_progress_in_block_order() -> None:
    n, block = 60_000, BLOCK["block"]
    seen: list[int] = []
    ctx = multiprocessing.get_context("spawn")  # nothing inherited: the task must pickle
    with ProcessPoolExecutor(2, mp_context=ctx) as ex:
        local, remote = _local_and(ex, "normal(0, 1)", ["normal(0.5, 1)", "laplace(0, 1)"], n, 3)
        # the fused all-normal path too, with progress reported block by block, in order
        res = run_many(
            "normal(0, 1)",
            ["normal(1, 1)"],
            ["k1", "k3"],
            n,
            3,
            executor=ex,
            progress=lambda done, total: seen.append(done),
            **BLOCK,
        )
    assert local == remote
    assert seen == [min(n, (i + 1) * block) for i in range(math.ceil(n / block))]
    want = run_many("normal(0, 1)", ["normal(1, 1)"], ["k1", "k3"], n, 3, **BLOCK)
    assert _bits(res) == _bits(want)
    # and the numbers are right: k3 against KL(N(0,1) ‖ N(1,1)) = 1/2 within 5 standard errors
    k3 = res[0]["k3"]
    assert abs(k3.mean - 0.5) < 5 * k3.stderr


def test_unpicklable_estimator_is_refused_for_a_process_pool() -> None:
    rec = klest.Estimator("half_k1_h8", "reverse_kl", lambda xp, L: -L / 2, unbiased=False)
    klest.register_estimator(rec)
    try:
        with ThreadPoolExecutor(2) as tp:  # threads share the process: no pickling needed
            got = run_many(
                "normal(0, 1)", ["normal(1, 1)"], ["half_k1_h8", "k1"], 20_000, 1, executor=tp
            )
        assert got[0]["half_k1_h8"].mean == pytest.approx(got[0]["k1"].mean / 2, rel=1e-12)
        with ProcessPoolExecutor(1) as ex, pytest.raises(KlestError, match="cannot be sent"):
            run_many("normal(0, 1)", ["normal(1, 1)"], ["half_k1_h8"], 20_000, 1, executor=ex)
    finally:
        klest.table.unregister_estimator("half_k1_h8")


# ------------------------------------------------------------------------ Dask cluster
@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    distributed = pytest.importorskip("distributed")
    lc = distributed.LocalCluster(
        n_workers=2,
        processes=True,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=None,
    )
    try:
        yield lc.scheduler_address
    finally:
        lc.close()


def test_dask_reproduce_and_compare_give_the_local_numbers(cluster: str) -> None:
    with _executors.dask_executor(cluster) as ex:
        assert _executors.executor_width(ex, 1) == 2  # two workers of one thread
        rep = reproduce(100_000, 11, executor=ex)
        cmp = compare("student_t(4)", "normal(0.5, 1)", ESTIMATORS, 50_000, 4, executor=ex)
    assert rows_to_json(rep) == rows_to_json(reproduce(100_000, 11))
    assert rows_to_json(cmp) == rows_to_json(
        compare("student_t(4)", "normal(0.5, 1)", ESTIMATORS, 50_000, 4)
    )
    # the reproduce table is right: k1 and k3 estimate μ²/2
    for row in rep:
        if row["estimator"] in ("k1", "k3") and row["true_value"] > 0:
            assert row["true_value"] == pytest.approx(
                float(row["p"].split("(")[1].split(",")[0]) ** 2 / 2
            )
            assert abs(row["bias_over_true"]) < 5 * row["stderr_bias_over_true"]


def test_dask_sweep_interrupted_then_resumed_equals_an_uninterrupted_run(
    cluster: str, tmp_path: Path
) -> None:
    args = ("normal(0, 1)", "normal(mu, 1)", "mu", [0.25, 0.5, 1.0, 2.0], ["k1", "k3"], 30_000, 5)

    class Stop(Exception):
        pass

    def stop_after_two(i: int, total: int, rows: list[dict[str, Any]]) -> None:
        if i == 1:
            raise Stop

    out = tmp_path / "cluster.json"
    with _executors.dask_executor(cluster) as ex:
        with pytest.raises(Stop):
            sweep(*args, out=out, executor=ex, on_point=stop_after_two)
        saved = json.loads(out.read_text())
        assert sorted({r["value"] for r in saved}) == [0.25, 0.5]  # two points were saved
        resumed: list[int] = []
        sweep(*args, out=out, executor=ex, on_point=lambda i, t, r: resumed.append(i))
    assert resumed == [2, 3]  # only the missing points were computed
    local = tmp_path / "local.json"
    sweep(*args, out=local)
    assert out.read_text() == local.read_text()


def test_cli_scheduler_prints_the_local_table(
    cluster: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "compare",
        "--q",
        "normal(0, 1)",
        "--p",
        "laplace(0, 1.5)",
        "--n",
        "40000",
        "--format",
        "json",
    ]
    assert main([*argv, "--scheduler", cluster, "--quiet"]) == 0
    on_cluster = capsys.readouterr().out
    assert main(argv) == 0
    assert on_cluster == capsys.readouterr().out
    assert len(json.loads(on_cluster)) == 5


def test_cli_scheduler_sweep(
    cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def argv(out: Path) -> list[str]:
        return ["sweep", "--q", "normal(0, 1)", "--p", "normal(mu, 1)", "--vary", "mu=0.5:1:2",
                "--n", "20000", "--quiet", "--format", "csv", "--out", str(out)]  # fmt: skip

    assert main([*argv(tmp_path / "a.csv"), "--scheduler", cluster]) == 0
    assert main(argv(tmp_path / "b.csv")) == 0
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


# ----------------------------------------------------------------------------- errors
def test_unreachable_scheduler_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("distributed")
    monkeypatch.setattr(_executors, "CONNECT_TIMEOUT", 1.0)
    argv = ["reproduce", "--n", "1000", "--scheduler", "tcp://127.0.0.1:1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach the Dask scheduler at tcp://127.0.0.1:1" in err


def test_missing_distributed_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    assert main(["reproduce", "--n", "1000", "--scheduler", "tcp://127.0.0.1:8786"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install klest[dask]" in err


def test_results_do_not_depend_on_the_block_count_of_in_flight_work() -> None:
    # a one-worker pool keeps two blocks in flight, a wide one many: same bits
    with ThreadPoolExecutor(1) as one, ThreadPoolExecutor(4) as four:
        a = run_many("gamma(2, 1)", ["gamma(3, 1)"], ESTIMATORS, 40_000, 9, executor=one, **BLOCK)
        b = run_many("gamma(2, 1)", ["gamma(3, 1)"], ESTIMATORS, 40_000, 9, executor=four, **BLOCK)
    assert _bits(a) == _bits(b)
    assert np.isfinite(a[0]["k3"].mean)
