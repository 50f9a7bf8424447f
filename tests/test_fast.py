"""The compiled kernels of ``klest[fast]`` (klest._fast): accuracy against a 50-digit mpmath
reference, moments against NumPy's two-pass formulas, non-finite blocks, the lab's quadratic loop,
the switches that turn the kernels off, and the on-disk compile cache.

Every test that needs numba is skipped on its own when numba is missing; the tests of the module's
behaviour without numba run in a subprocess that hides numba.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mpmath
import numpy as np
import pytest

import klest
from conftest import ulp_error
from klest import _fast

mpmath.mp.dps = 50

needs_numba = pytest.mark.skipif(_fast._nb is None, reason="numba (klest[fast]) not installed")
NAMES = ["k1", "k2", "k3", "forward_k1", "forward_k3"]
MAX_ULP = 4.0  # the NumPy path's bound (tests/test_numerics.py)
# The vectorised doubling path (float32 input, the lab's quadratic L) is not correctly rounded
# in float64: s <= 7 doublings (|L| <= 128) at most double a relative error each, from a start
# of about 1 eps, so its bound is 2^8 eps = 5.7e-14 relative: 1e-6 of a float32 ulp and well
# inside the 1e-12 agreement asked of the means.
FAST_REL = 2.0**8 * np.finfo(np.float64).eps


def _points(top: float) -> np.ndarray:
    """|L| from 1e-8 to ``top``, both signs, dense at the branch switches (1, 2, 4, 128)."""
    mags = np.concatenate(
        [np.logspace(-8, np.log10(top), 300), [0.999, 1.0, 1.001, 2.0, 2.001, 4.0, 127.99]]
    )
    mags = mags[mags <= top]
    return np.sort(np.concatenate([mags, -mags]))


def _ref(name: str, x: float) -> mpmath.mpf:
    x = mpmath.mpf(x)
    if name == "k1":
        return -x
    if name == "k2":
        return x * x / 2
    if name == "k3":
        return mpmath.expm1(x) - x
    if name == "forward_k1":
        return x * mpmath.exp(x)
    return x * mpmath.exp(x) - mpmath.expm1(x)


def _numpy_values(name: str, L: np.ndarray) -> np.ndarray:
    """The NumPy path's per-sample values in float64 (klest's own array-API formulas), except
    where that path differs on bad input (which validation refuses before any arithmetic): at
    L = +inf klest.k3 gives NaN (expm1(inf) - inf) where the kernels give the limit +inf, and
    at L = NaN klest.forward_k1 gives 0 where the kernels give NaN."""
    fn = getattr(klest, name)
    with klest.options(validate=False), np.errstate(invalid="ignore"):
        v = np.asarray(fn(log_ratio=np.asarray(L, dtype=np.float64)), dtype=np.float64)
    if name == "k3":
        v[np.asarray(L) == np.inf] = np.inf
    v[np.isnan(L)] = np.nan
    return v


def _numpy_moments(v: np.ndarray) -> tuple[float, float, float, float]:
    with np.errstate(invalid="ignore", over="ignore"):
        mean = v.mean()
        return float(mean), float(((v - mean) ** 2).sum()), float(v.min()), float(v.max())


# ----------------------------------------------------------------------- per-sample accuracy
@needs_numba
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("dtype", "top"), [(np.float32, 88.0), (np.float64, 709.0)])
def test_exact_path_within_the_numpy_ulp_bound(name, dtype, top):
    """The scalar forms (float64 input; any block with inf/NaN or |L| > LIMIT) are within 4 ulp of
    the 50-digit value, in the input dtype's ulp and in float64's."""
    L = _points(top).astype(dtype)
    got = _fast.values(name, L, fast=False)
    ref = [_ref(name, float(x)) for x in L]
    for unit in {np.dtype(dtype).type, np.float64}:
        errs = ulp_error(got.astype(unit), ref, unit)
        worst = int(np.argmax(errs))
        assert errs[worst] <= MAX_ULP, f"{errs[worst]:.1f} ulp at L = {L[worst]!r}"


@needs_numba
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("grouping", ["alone", "block"])
def test_doubling_path_accuracy(name, grouping):
    """float32 input takes the doubling path: at most 2^8 eps relative (0.05 float32 ulp was the
    issue's bar), for |L| from 1e-8 to 88, and up to LIMIT = 128 in float64 (the lab's L).
    'alone': each point in its own block, so s is fitted to it; 'block': one block of every
    point, so small |L| are doubled the most (s = 7)."""
    for dtype, top in ((np.float32, 88.0), (np.float64, _fast.LIMIT)):
        L = _points(top).astype(dtype)
        if grouping == "alone":
            got = np.array([_fast.values(name, L[i : i + 1], fast=True)[0] for i in range(L.size)])
        else:
            got = _fast.values(name, L, fast=True)
        for x, g in zip(L, got, strict=True):
            want = _ref(name, float(x))
            rel = float(abs((mpmath.mpf(float(g)) - want) / want))
            assert rel <= FAST_REL, (name, dtype, float(x), rel)
        # and in float32 ulp, the unit the issue states
        if dtype == np.float32:
            errs = ulp_error(got.astype(np.float32), [_ref(name, float(x)) for x in L], np.float32)
            assert errs.max() <= 0.51  # correctly rounded once cast (up to double rounding)


@needs_numba
def test_naive_doubling_would_fail():
    """The accuracy test has teeth: k3 = e^L - 1 - L in float64 misses 1e-13 near 0."""
    x = 1e-5
    naive = np.exp(x) - 1 - x
    want = _ref("k3", x)
    assert float(abs((mpmath.mpf(naive) - want) / want)) > 1e-6


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_limits_at_infinity_and_nan(dtype):
    L = np.array([-np.inf, np.inf, np.nan, 0.0, -0.0], dtype=dtype)
    want = {
        "k1": [np.inf, -np.inf, np.nan, 0.0, 0.0],
        "k2": [np.inf, np.inf, np.nan, 0.0, 0.0],
        "k3": [np.inf, np.inf, np.nan, 0.0, 0.0],  # e^L - 1 - L -> +inf at both ends
        "forward_k1": [0.0, np.inf, np.nan, 0.0, 0.0],  # r log r -> 0 as r -> 0
        "forward_k3": [1.0, np.inf, np.nan, 0.0, 0.0],  # r log r - (r - 1) -> 1
    }
    for name, w in want.items():
        for fast in (True, False):
            np.testing.assert_array_equal(_fast.values(name, L, fast=fast), w, err_msg=name)


@needs_numba
def test_overflow_is_inf_not_nan():
    """float64 L beyond log(max double): +inf, as the NumPy path says; far negative: finite."""
    L = np.array([710.0, 800.0, -800.0, -1e300])
    for fast in (True, False):
        k3 = _fast.values("k3", L, fast=fast)
        assert k3[0] == k3[1] == np.inf
        np.testing.assert_allclose(k3[2:], [799.0, 1e300], rtol=1e-15)
        f3 = _fast.values("forward_k3", L, fast=fast)
        assert f3[0] == f3[1] == np.inf and f3[2] == 1.0 and f3[3] == 1.0


# --------------------------------------------------------------------------------- moments
@needs_numba
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [1e-6, 0.5, 5.0, 60.0])
def test_moments_agree_with_numpy(name, dtype, scale):
    """(mean, m2, min, max) equal NumPy's two-pass values on the NumPy path's per-sample values,
    means to 1e-12 relative, over many sub-blocks and a ragged tail."""
    rng = np.random.default_rng(int(scale * 1000) + len(name))
    L = (scale * rng.standard_normal(5 * _fast.SUB + 37) - scale / 4).astype(dtype)
    mean, m2, lo, hi = _fast.KERNELS[name](L)
    w_mean, w_m2, w_lo, w_hi = _numpy_moments(_numpy_values(name, L))
    assert mean == pytest.approx(w_mean, rel=1e-12, abs=1e-300)
    assert m2 == pytest.approx(w_m2, rel=1e-10)
    assert lo == pytest.approx(w_lo, rel=1e-12, abs=1e-300)
    assert hi == pytest.approx(w_hi, rel=1e-12)


@needs_numba
def test_mixed_blocks_take_both_paths():
    """A block holding |L| > LIMIT is computed by the scalar forms, the others by doubling; the
    moments still match NumPy."""
    rng = np.random.default_rng(3)
    L = rng.standard_normal(4 * _fast.SUB).astype(np.float32)
    L[_fast.SUB + 5] = -300.0  # one block beyond LIMIT (k3 = 299 there)
    for name in NAMES:
        got = _fast.KERNELS[name](L)
        want = _numpy_moments(_numpy_values(name, L))
        np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=name)


def _nonfinite_cases() -> dict[str, np.ndarray]:
    base = np.linspace(-2.0, 2.0, 3 * _fast.SUB)
    cases = {}
    for label, where, val in [
        ("-inf", [10], -np.inf),
        ("+inf", [2000], np.inf),
        ("nan", [5], np.nan),
        ("nan and -inf", [5, 3000], np.nan),
        ("-inf and +inf", [10, 2000], np.inf),
    ]:
        L = base.copy()
        L[where] = val
        if label == "nan and -inf":
            L[3000] = -np.inf
        if label == "-inf and +inf":
            L[10] = -np.inf
        cases[label] = L
    return cases


@needs_numba
@pytest.mark.parametrize("label", list(_nonfinite_cases()))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nonfinite_blocks_follow_numpy(label, dtype):
    """NaN anywhere -> NaN mean; values +inf (or -inf) -> mean ±inf with NaN m2; min/max
    include the infinities: NumPy's own results on the same values."""
    L = _nonfinite_cases()[label].astype(dtype)
    for name in NAMES:
        got = np.array(_fast.KERNELS[name](L))
        want = np.array(_numpy_moments(_numpy_values(name, L)))
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{name} {label}")
        finite = ~np.isnan(want)
        np.testing.assert_allclose(got[finite], want[finite], rtol=1e-12, err_msg=name)


