"""The mismatch lab (klest.lab.mismatch_lab, ``klest gradients --mismatch D``): the bias of each
importance-weight correction, by exact enumeration.

Truth here is computed independently: the unbiased rows against the theory of importance
sampling (the whole-sequence weight, and per-decision weights for per-token values, are exact);
a tiny policy (vocabulary 2, length 2) enumerated in plain Python floats (softmax, the score
∇ log softmax = onehot − p, truncated weights) for the truncation bias; the sequence
KL(μ‖π) = D by the same plain enumeration. No value is copied from the code's output.
"""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")

from klest import KlestError  # noqa: E402
from klest.cli import main  # noqa: E402
from klest.lab import gradients as gl  # noqa: E402
from klest.lab import mismatch_lab as ml  # noqa: E402

EXACT = 1e-12


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rows(setting, names):
    corr = [c for c in ml.corrections(T=setting.model.T) if c.name in names]
    assert len(corr) == len(names)
    return {r["correction"]: r for r in ml.mismatch_table(setting, corr)}


# ------------------------------------------------------------------------ plain enumeration
def _softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    s = sum(e)
    return [x / s for x in e]


def _tiny(setting):
    """Plain-float enumeration of a V = 2, T = 2 model: per sequence y = (a, b), π(y), μ(y),
    R(y), the token ratios w_t, ℓ_t, and the scores ∇log π_t as dicts {(row, k): value}."""
    model = setting.model
    assert (model.V, model.T) == (2, 2)
    th, mu, ref = (x.tolist() for x in (model.theta, model.old, model.ref))
    p = [_softmax(r) for r in th]
    q = [_softmax(r) for r in mu]
    r_ = [_softmax(r) for r in ref]
    reward = model.reward.tolist()
    out = []
    for i, (a, b) in enumerate(model.seqs.tolist()):
        rows = (0, 1 + a)  # prefix rows: empty, then after y_1 = a
        toks = (a, b)
        score = []
        for row, tok in zip(rows, toks, strict=True):
            score.append({(row, k): (1.0 if k == tok else 0.0) - p[row][k] for k in range(2)})
        out.append(
            {
                "pi": p[0][a] * p[1 + a][b],
                "mu": q[0][a] * q[1 + a][b],
                "R": reward[i],
                "w": [p[row][t] / q[row][t] for row, t in zip(rows, toks, strict=True)],
                "ell": [
                    math.log(p[row][t]) - math.log(r_[row][t])
                    for row, t in zip(rows, toks, strict=True)
                ],
                "score": score,
            }
        )
    return out


def _vec(d, V=2, P=3):
    return torch.tensor(
        [d.get((row, k), 0.0) for row in range(P) for k in range(V)], dtype=torch.float64
    )


def _add(acc, score, c):
    for key, v in score.items():
        acc[key] = acc.get(key, 0.0) + c * v


# ------------------------------------------------------------------------------------ tests
def test_mismatch_is_the_sequence_kl_of_mu_from_pi() -> None:
    s = ml.mismatch_model(2, 2, mismatch=0.3, seed=1)
    kl = sum(y["mu"] * -sum(math.log(w) for w in y["w"]) for y in _tiny(s))
    assert kl == pytest.approx(0.3, rel=1e-10)
    assert s.scale > 0 and s.token_kl == pytest.approx(0.15, rel=1e-10)  # fixed length 2
    assert ml.mismatch_model(2, 2, mismatch=0.0, seed=1).scale == 0.0


def test_unbiased_rows_are_exact() -> None:
    # ∏_t w_t is exact for both gradients; w_{1:t} is exact for per-token values (the KL term)
    # but not for a reward of the whole sequence (the continuation is μ's, not π's)
    s = ml.mismatch_model(mismatch=0.5)
    rows = _rows(s, ["sequence (product) × none", "prefix (per-decision) × none", "token × none"])
    seq = rows["sequence (product) × none"]
    pre = rows["prefix (per-decision) × none"]
    tok = rows["token × none"]
    assert seq["relative_error_policy_gradient"] < EXACT
    assert seq["relative_error_kl_gradient"] < EXACT
    assert pre["relative_error_kl_gradient"] < EXACT
    assert pre["relative_error_policy_gradient"] > 0.01
    assert tok["relative_error_kl_gradient"] > 0.01
    assert seq["cosine_policy_gradient"] == pytest.approx(1.0, abs=1e-12)
    # the KL term with per-decision weights is klest.rl.sequence_kl's own (k1, per_decision)
    W, _, _ = ml.correction_weights(s.model, ml.Correction("p", "klest", "prefix", "none"))
    _, _, m_kl, v_kl = ml.correction_gradients(s.model, W)
    opt = {o.name: o for o in gl.options()}["sequence_kl k1, per-decision weights"]
    mean, var = gl.exact_gradients(s.model, opt)
    assert torch.allclose(m_kl, mean, rtol=0, atol=1e-13)
    assert v_kl == pytest.approx(var, rel=1e-10)


def test_unbiased_with_variable_length() -> None:
    s = ml.mismatch_model(mismatch=0.4, eos=True, seed=3)
    row = _rows(s, ["sequence (product) × none"])["sequence (product) × none"]
    assert row["relative_error_policy_gradient"] < EXACT
    assert row["relative_error_kl_gradient"] < EXACT


