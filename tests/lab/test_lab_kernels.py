"""The lab's compiled pass (klest._fast.quadratic_lab) and its moments that do not overflow
(klest.lab._scaled): against the single-purpose kernels, a 40-digit mpmath reference, the NumPy
path on the same draws, and closed forms.

References are independent computations: mpmath sums of the values, NumPy on the materialised
log-ratios, or algebra (k1 = -(A z² + C) on normal pairs, so its stdev is |A|·stdev(z²)).
"""

from __future__ import annotations

import math
import threading
import time

import mpmath
import numpy as np
import pytest

import klest
from klest import _config, _fast, _stream
from klest.lab import _scaled, engine
from klest.lab._scaled import Comoments, ScaledMoments
from klest.lab.experiments import REPRODUCE_ESTIMATORS

needs_numba = pytest.mark.skipif(_fast._nb is None, reason="numba (klest[fast]) not installed")
NAMES = ("k1", "k2", "k3", "forward_k1", "forward_k3")
REL = 1e-12  # the compiled values' bound is 5.7e-14 relative (tests/test_fast.py)


def _mp_moments(values: np.ndarray) -> tuple[mpmath.mpf, mpmath.mpf]:
    """Exact-enough mean and centred sum of squares of float64 values (40 digits)."""
    with mpmath.workdps(40):
        vals = [mpmath.mpf(float(v)) for v in values]
        mean = mpmath.fsum(vals) / len(vals)
        return mean, mpmath.fsum((v - mean) ** 2 for v in vals)


def test_fused_names_are_the_compiled_codes() -> None:
    assert set(_fast.CODES) == engine.FUSED_NAMES


# ------------------------------------------------------------------------ quadratic_lab
COEFS = np.array(
    [
        [0.0, -0.1, 0.005],  # p = N(0.1, 1): |L| < 1, no doubling
        [0.0, -1.0, 0.5],  # p = N(1, 1)
        [-0.3, 0.4, 0.1],  # unequal scales
        [-40.0, 2.0, 3.0],  # |L| > 128: the scalar forms
    ]
)


@needs_numba
def test_quadratic_lab_gives_the_single_purpose_kernels_numbers() -> None:
    x = np.random.default_rng(3).standard_normal(5000)
    mom, pairs = _fast.quadratic_lab(x, COEFS, NAMES, True)
    ref = _fast.quadratic_moments(x, COEFS, NAMES)
    np.testing.assert_allclose(mom, ref, rtol=REL, atol=0)
    for p, (A, B, C) in enumerate(COEFS):
        L = (x * A + B) * x + C
        co = _fast.kopt_comoments(L)
        assert co[11] == 0 and pairs[p, 11] == 0
        np.testing.assert_allclose(pairs[p, :11], co[:11], rtol=1e-11, atol=0)
        assert (pairs[p, 12], pairs[p, 13]) == (L.min(), L.max())


@needs_numba
def test_quadratic_lab_co_moments_against_mpmath() -> None:
    x = np.random.default_rng(5).standard_normal(1500)
    _, pairs = _fast.quadratic_lab(x, COEFS[1:3], ("k3",), True)
    for p, (A, B, C) in enumerate(COEFS[1:3]):
        L = (x * A + B) * x + C
        with mpmath.workdps(40):
            Lm = [mpmath.mpf(float(v)) for v in L]
            cols = [Lm, [mpmath.expm1(v) - v for v in Lm], [mpmath.expm1(v) for v in Lm]]
            means = [mpmath.fsum(c) / len(c) for c in cols]
            dev = [[v - m for v in c] for c, m in zip(cols, means, strict=True)]
            pairs_ab = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]
            S = [
                mpmath.fsum(a * b for a, b in zip(dev[i], dev[j], strict=True)) for i, j in pairs_ab
            ]
        for got, want in zip(pairs[p, 1:10], [*means, *S], strict=True):
            assert float(got) == pytest.approx(float(want), rel=1e-11, abs=1e-13)


@needs_numba
def test_quadratic_lab_state_carries_over_pieces() -> None:
    """Pieces that are whole sub-blocks give the bits of one call on everything."""
    x = np.random.default_rng(9).standard_normal(7 * _fast.SUB + 123)
    whole = _fast.quadratic_lab(x, COEFS, NAMES, True)
    state = _fast.lab_state(len(COEFS), len(NAMES))
    for a in range(0, x.size, 2 * _fast.SUB):
        parts = _fast.quadratic_lab(x[a : a + 2 * _fast.SUB], COEFS, NAMES, True, state)
    for w, p in zip(whole, parts, strict=True):
        np.testing.assert_array_equal(w, p)


@needs_numba
def test_quadratic_lab_flags_co_moments_beyond_float64() -> None:
    x = np.random.default_rng(1).standard_normal(3000)
    mom, pairs = _fast.quadratic_lab(x, np.array([[-5e159, 0.0, 184.0]]), ("k1",), True)
    assert pairs[0, 11] == 1.0  # S_LL ~ 1e323: NumPy's scaled co-moments take over
    assert math.isfinite(mom[0, 0, 0]) and mom[0, 0, 1] == math.inf  # the engine redoes these