@needs_numba
def test_overflowing_sum_of_finite_values():
    """Finite values whose sum overflows: NumPy says mean +inf, m2 +inf."""
    L = np.full(50, 700.0)  # 700·e^700 = 7e306: finite, but 50 of them are not
    mean, m2, lo, hi = _fast.KERNELS["forward_k1"](L)
    assert mean == np.inf and m2 == np.inf and np.isfinite(lo) and lo == hi
    assert _numpy_moments(_numpy_values("forward_k1", L))[:2] == (np.inf, np.inf)


@needs_numba
def test_empty_and_single():
    assert _fast.KERNELS["k3"](np.zeros(0)) == pytest.approx(
        (np.nan, np.nan, np.inf, -np.inf), nan_ok=True
    )
    mean, m2, lo, hi = _fast.KERNELS["k1"](np.array([2.5], dtype=np.float32))
    assert (mean, m2, lo, hi) == (-2.5, 0.0, -2.5, -2.5)


@needs_numba
def test_results_do_not_depend_on_memory_alignment():
    """Bit-identical moments for the same values at any address (the sums' SIMD split must not
    depend on where a buffer lands), so that runs and resumed runs agree exactly."""
    L = np.random.default_rng(4).standard_normal(3 * _fast.SUB + 5)
    big = np.empty(L.size + 16)
    for name in ("k3", "forward_k3"):
        want = _fast.KERNELS[name](L)
        for off in range(8):
            shifted = big[off : off + L.size]
            shifted[:] = L
            assert _fast.KERNELS[name](shifted) == want
            assert _fast.KERNELS[name](shifted.astype(np.float32)) == _fast.KERNELS[name](
                L.astype(np.float32)
            )
    x = np.random.default_rng(6).standard_normal(2 * _fast.SUB + 3)
    coeffs = np.array([[0.0, 1.0, -0.5]])
    want_q = _fast.quadratic_moments(x, coeffs, ("k3",))
    for off in range(4):
        shifted = big[off : off + x.size]
        shifted[:] = x
        np.testing.assert_array_equal(_fast.quadratic_moments(shifted, coeffs, ("k3",)), want_q)