@pytest.mark.parametrize(
    ("level", "mode"),
    [("sequence", "truncate"), ("token", "truncate"), ("prefix", "truncate"), ("prefix", "none")],
)
def test_truncation_bias_by_hand(level, mode) -> None:
    c = 1.2 if mode == "truncate" else math.inf
    s = ml.mismatch_model(2, 2, mismatch=0.5, seed=2)
    seqs = _tiny(s)
    exact_pg, exact_kl, got_pg, got_kl, bias = {}, {}, {}, {}, {}
    n_over = 0
    for y in seqs:
        w_seq = y["w"][0] * y["w"][1]
        raw = {
            "sequence": [w_seq, w_seq],
            "token": y["w"],
            "prefix": [y["w"][0], w_seq],  # w_{1:t}
        }[level]
        W = [min(w, c) for w in raw]
        n_over += sum(w > c for w in raw)
        ret = [W[0] * y["ell"][0] + W[1] * y["ell"][1], W[1] * y["ell"][1]]
        true_ret = [y["ell"][0] + y["ell"][1], y["ell"][1]]
        for t in range(2):
            _add(exact_pg, y["score"][t], y["pi"] * y["R"])
            _add(exact_kl, y["score"][t], y["pi"] * true_ret[t])
            _add(got_pg, y["score"][t], y["mu"] * W[t] * y["R"])
            _add(got_kl, y["score"][t], y["mu"] * ret[t])
            if level == "sequence":  # ∏w is exact: the bias is −E_μ[(∏w − c)₊ R ∇log π(y)]
                _add(bias, y["score"][t], -y["mu"] * max(w_seq - c, 0.0) * y["R"])
    assert n_over > 0 or mode == "none"  # the truncation is active
    corr = ml.Correction("t", "klest", level, mode, None, c if mode == "truncate" else None)
    W_lab, _, _ = ml.correction_weights(s.model, corr)
    m_pg, _, m_kl, _ = ml.correction_gradients(s.model, W_lab)
    assert torch.allclose(m_pg, _vec(got_pg), rtol=0, atol=1e-13)
    assert torch.allclose(m_kl, _vec(got_kl), rtol=0, atol=1e-13)
    g_pg, g_kl = _vec(exact_pg), _vec(exact_kl)
    assert torch.allclose(ml.policy_gradient(s.model), g_pg, rtol=0, atol=1e-13)
    if level == "sequence":
        assert torch.allclose(_vec(got_pg) - g_pg, _vec(bias), rtol=0, atol=1e-13)
    row = ml.mismatch_table(s, [corr], B=1)[0]
    rel = float((_vec(got_pg) - g_pg).norm() / g_pg.norm())
    assert rel > 1e-3
    assert row["relative_error_policy_gradient"] == pytest.approx(rel, rel=1e-9)
    rel_kl = float((_vec(got_kl) - g_kl).norm() / g_kl.norm())
    if (level, mode) == ("prefix", "none"):  # per-decision weights: exact for the KL term only
        assert rel_kl < 1e-13 and row["relative_error_kl_gradient"] < EXACT
    else:
        assert rel_kl > 1e-3
        assert row["relative_error_kl_gradient"] == pytest.approx(rel_kl, rel=1e-9)


def test_no_mismatch_no_error() -> None:
    # D = 0: μ = π, every weight 1, every correction (presets included) is the on-policy
    # gradient, unbiased, with ESS 1 and the same variance
    rows = ml.run_mismatch(0.0)
    assert len(rows) == len(ml.corrections())
    for r in rows:
        assert r["relative_error_policy_gradient"] < EXACT, r["correction"]
        assert r["relative_error_kl_gradient"] < EXACT, r["correction"]
        assert r["ess"] == pytest.approx(1.0, abs=1e-12)
        assert r["trace_variance_policy_gradient"] == pytest.approx(
            rows[0]["trace_variance_policy_gradient"], rel=1e-10
        )


def test_refusals() -> None:
    with pytest.raises(KlestError, match="mismatch"):
        ml.mismatch_model(mismatch=-0.1)
    with pytest.raises(KlestError, match="mismatch"):
        ml.mismatch_model(mismatch=math.nan)
    with pytest.raises(KlestError, match="more than this direction reaches"):
        ml.mismatch_model(mismatch=50.0)


def test_cli_json_has_the_table_rows(capsys) -> None:
    assert main(["gradients", "--mismatch", "0.3", "--no-presets", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert main(["gradients", "--mismatch", "0.3", "--no-presets", "--format", "markdown"]) == 0
    md = capsys.readouterr().out.splitlines()
    body = [line for line in md[2:] if line.startswith("| ")]
    assert [line.split(" | ")[0][2:] for line in body] == [r["correction"] for r in data]
    assert len(data) == len(ml.corrections(presets=False))
    for line, r in zip(body, data, strict=True):
        cells = line.strip("| ").split(" | ")
        assert cells[2] == ml._cell(
            "relative_error_policy_gradient", r["relative_error_policy_gradient"]
        )
        assert cells[-1] == ml._cell("ess", r["ess"])
    assert all(r["mismatch_kl"] == 0.3 for r in data)
    assert main(["gradients", "--mismatch", "-1"]) == 2
    assert main(["gradients", "--mismatch", "40"]) == 2


def test_cli_plot(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "bias.png"
    args = ["gradients", "--mismatch", "0.2", "--V", "2", "--T", "2", "--no-presets"]
    assert main([*args, "--plot", str(out)]) == 0
    assert out.stat().st_size > 1000