# ------------------------------------------------------------------------ scaled moments
def _chunks(v: np.ndarray, cuts: list[int]) -> ScaledMoments:
    acc = ScaledMoments()
    for part in np.split(v, cuts):
        acc = acc.merge(_scaled.chunk(part.copy()))
    return acc


@pytest.mark.parametrize("scale", [1e-3, 1e155, 1e200, 1e300])
def test_scaled_moments_against_mpmath(scale: float) -> None:
    rng = np.random.default_rng(11)
    v = scale * (rng.standard_normal(4000) + 3.0)
    v[17] = -scale * 40.0  # one far value
    acc = _chunks(v, [1000, 1001, 2500])
    mean, m2 = _mp_moments(v)
    assert acc.mean == pytest.approx(float(mean), rel=1e-13)
    assert acc.std(1) == pytest.approx(float(mpmath.sqrt(m2 / (v.size - 1))), rel=1e-12)
    assert acc.n == v.size


def test_ordinary_values_merge_as_the_plain_formulas() -> None:
    """Where nothing is scaled the merge is Chan's formula of klest._stream, to the bit."""
    v = np.random.default_rng(2).standard_normal(3000) * 5.0 + 1.0
    parts = np.split(v, [700, 1900])
    acc, ref = ScaledMoments(), _stream.Partial()
    for part in parts:
        acc = acc.merge(_scaled.chunk(part.copy()))
        ref = ref.merge(_stream.chunk_moments(part.copy()))
    assert (acc.n, acc.mean, acc.m2, acc.e) == (ref.n, ref.mean, ref.m2, 0)


def test_stdev_is_infinite_only_beyond_float64() -> None:
    finite = _scaled.chunk(np.array([1e308, -1e308]))
    assert finite.std(1) == pytest.approx(math.sqrt(2) * 1e308, rel=1e-15)
    assert finite.total_m2 == math.inf  # 2e616 itself is not a float64
    assert _scaled.chunk(np.array([1.7e308, -1.7e308])).std(1) == math.inf  # 2.4e308
    merged = _scaled.chunk(np.array([1.5e308])).merge(_scaled.chunk(np.array([-1.5e308])))
    assert merged.mean == 0.0 and merged.std(1) == pytest.approx(1.5e308 * math.sqrt(2), rel=1e-15)


def test_non_finite_values_keep_the_stream_rules() -> None:
    assert _scaled.chunk(np.array([1.0, np.inf])).mean == math.inf
    assert _scaled.chunk(np.array([1.0, np.inf])).m2 == math.inf
    assert math.isnan(_scaled.chunk(np.array([np.inf, -np.inf])).mean)
    assert math.isnan(_scaled.chunk(np.array([1.0, np.nan])).mean)


def _mp_kopt(L: np.ndarray) -> tuple[float, float, float]:
    """λ̂ = Cov(L, r)/Var(r) and the mean and stdev of -L + λ̂(r - 1), in 40 digits."""
    with mpmath.workdps(40):
        Lm = [mpmath.mpf(float(v)) for v in L]
        e = [mpmath.expm1(v) for v in Lm]
        mL, me = mpmath.fsum(Lm) / len(Lm), mpmath.fsum(e) / len(e)
        s_le = mpmath.fsum((a - mL) * (b - me) for a, b in zip(Lm, e, strict=True))
        s_ee = mpmath.fsum((b - me) ** 2 for b in e)
        lam = s_le / s_ee
        vals = [-a + lam * b for a, b in zip(Lm, e, strict=True)]
        mv = mpmath.fsum(vals) / len(vals)
        m2 = mpmath.fsum((v - mv) ** 2 for v in vals)
        return float(lam), float(mv), float(mpmath.sqrt(m2 / (len(vals) - 1)))


def _np_k3(L: np.ndarray) -> np.ndarray:
    from klest._numerics import numpy_values

    flat = L.reshape(-1)
    return numpy_values("expm1mx", flat, np.empty(flat.size)).reshape(L.shape)


@pytest.mark.parametrize("far", [-3.0, -1e160, -1e300])
def test_scaled_kopt_against_mpmath(far: float) -> None:
    """k_opt's λ̂, mean and stdev from co-moments merged across chunks, with a few log-ratios so
    far below 0 that S_LL is beyond float64 (while e = r - 1 stays within [-1, e^2])."""
    rng = np.random.default_rng(4)
    L = rng.standard_normal(3000) * 0.7
    L[::97] = far * (1.0 + rng.random(L[::97].size))
    co = Comoments()
    for part in np.split(L, [1000, 2200]):
        co = co.merge(_scaled.co_chunk(part.copy(), _np_k3))
    lam, mean, sd = _mp_kopt(L)
    got = _scaled.kopt_values(co, co.lam)
    assert co.lam == pytest.approx(lam, rel=1e-11)
    assert got.mean == pytest.approx(mean, rel=1e-11)
    assert got.std(1) == pytest.approx(sd, rel=1e-11)