@needs_numba
def test_other_dtypes_are_widened():
    """float16 chunks (and integers) are widened to float64 exactly before the kernel runs."""
    L = np.array([-1.5, 0.25, 3.0], dtype=np.float16)
    want = _numpy_moments(_numpy_values("k3", L.astype(np.float64)))
    np.testing.assert_allclose(_fast.KERNELS["k3"](L), want, rtol=1e-15)


@needs_numba
def test_kernels_release_the_gil_and_are_thread_safe():
    L = np.random.default_rng(1).standard_normal(20 * _fast.SUB).astype(np.float32)
    parts = np.array_split(L, 8)
    want = [_fast.KERNELS["k3"](p) for p in parts]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(_fast.KERNELS["k3"], parts))
    assert got == want


# ------------------------------------------------------------------------- the lab's loop
@needs_numba
def test_quadratic_moments_match_the_materialised_log_ratio():
    """quadratic_moments equals the kernels on L = (a·x + b)·x + c, formed as the lab forms it,
    and NumPy's moments of the NumPy path's values."""
    x = np.random.default_rng(5).standard_normal(3 * _fast.SUB + 11)
    coeffs = np.array([[0.0, 0.1, -0.005], [0.0, 1.0, -0.5], [0.375, 0.0, -np.log(2.0)]])
    names = ("k1", "k2", "k3", "forward_k3", "forward_k1")
    out = _fast.quadratic_moments(x, coeffs, names)
    assert out.shape == (3, 5, 4) and out.dtype == np.float64
    for p, (a, b, c) in enumerate(coeffs):
        L = (x * a + b) * x + c
        for j, name in enumerate(names):
            np.testing.assert_allclose(out[p, j], _fast.KERNELS[name](L), rtol=1e-12)
            want = _numpy_moments(_numpy_values(name, L))
            np.testing.assert_allclose(out[p, j], want, rtol=1e-12, err_msg=name)


