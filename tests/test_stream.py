"""The streaming engine behind estimate: every estimator, every axis (int or tuple), masks
(``mask=`` and ``numpy.ma``), memory that does not grow with n, thread-independent results, the
compiled kernels agreeing with the NumPy path, and the walk over an array's pieces."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

import klest
from klest import _fast, _stream

RNG = np.random.default_rng(21)


def _direct(values: np.ndarray, ddof: int = 1) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64).ravel()
    return float(v.mean()), float(v.std(ddof=ddof))


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (1, 1), (4, 1, 6)])
@pytest.mark.parametrize("budget", [1, 2, 5, 12, 1000])
def test_pieces_cover_the_array_in_order(shape, budget):
    a = np.arange(math.prod(shape)).reshape(shape)
    seen = []
    for start, idx in _stream.pieces(shape, budget):
        piece = a[idx].ravel()
        assert piece.size <= max(budget, 1) or piece.size == 1
        assert piece[0] == start
        seen.append(piece)
    np.testing.assert_array_equal(np.concatenate(seen), a.ravel())


@pytest.mark.parametrize("estimator", ["k1", "k3", "forward_k3", "fdiv:chi2"])
@pytest.mark.parametrize("axis", [(0, 2), (2, 0), (1,), (-1, 0), (0, 1, 2)])
def test_tuple_axes_equal_the_moved_and_reshaped_reduction(estimator, axis):
    L = RNG.normal(0.0, 0.7, size=(4, 5, 6))
    r = klest.estimate(log_ratio=L, estimator=estimator, axis=axis)
    axes = sorted(a % 3 for a in axis)
    kept = [a for a in range(3) if a not in axes]
    moved = np.transpose(L, [*kept, *axes]).reshape(*[L.shape[a] for a in kept], -1)
    values = klest.get_estimator(estimator).values(np, moved)  # the table's own formula
    np.testing.assert_allclose(r.mean, values.mean(axis=-1), rtol=1e-13)
    np.testing.assert_allclose(r.std, values.std(axis=-1, ddof=1), rtol=1e-12)
    assert np.all(r.n == moved.shape[-1])


def test_k_opt_over_tuple_axes_equals_k_opt_on_the_reshaped_rows():
    L = RNG.normal(0.0, 0.7, size=(4, 5, 6))
    r = klest.estimate(log_ratio=L, estimator="k_opt", axis=(0, 2))
    rows = np.transpose(L, [1, 0, 2]).reshape(5, -1)
    values = klest.k_opt(log_ratio=rows, axis=1)
    np.testing.assert_allclose(r.mean, values.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(r.std, values.std(axis=1, ddof=1), rtol=1e-10)


@pytest.mark.parametrize("bad", [1.5, "0", (0, 0), (), True, [0]])
def test_bad_axis_is_a_klest_error(bad):
    with pytest.raises(klest.KlestError, match="axis"):
        klest.estimate(log_ratio=np.zeros((3, 4)), axis=bad)
    with pytest.raises(klest.KlestError, match="out of range"):
        klest.estimate(log_ratio=np.zeros((3, 4)), axis=(0, 2))


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_streamed_k_opt_equals_the_core_k_opt(cross, axis):
    L = RNG.normal(-0.1, 0.6, size=(40, 700))
    mask = RNG.random(L.shape) < 0.8
    name = "k_opt_crossfit" if cross else "k_opt"
    r = klest.estimate(log_ratio=L, estimator=name, axis=axis, mask=mask)
    values = klest.k_opt(log_ratio=L, axis=axis, mask=mask, cross_fit=cross)
    if axis is None:
        mean, std = _direct(values[mask])
        assert r.mean == pytest.approx(mean, rel=1e-11)
        assert r.std == pytest.approx(std, rel=1e-9)
        return
    moved = np.moveaxis(values, axis, -1)
    m = np.moveaxis(mask, axis, -1)
    for i in range(moved.shape[0]):
        mean, std = _direct(moved[i][m[i]])
        assert r.mean[i] == pytest.approx(mean, rel=1e-11)
        assert r.std[i] == pytest.approx(std, rel=1e-9)


@pytest.mark.parametrize("shape_axis", [((3, 150_000), 1), ((150_000, 3), 0), ((2, 70_000, 2), 1)])
def test_long_rows_are_merged_across_chunks(shape_axis):
    shape, axis = shape_axis
    L = RNG.normal(0.2, 0.5, size=shape).astype(np.float32)
    mask = RNG.random(shape) < 0.9
    for fast in (True, False):
        with klest.options(fast=fast):
            r = klest.estimate(log_ratio=L, estimator="k3", axis=axis, mask=mask)
        values = np.where(mask, np.expm1(L.astype(np.float64)) - L.astype(np.float64), 0.0)
        n = mask.sum(axis=axis)
        mean = values.sum(axis=axis) / n
        d = np.where(mask, values - np.expand_dims(mean, axis), 0.0)
        std = np.sqrt((d * d).sum(axis=axis) / (n - 1))
        np.testing.assert_allclose(r.mean, mean, rtol=1e-11)
        np.testing.assert_allclose(r.std, std, rtol=1e-9)
        np.testing.assert_array_equal(r.n, n)


def test_numpy_masked_arrays_are_honoured_and_combined_with_mask():
    L = RNG.normal(0.0, 0.5, size=(6, 50))
    data = L.copy()
    hidden = RNG.random(L.shape) < 0.2
    data[hidden] = np.nan  # masked entries are not data: never used, never validated
    ma = np.ma.masked_array(data, mask=hidden)
    keep = RNG.random(L.shape) < 0.7
    r = klest.estimate(log_ratio=ma, estimator="k1", mask=keep)
    both = keep & ~hidden
    mean, std = _direct(-L[both])
    assert r.n == int(both.sum())
    assert r.mean == pytest.approx(mean, rel=1e-13)
    assert r.std == pytest.approx(std, rel=1e-12)
    rows = klest.estimate(log_ratio=ma, estimator="k1", axis=1)
    for i in range(L.shape[0]):
        assert rows.mean[i] == pytest.approx(-L[i][~hidden[i]].mean(), rel=1e-13)
    pair = klest.estimate(np.ma.masked_array(-data, mask=hidden), np.zeros(L.shape), "k3")
    assert pair.n == int((~hidden).sum())
    assert pair.mean == pytest.approx(np.mean(np.expm1(L[~hidden]) - L[~hidden]), rel=1e-12)
    with pytest.raises(klest.KlestError, match="NaN"):  # unmasked NaN is still refused
        klest.estimate(log_ratio=np.ma.masked_array(data, mask=False))


def test_long_double_is_computed_in_float64():
    L = RNG.normal(0.0, 0.3, size=1000)
    with klest.options(fast=False):  # the same NumPy path as float64 input: the same bits
        got = klest.estimate(log_ratio=L.astype(np.longdouble), estimator="k3")
        ref = klest.estimate(log_ratio=L, estimator="k3")
    assert got == ref
    fast = klest.estimate(log_ratio=L.astype(np.longdouble), estimator="k3")
    assert fast.mean == pytest.approx(float(ref.mean), rel=1e-13)
    pair = klest.estimate(np.zeros(1000, np.longdouble), L.astype(np.longdouble), "k3")
    assert pair.mean == pytest.approx(float(ref.mean), rel=1e-15)


@pytest.mark.parametrize("estimator", ["k3", "k_opt", "fdiv:squared_hellinger"])
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_bit_identical_whatever_the_threads(estimator, axis):
    L = RNG.normal(0.1, 0.5, size=(300, 9_000)).astype(np.float32)
    out = []
    for threads in (1, 2, 3):
        with klest.options(threads=threads):
            out.append(klest.estimate(log_ratio=L, estimator=estimator, axis=axis))
    for r in out[1:]:
        for a, b in zip(r, out[0], strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "forward_k1", "forward_k3"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_kernels_agree_with_numpy(estimator, dtype):
    L = (RNG.normal(0.0, 1.0, size=400_000) * RNG.choice([1e-6, 0.1, 3.0], 400_000)).astype(dtype)
    with klest.options(fast=False):
        ref = klest.estimate(log_ratio=L, estimator=estimator)
    got = klest.estimate(log_ratio=L, estimator=estimator)
    assert got.n == ref.n
    assert got.mean == pytest.approx(float(ref.mean), rel=1e-12)
    assert got.std == pytest.approx(float(ref.std), rel=1e-10)


def test_non_finite_values_follow_one_rule():
    L = RNG.normal(size=200_000)
    L[123_456] = -np.inf  # log p = -inf: k1, k3 are +inf, forward_k3 is 1 there
    for fast in (True, False):
        with klest.options(fast=fast):
            k3 = klest.estimate(log_ratio=L, estimator="k3")
            fk3 = klest.estimate(log_ratio=L, estimator="forward_k3")
            rows = klest.estimate(log_ratio=L.reshape(2, -1), estimator="k1", axis=1)
        assert k3.mean == math.inf and k3.std == math.inf
        assert math.isfinite(fk3.mean)
        assert rows.mean[1] == math.inf and math.isfinite(rows.mean[0])
    with pytest.raises(klest.KlestError, match=r"\+inf"):
        klest.estimate(log_ratio=np.where(L == -np.inf, np.inf, L))


def _extra_memory(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
@pytest.mark.parametrize("fast", [True, False])
def test_extra_memory_does_not_grow_with_n(fast):
    big = RNG.standard_normal(4_000_000, dtype=np.float32)
    square = big.reshape(2000, 2000)
    neg, positive, zero = -big, big > 0, np.zeros(1, np.float32)
    # a few chunk buffers per thread (about 2.7 MiB for cross-fitted k_opt), whatever n: far
    # below the 16 MiB of input and the 32 MiB of one float64 copy of it
    limit = (1 << 20) + 2 * (3 << 20)
    with klest.options(fast=fast, threads=2):
        for call in (
            lambda: klest.estimate(log_ratio=big, estimator="k3"),
            lambda: klest.estimate(log_ratio=big, estimator="k_opt"),
            lambda: klest.estimate(log_ratio=big, estimator="k_opt_crossfit"),
            lambda: klest.estimate(log_ratio=square, estimator="k3", axis=0),
            lambda: klest.estimate(log_ratio=square, estimator="k_opt", axis=0),
            lambda: klest.estimate(log_ratio=square, estimator="fdiv:chi2", axis=(0, 1)),
            lambda: klest.estimate(neg, zero, "k3", mask=positive),
        ):
            call()  # the first call loads (or compiles) the kernels it needs: not per-call memory
            assert _extra_memory(call) <= limit


def test_k_opt_with_log_p_minus_infinity_is_infinite_and_float32_matches_float64():
    L = RNG.normal(0.0, 1.0, size=10_000)
    with_inf = L.copy()
    with_inf[17] = -np.inf
    r = klest.estimate(log_ratio=with_inf, estimator="k_opt")
    assert r.mean == math.inf and r.std == math.inf and r.n == L.size
    masked = klest.estimate(log_ratio=with_inf, estimator="k_opt", mask=np.arange(L.size) != 17)
    assert math.isfinite(masked.mean)
    # one float32 value beyond float32's exp overflow (88.7): computed in float64, as float64 data
    big = L.copy()
    big[3] = 89.0
    r32 = klest.estimate(log_ratio=big.astype(np.float32), estimator="k_opt")
    r64 = klest.estimate(log_ratio=big.astype(np.float32).astype(np.float64), estimator="k_opt")
    assert math.isfinite(r32.mean)
    assert r32.mean == pytest.approx(float(r64.mean), rel=1e-12)
    values = klest.k_opt(log_ratio=big.astype(np.float32).astype(np.float64))
    assert r64.mean == pytest.approx(values.mean(), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("estimator", ["k3", "forward_k3"])
def test_numpy_path_matches_mpmath(estimator, dtype):
    """Without compiled kernels, NumPy chunk kernels (float32 input: the float32-origin form)
    and the per-row path agree with 40-digit values of the same samples."""
    import mpmath

    from klest._stream import CHUNK

    rng = np.random.default_rng(5)
    L = (0.7 * rng.standard_normal(CHUNK + 999)).astype(dtype)
    L[[3, 4000, CHUNK + 7]] = np.array([0.0, 1e-9, -2e-12], dtype=dtype)  # the series region

    def ref(x: float) -> float:
        x = mpmath.mpf(x)
        if estimator == "k3":
            return float(mpmath.expm1(x) - x)
        return float(x * mpmath.exp(x) - mpmath.expm1(x))

    with mpmath.workdps(40):
        vals = np.array([ref(float(x)) for x in L])
    with klest.options(fast=False):
        flat = klest.estimate(log_ratio=L, estimator=estimator, ddof=0)
        rows = klest.estimate(log_ratio=L[: 8 * 4096].reshape(8, 4096), estimator=estimator, axis=1)
    assert flat.mean == pytest.approx(vals.mean(), rel=1e-12)
    assert flat.std == pytest.approx(vals.std(), rel=1e-10)
    want = vals[: 8 * 4096].reshape(8, 4096).mean(axis=1)
    np.testing.assert_allclose(np.asarray(rows.mean), want, rtol=1e-12)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("estimator", ["k3", "forward_k3", "k_opt"])
def test_equal_huge_values_have_zero_spread(estimator, fast):
    """L = 700 five times: every value is the same finite number near 1e304 (k3 = e^700 - 701),
    so the spread is 0. Neither the first merge (δ² overflowing, times a zero weight) nor the
    mean's rounding (an ulp of 1e304, squared) may turn it into NaN or inf."""
    import mpmath

    with mpmath.workdps(30):
        k3 = float(mpmath.exp(700) - 701)
        fk3 = float(700 * mpmath.exp(700) - mpmath.expm1(700))
    want = fk3 if estimator == "forward_k3" else k3
    with klest.options(fast=fast):
        r = klest.estimate(log_ratio=np.full(5, 700.0), estimator=estimator)
    assert float(r.mean) == pytest.approx(want, rel=1e-14)
    assert float(r.std) == 0.0


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_strided_rows_give_the_same_result_as_contiguous_ones(dtype, fast):
    """Reducing a leading axis (rows strided in memory, gathered in blocks of columns) gives
    bit for bit what the same numbers laid out contiguously give; the compiled kernels reduce
    such columns in place (kernel.columns, another summation order): to 1e-13 there."""
    A = (0.5 * np.random.default_rng(8).standard_normal((1500, 37))).astype(dtype)
    with klest.options(fast=fast):
        for est in ("k3", "k1", "k_opt"):
            strided = klest.estimate(log_ratio=A, estimator=est, axis=0)
            flat = klest.estimate(log_ratio=np.ascontiguousarray(A.T), estimator=est, axis=1)
            got = np.asarray(strided.mean), np.asarray(strided.std)
            want = np.asarray(flat.mean), np.asarray(flat.std)
            if fast and est != "k_opt" and _fast.available():
                np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)
            else:
                np.testing.assert_array_equal(got, want)