def test_scaled_kopt_equals_the_stream_formula_on_ordinary_values() -> None:
    L = np.random.default_rng(8).standard_normal(5000) * 0.9 - 0.2
    co = _scaled.co_chunk(L.copy(), _np_k3)
    (ref,) = _stream.kopt_moments(L.reshape(1, -1).copy(), None, _np_k3)
    assert co.lam == pytest.approx(ref.lam, rel=1e-14)
    want = _stream.kopt_values(ref, ref.lam)
    got = _scaled.kopt_values(co, co.lam)
    assert got.mean == pytest.approx(want.mean, rel=1e-14)
    assert got.total_m2 == pytest.approx(want.m2, rel=1e-12)


# --------------------------------------------------------------------------- the engine
def _block_draws(seed: int, sizes: list[int]) -> np.ndarray:
    return np.concatenate(
        [
            np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, i))).standard_normal(k)
            for i, k in enumerate(sizes)
        ]
    )


@pytest.mark.parametrize("fast", [False, pytest.param(True, marks=needs_numba)])
def test_huge_log_ratios_give_finite_stdevs(fast: bool) -> None:
    """q = N(0, 1), p = N(0, 1e-80): L = A z² + C with A = 1/2 - 1e160/2, so k1 = -L has the
    stdev |A|·stdev(z²) (about 7e159: √2|A| in the limit), far below float64's limit although
    its squares are not; the run must say so (reliable, finite), not +inf or NaN."""
    block, n = 1 << 16, 3 * (1 << 16) + 5
    names = ["k1", "k3", "k_opt"]
    with klest.options(fast=fast):
        res = engine.run("normal(0, 1)", "normal(0, 1e-80)", names, n=n, seed=3, block=block)
    z = _block_draws(3, [block, block, block, 5])
    A = 0.5 - 0.5e160
    C = math.log(1e80)
    sd = abs(A) * float(np.std(z * z, ddof=1))
    for name in names:
        r = res[name]
        assert r.mean == pytest.approx(-(A * float(np.mean(z * z)) + C), rel=1e-12), name
        assert r.std == pytest.approx(sd, rel=1e-9), name
        assert r.stderr == pytest.approx(sd / math.sqrt(n), rel=1e-9), name
        assert r.reliable, name
    assert res["k1"].std == pytest.approx(math.sqrt(2) * abs(A), rel=0.03)  # closed form, 4 SE
    assert res["k_opt"].lam == 1.0  # r = 0 on every draw: Var(r) = 0, λ̂ = 1 by the rule


@needs_numba
def test_compiled_k_opt_agrees_with_numpy_off_the_normal_pair() -> None:
    names = ["k1", "k3", "forward_k3", "k_opt"]
    kw = dict(n=200_000, seed=6, block=1 << 16)
    with klest.options(fast=True):
        fast = engine.run("gamma(2, 1)", "exponential(0.8)", names, **kw)  # type: ignore[arg-type]
    with klest.options(fast=False):
        slow = engine.run("gamma(2, 1)", "exponential(0.8)", names, **kw)  # type: ignore[arg-type]
    for name in names:
        assert fast[name].mean == pytest.approx(slow[name].mean, rel=1e-12), name
        assert fast[name].std == pytest.approx(slow[name].std, rel=1e-9), name
    assert fast["k_opt"].lam == pytest.approx(slow["k_opt"].lam, rel=1e-9)


@needs_numba
def test_results_do_not_depend_on_when_the_kernels_finish_loading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run that starts before the kernels are loaded draws its blocks ahead and reduces them
    once they are: the same bits as a run with the kernels already there."""
    args = ("normal(0, 1)", ["normal(0.3, 1)", "normal(1, 1.5)"], list(REPRODUCE_ESTIMATORS))
    kw = dict(n=3 * (1 << 16) + 77, seed=2, block=1 << 16, workers=2)
    with klest.options(fast=True):
        loaded = engine.run_many(*args, **kw)  # type: ignore[arg-type]
        event = threading.Event()
        monkeypatch.setattr(engine, "_LOADED", event)
        monkeypatch.setattr(engine, "_loader", [])

        def slow_load() -> None:
            time.sleep(0.3)
            event.set()

        monkeypatch.setattr(engine, "_load_kernels", slow_load)
        late = engine.run_many(*args, **kw)  # type: ignore[arg-type]
    assert late == loaded


def test_the_seed_experiment_at_its_default_size_stays_on_numpy() -> None:
    """Under fast="auto", klest reproduce at its default size (1e7 draws, 2 targets, five
    estimators) counts just under the work that pays for numba's load (a measured break-even,
    see engine.WORK_PER_DRAW), so it keeps the NumPy path and its 65 MiB; ten times the draws
    load the kernels."""
    per_draw = engine._work_per_draw(REPRODUCE_ESTIMATORS)
    assert 10**7 * 2 * per_draw < _config.AUTO_FAST_WORK
    assert 10**8 * 2 * per_draw >= _config.AUTO_FAST_WORK