@needs_numba
def test_quadratic_moments_estimate_the_closed_form():
    """q = N(0,1), p = N(1,1): L = x - 1/2, KL = 1/2, k3 stdev/true = 1.69503 (math.md §3)."""
    n = 400_000
    x = np.random.default_rng(11).standard_normal(n)
    (k3,) = _fast.quadratic_moments(x, np.array([[0.0, 1.0, -0.5]]), ("k3",))[0]
    se = 1.69503 * 0.5 / np.sqrt(n)
    assert abs(k3[0] - 0.5) < 4 * se
    assert np.sqrt(k3[1] / (n - 1)) == pytest.approx(1.69503 * 0.5, rel=0.02)


# ------------------------------------------------------------------------------ switches
@needs_numba
def test_available_follows_options_and_environment(monkeypatch):
    monkeypatch.delenv("KLEST_FAST", raising=False)
    assert _fast.available()
    with klest.options(fast=False):
        assert not _fast.available()
    monkeypatch.setenv("KLEST_FAST", "0")
    assert not _fast.available()


def test_fast_option_values():
    for ok in (True, False, "auto"):
        with klest.options(fast=ok) as o:
            assert o.fast == ok
    for bad in ("yes", 1, np.bool_(True), None):
        with pytest.raises(klest.KlestError, match="fast"), klest.options(fast=bad):
            pass


@needs_numba
def test_auto_loads_numba_only_once_the_work_pays():
    """fast="auto" (the default): a small job in a fresh process stays on the NumPy path and does
    not import numba; once the process's NumPy-path work reaches AUTO_FAST_WORK the kernels are
    loaded (and used from then on); options(fast=True) and KLEST_FAST=1 load them at once, and
    the numbers agree either way."""
    code = """
        import json, sys
        import numpy as np
        import klest, klest._config as c
        c.AUTO_FAST_WORK = 250_000
        L = np.random.default_rng(0).standard_normal(100_000) * 0.3
        seen = []
        means = []
        for _ in range(4):
            means.append(float(klest.estimate(log_ratio=L).mean))
            seen.append("numba" in sys.modules)
        print(json.dumps([seen, means]))
        """
    seen, means = _run(code, {"KLEST_FAST": ""})
    assert seen == [False, False, True, True]  # 1e5, 2e5: below; 3e5 reaches it
    assert means[3] == pytest.approx(means[0], rel=1e-12)
    seen, _ = _run(code, {"KLEST_FAST": "1"})
    assert seen == [True] * 4
    seen, _ = _run(code.replace("c.AUTO_FAST_WORK = 250_000", "klest.set_options(fast=True)"), {})
    assert seen == [True] * 4
    seen, _ = _run(code.replace("250_000", "1"), {"KLEST_FAST": "0"})
    assert seen == [False] * 4
    # the lab counts samples x targets x estimators: 2 x 60,000 x 3 = 360,000 >= 250,000
    lab = _run(
        """
        import json, sys
        import klest._config as c
        from klest.lab.engine import run_many
        c.AUTO_FAST_WORK = 250_000
        run_many("normal(0, 1)", ["normal(1, 1)"], ["k1", "k2", "k3"], 60_000)
        first = "numba" in sys.modules
        run_many("normal(0, 1)", ["normal(1, 1)"], ["k1", "k2", "k3"], 60_000)
        print(json.dumps([first, "numba" in sys.modules]))
        """,
        {"KLEST_FAST": ""},
    )
    assert lab == [False, True]


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_estimate_with_and_without_the_kernels(dtype):
    """klest.estimate gives the same numbers (means to 1e-12) with the kernels on and off."""
    L = (0.7 * np.random.default_rng(2).standard_normal(300_001) - 0.2).astype(dtype)
    for name in ("k1", "k2", "k3", "forward_k1", "forward_k3"):
        on = klest.estimate(log_ratio=L, estimator=name)
        with klest.options(fast=False):
            off = klest.estimate(log_ratio=L, estimator=name)
        assert float(on.mean) == pytest.approx(float(off.mean), rel=1e-12), name
        assert float(on.std) == pytest.approx(float(off.std), rel=1e-10), name
        assert on.n == off.n


