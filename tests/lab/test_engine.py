"""The streaming engine: equal to the core's reductions on the same draws, identical across worker
counts, the k_opt moments, and the heavy-tail flag.

Statistical policy: as in tests/conftest.py, fixed seeds and 4-standard-error tolerances from the
closed-form stdevs of the Gaussian shift.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import klest
from klest.lab import distributions as D
from klest.lab.engine import log_ratio_sampler, run, run_many
from klest.lab.specs import as_distribution

N_SIGMA = 4.0


def _same_draws(q: D.Distribution, p: D.Distribution, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, 0)))
    return log_ratio_sampler(q, [p])(rng, n)[0]


@pytest.mark.parametrize(
    ("qs", "ps"),
    [
        ("normal(0, 1)", "normal(1, 1)"),
        ("normal(0.2, 1.3)", "normal(-0.5, 1)"),
        ("gamma(2, 1)", "exponential(0.8)"),
    ],
)
def test_matches_core_estimate_on_the_same_draws(qs: str, ps: str) -> None:
    q, p = as_distribution(qs), as_distribution(ps)
    n = 50_000
    names = [
        "k1",
        "k2",
        "k3",
        "forward_k1",
        "forward_k3",
        "k_opt",
        "fdiv:chi2",
        "fdiv:jensen_shannon",
        "fdiv:alpha:0.5",
    ]
    # one block: the engine's draws are exactly the first n of block 0's stream
    res = run(q, p, names, n=n, seed=7, block=1 << 16, chunk=1 << 14)
    L = _same_draws(q, p, n, 7)
    for name in names:
        ref = klest.estimate(log_ratio=L, estimator=name)
        assert res[name].mean == pytest.approx(float(ref.mean), rel=1e-10, abs=1e-14), name
        assert res[name].std == pytest.approx(float(ref.std), rel=1e-8), name
    lam = klest.optimal_lambda(log_ratio=L)
    assert res["k_opt"].lam == pytest.approx(float(lam), rel=1e-8)


def test_log_p_minus_infinity_gives_infinite_means() -> None:
    # p = 0 on half of q's samples: KL(q‖p) = +inf, r·log r - (r - 1) has the finite limit 1
    res = run("normal(0, 1)", "exponential(1)", ["k1", "k2", "k3", "forward_k3"], n=20_000, seed=1)
    assert res["k1"].mean == res["k2"].mean == res["k3"].mean == math.inf
    assert math.isfinite(res["forward_k3"].mean)
    L = _same_draws(D.Normal(0, 1), D.Exponential(1), 20_000, 1)
    assert res["forward_k3"].mean == pytest.approx(
        float(klest.estimate(log_ratio=L, estimator="forward_k3").mean)
    )


def test_identical_whatever_the_number_of_workers() -> None:
    kw = dict(n=3 * (1 << 16) + 123, seed=11, block=1 << 16, chunk=1 << 13)
    names = ["k1", "k2", "k3", "forward_k3", "k_opt", "fdiv:squared_hellinger"]
    one = run("normal(0, 1)", "normal(0.5, 1.2)", names, workers=1, **kw)  # type: ignore[arg-type]
    two = run("normal(0, 1)", "normal(0.5, 1.2)", names, workers=2, **kw)  # type: ignore[arg-type]
    three = run("normal(0, 1)", "normal(0.5, 1.2)", names, workers=3, **kw)  # type: ignore[arg-type]
    for name in names:
        assert one[name] == two[name] == three[name]
    again = run("normal(0, 1)", "normal(0.5, 1.2)", names, workers=2, **kw)  # type: ignore[arg-type]
    assert again == two


def test_run_many_equals_separate_runs() -> None:
    ps = ["normal(0.1, 1)", "normal(1, 1)"]
    both = run_many("normal(0, 1)", ps, ["k1", "k3"], n=100_000, seed=3)
    for p, res in zip(ps, both, strict=True):
        assert res == run("normal(0, 1)", p, ["k1", "k3"], n=100_000, seed=3)


@pytest.mark.parametrize("mu", [0.1, 1.0])
def test_normal_shift_within_four_standard_errors(mu: float) -> None:
    from klest.lab.experiments import normal_shift_expected

    n = 400_000
    res = run(
        "normal(0, 1)", f"normal({mu}, 1)", ["k1", "k2", "k3", "forward_k3", "k_opt"], n=n, seed=5
    )
    true = mu * mu / 2
    for name, r in res.items():
        bias, sd = normal_shift_expected(mu, name)
        se = sd / math.sqrt(n)
        assert abs((r.mean - true) / true - bias) < N_SIGMA * se, name
        assert r.reliable, name


def test_light_tails_are_not_flagged() -> None:
    names = ["k1", "k2", "k3", "forward_k3", "k_opt"]
    for mu in (0.01, 0.3, 1.0):
        res = run("normal(0, 1)", f"normal({mu}, 1)", names, n=300_000, seed=2)
        assert all(r.reliable for r in res.values()), (mu, {k: r.max_share for k, r in res.items()})


def test_heavy_tail_is_flagged() -> None:
    res = run("normal(0, 1)", "student_t(3)", ["k1", "k3", "forward_k3"], n=200_000, seed=0)
    assert res["k1"].reliable  # E_q[L²] is finite
    assert not res["k3"].reliable  # E_q[r²] = inf
    assert not res["forward_k3"].reliable
    assert res["k3"].max_share > 0.1


def test_bad_arguments() -> None:
    with pytest.raises(klest.KlestError, match="positive"):
        run("normal(0, 1)", "normal(1, 1)", ["k1"], n=0)
    with pytest.raises(klest.KlestError, match="unknown estimator"):
        run("normal(0, 1)", "normal(1, 1)", ["k9"], n=10)
    with pytest.raises(klest.KlestError, match="dimension"):
        run("normal(0, 1)", "mvnormal([0, 0])", ["k1"], n=10)


@pytest.mark.parametrize("fast", [False, True])
def test_memory_does_not_grow_with_n(fast: bool) -> None:
    import tracemalloc

    if fast:  # numba's own import is not the run's memory: load the kernels before tracing
        pytest.importorskip("numba")
        with klest.options(fast=True):
            run("normal(0, 1)", "normal(1, 1)", ["k1", "k_opt"], n=1000, seed=0)

    def peak(n: int) -> int:
        tracemalloc.start()
        with klest.options(fast=fast):
            run("normal(0, 1)", "normal(1, 1)", ["k1", "k2", "k3", "k_opt"], n=n, seed=0)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(1 << 21), peak(1 << 24)  # 2 and 16 blocks
    assert large < 1.3 * small + (1 << 20), (small, large)
    assert large < 64 << 20  # a few chunk buffers per worker, far below the 128 MiB of 16M floats


def test_progress_is_reported_in_order() -> None:
    seen: list[tuple[int, int]] = []
    run(
        "normal(0, 1)",
        "normal(1, 1)",
        ["k1"],
        n=3 * (1 << 16) + 5,
        seed=0,
        block=1 << 16,
        chunk=1 << 14,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen == [(1 << 16, 196613), (2 << 16, 196613), (3 << 16, 196613), (196613, 196613)]


def test_one_threads_setting_reaches_the_workers() -> None:
    from klest.lab.engine import default_workers

    with klest.options(threads=1):
        assert default_workers() == 1
        one = run("normal(0, 1)", "normal(0.3, 1)", ["k1", "k3"], n=3 << 16, block=1 << 16)
    with klest.options(threads=3):
        assert default_workers() == 3
        three = run("normal(0, 1)", "normal(0.3, 1)", ["k1", "k3"], n=3 << 16, block=1 << 16)
    assert one == three


def test_compiled_path_agrees_with_the_numpy_path() -> None:
    """With klest[fast] the normal pair is reduced by the fused quadratic loop, on the same draws;
    without it (or with fast=False) by the table's NumPy formulas: means agree to 1e-12."""
    names = ["k1", "k2", "k3", "forward_k1", "forward_k3", "k_opt"]
    kw = dict(n=300_000, seed=4, block=1 << 16)
    with klest.options(fast=True):
        fast = run("normal(0, 1)", "normal(0.7, 1.1)", names, **kw)  # type: ignore[arg-type]
    with klest.options(fast=False):
        slow = run("normal(0, 1)", "normal(0.7, 1.1)", names, **kw)  # type: ignore[arg-type]
    for name in names:
        assert fast[name].mean == pytest.approx(slow[name].mean, rel=1e-12), name
        assert fast[name].std == pytest.approx(slow[name].std, rel=1e-9), name
        assert fast[name].max_share == pytest.approx(slow[name].max_share, rel=1e-9), name


def test_k_opt_is_infinite_where_log_p_is_minus_infinity() -> None:
    res = run("normal(0, 1)", "exponential(1)", ["k_opt", "k3"], n=20_000, seed=1)
    assert res["k_opt"].mean == res["k3"].mean == math.inf
    assert res["k_opt"].n == 20_000


def test_blocks_smaller_than_the_default_chunk():
    """Review: run(block=2^15) worked with the former 2^14-sample chunk; the chunk now defaults
    to min(CHUNK, block), and an explicit chunk that does not divide the block is refused."""
    from klest.lab.engine import CHUNK

    small = CHUNK // 2
    res = run("normal(0, 1)", "normal(1, 1)", ["k3"], n=3 * small + 5, seed=2, block=small)
    ref = run(
        "normal(0, 1)", "normal(1, 1)", ["k3"], n=3 * small + 5, seed=2, block=small, chunk=small
    )
    assert res["k3"].mean == ref["k3"].mean and res["k3"].n == 3 * small + 5
    with pytest.raises(klest.KlestError, match="multiple of chunk"):
        run("normal(0, 1)", "normal(1, 1)", ["k3"], n=100, block=small, chunk=small * 2)