def _run(code: str, env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_import_without_numba():
    """Without numba: importing works, nothing is available, using a kernel says what to
    install."""
    res = _run(
        """
        import json, sys
        sys.modules["numba"] = None  # makes `import numba` raise ImportError
        import numpy as np
        from klest import _fast, KlestError
        try:
            _fast.quadratic_moments(np.zeros(3), np.zeros((1, 3)), ("k3",))
            msg = ""
        except KlestError as e:
            msg = str(e)
        print(json.dumps([_fast.available(), len(_fast.KERNELS), msg]))
        """,
        {},
    )
    assert res[0] is False and res[1] == 0 and "klest[fast]" in res[2]


@needs_numba
@pytest.mark.slow
def test_compile_cache_is_reused_by_a_second_process(tmp_path: Path):
    """cache=True: the first process compiles and writes NUMBA_CACHE_DIR, a second one loads
    every kernel from it without compiling."""
    code = """
        import json
        import numpy as np
        from klest import _fast
        _fast.KERNELS["k3"](np.ones(5, dtype=np.float32))
        d = _fast._moments_f32  # the float32 path
        print(json.dumps([sum(d.stats.cache_hits.values()), sum(d.stats.cache_misses.values())]))
        """
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    hits, misses = _run(code, env)
    assert misses >= 1 and hits == 0
    assert any((tmp_path / "cache").rglob("*.nbi"))
    hits, misses = _run(code, env)
    assert hits >= 1 and misses == 0


def _ref_comoments(L: np.ndarray) -> np.ndarray:
    """k_opt's co-moments computed independently: 50-digit k3 and e = r - 1 per sample, then
    means and centred cross-products by exact summation (math.fsum) over the finite samples."""
    fin = [float(x) for x in L if x != -np.inf]
    k3 = [float(mpmath.expm1(mpmath.mpf(x)) - x) for x in fin]
    e = [float(mpmath.expm1(mpmath.mpf(x))) for x in fin]
    cols = [fin, k3, e]
    n = len(fin)
    means = [math.fsum(c) / n for c in cols]
    d = [[v - m for v in c] for c, m in zip(cols, means, strict=True)]
    pairs = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]
    s = [math.fsum(a * b for a, b in zip(d[i], d[j], strict=True)) for i, j in pairs]
    return np.array([n, *means, *s, len(L) - n, 0.0])


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kopt_comoments_match_an_independent_computation(dtype):
    """Across sub-blocks (SUB = 1024), with -inf samples (counted apart) and a block of them."""
    L = (0.8 * np.random.default_rng(11).standard_normal(3 * _fast.SUB + 17)).astype(dtype)
    L[[5, 2000]] = -np.inf
    L[_fast.SUB : _fast.SUB + 40] = 3e-9
    L[2 * _fast.SUB : 3 * _fast.SUB] = np.where(np.arange(_fast.SUB) % 2, -np.inf, 1.5)
    got = _fast.kopt_comoments(L)
    want = _ref_comoments(L)
    assert got[0] == want[0] and got[10] == want[10] and got[11] == 0.0
    np.testing.assert_allclose(got[1:10], want[1:10], rtol=1e-11, atol=1e-12)


@needs_numba
def test_kopt_comoments_flag_what_they_cannot_hold():
    """A NaN, or values whose squares overflow float64, are flagged (the engine then takes the
    NumPy path); all -inf gives n = 0."""
    assert _fast.kopt_comoments(np.array([0.1, np.nan, 0.2]))[11] == 1.0
    assert _fast.kopt_comoments(np.array([0.1, 700.0, 0.2]))[11] == 1.0
    r = _fast.kopt_comoments(np.full(5, -np.inf))
    assert r[0] == 0.0 and r[10] == 5.0 and r[11] == 0.0


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_estimate_k_opt_with_and_without_the_kernel(dtype):
    """The compiled co-moments and the NumPy path give the same k_opt (flat, with a -inf sample,
    and per row), and the same error for a NaN."""
    from klest._stream import KERNEL_CHUNK

    L = (0.6 * np.random.default_rng(4).standard_normal(KERNEL_CHUNK + 5000)).astype(dtype)
    L[77] = -np.inf
    M = L[: 6 * 5000].reshape(6, 5000)
    for name in ("k_opt", "k_opt_crossfit"):
        fast = klest.estimate(log_ratio=L[78:], estimator=name)
        fast_rows = klest.estimate(log_ratio=M[:, 100:], estimator=name, axis=1)
        fast_inf = klest.estimate(log_ratio=L, estimator=name)
        with klest.options(fast=False):
            slow = klest.estimate(log_ratio=L[78:], estimator=name)
            slow_rows = klest.estimate(log_ratio=M[:, 100:], estimator=name, axis=1)
        assert fast.mean == pytest.approx(slow.mean, rel=1e-11)
        assert fast.std == pytest.approx(slow.std, rel=1e-9)
        np.testing.assert_allclose(
            np.asarray(fast_rows.mean), np.asarray(slow_rows.mean), rtol=1e-11
        )
        assert fast_inf.mean == np.inf
    bad = L.copy()
    bad[3] = np.nan
    with pytest.raises(klest.KlestError):
        klest.estimate(log_ratio=bad, estimator="k_opt")


# ---------------------------------------------------------------------- column reductions
@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["k1", "k2", "k3", "forward_k1", "forward_k3"])
def test_axis0_column_kernel_matches_numpy_per_column(name, dtype, monkeypatch):
    """estimate(axis=0) on a 2-D array with contiguous rows reduces the columns in place
    (kernel.columns: no transpose); per column, mean and std agree with NumPy's on the float64
    values to 1e-12 (of the mean |value|) and 1e-10, for shapes that cut the tiles unevenly
    and for strided views."""
    from klest import _stream

    calls = []
    real = _stream._column_reduce
    monkeypatch.setattr(_stream, "_column_reduce", lambda *a: calls.append(a[2].shape) or real(*a))
    rng = np.random.default_rng(5)
    base = (0.8 * rng.standard_normal((301, 2 * _stream.COLUMN_GROUP + 77)) - 0.3).astype(dtype)
    for X in (base, base[:13, :300], base[::3, 5:1000:2], base[:2]):
        with klest.options(fast=True):
            got = klest.estimate(log_ratio=X, estimator=name, axis=0)
        vals = _numpy_values(name, X.astype(np.float64))
        assert got.n.tolist() == [X.shape[0]] * X.shape[1]
        # rounding of a sum: relative to the mean, or to the values' size where they cancel
        scale = np.abs(vals).mean(axis=0)
        assert np.all(np.abs(got.mean - vals.mean(axis=0)) <= 1e-12 * scale)
        np.testing.assert_allclose(got.std, vals.std(axis=0, ddof=1), rtol=1e-10, atol=0)
    # the strided view's rows are not contiguous: that one goes through the rows path
    assert len(calls) == 3 and calls[0] == base.shape


@needs_numba
def test_axis0_column_kernel_non_finite_columns_follow_the_rule():
    """A column whose values overflow (k3 at L = 800) or hold NaN (validation off) gets what
    the 1-D rule gives, the other columns are untouched, and NaN input is still refused."""
    L = np.random.default_rng(6).normal(size=(500, 700))
    L[321, 7] = 800.0  # k3 = +inf there
    L[4, 650] = -np.inf  # k3 = +inf, forward_k3 = 1
    L[99, 300] = np.nan
    with klest.options(fast=True, validate=False):
        got = klest.estimate(log_ratio=L, estimator="k3", axis=0)
        fk3 = klest.estimate(log_ratio=L, estimator="forward_k3", axis=0)
    with klest.options(fast=False, validate=False):
        ref = klest.estimate(log_ratio=L, estimator="k3", axis=0)
    assert got.mean[7] == np.inf and got.mean[650] == np.inf and np.isnan(got.mean[300])
    np.testing.assert_array_equal(np.isnan(got.std), np.isnan(ref.std))
    np.testing.assert_array_equal(np.isinf(got.mean), np.isinf(ref.mean))
    ok = np.isfinite(ref.mean)
    np.testing.assert_allclose(got.mean[ok], ref.mean[ok], rtol=1e-12)
    assert np.isfinite(fk3.mean[650]) and np.isnan(fk3.mean[300])
    with klest.options(fast=True), pytest.raises(klest.KlestError, match="NaN"):
        klest.estimate(log_ratio=L, estimator="k3", axis=0)
    # review: a column whose first band overflows float64 moments: std +inf as in 1-D, not NaN
    X = np.zeros((10, 4))
    X[3, 0] = 400.0  # k3 = e^400: the tile's mean is finite, its square is not
    for fast in (True, False):
        with klest.options(fast=fast):
            r = klest.estimate(log_ratio=X, estimator="k3", axis=0)
        assert r.std[0] == np.inf and np.isfinite(r.mean[0]), fast


@needs_numba
def test_the_engine_chooses_kernels_and_the_table_stays_data():
    """The compiled kernel of a record is the engine's choice (``_stream.kernel_for``): by the
    record's name for a record computing the built-in's values, every time, for copies too;
    never for a record that only borrows a built-in's name; and nothing is written into the
    table (the registry's record is the same object, with the same fields, before and after)."""
    import dataclasses

    from klest import _fast, _stream

    before = klest.get_estimator("k3")
    fields = dataclasses.astuple(before)
    with klest.options(fast=True):
        for rec in (before, dataclasses.replace(before, description="a copy")):
            for _ in range(3):
                kernel = _stream.kernel_for(rec)
                assert kernel is _fast.KERNELS["k3"] and kernel not in _stream.NUMPY_KERNELS
        impostor = klest.Estimator("k3", "reverse_kl", lambda xp, L: -L)
        assert _stream.kernel_for(impostor) is None
        L = np.array([-1.0, 0.5, 2.0])
        got = klest.estimate(log_ratio=L, estimator=impostor)
        assert got.mean == pytest.approx(-L.mean(), rel=1e-15)  # its own values, not k3's
    with klest.options(fast=False):  # k3's values are a NumPy primitive: its NumPy kernel
        assert _stream.kernel_for(before) in _stream.NUMPY_KERNELS
    assert klest.get_estimator("k3") is before and dataclasses.astuple(before) == fields


def test_numba_is_not_loaded_when_the_kernels_are_off():
    """Review: full_kl on float32 CPU logits and k_opt under fast=False (and small jobs under
    "auto") never import numba."""
    code = """
        import json, sys
        import numpy as np
        import klest
        L = np.random.default_rng(0).standard_normal(5000)
        seen = []
        with klest.options(fast=False):
            klest.estimate(log_ratio=L, estimator="k_opt")
            klest.estimate(log_ratio=L.astype(np.float32))
            try:
                import torch
                from klest.logits import full_kl
                full_kl(torch.randn(2, 50), torch.randn(2, 50))
            except ImportError:
                pass
        seen.append("numba" in sys.modules)
        klest.estimate(log_ratio=L, estimator="k_opt")  # "auto", small
        seen.append("numba" in sys.modules)
        print(json.dumps(seen))
        """
    assert _run(code, {"KLEST_FAST": ""}) == [False, False]
