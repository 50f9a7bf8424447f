"""The spec parser: valid specs and every kind of bad input, with the caret position."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klest import KlestError
from klest.lab import distributions as D
from klest.lab.specs import MAX_DEPTH, MAX_LENGTH, SpecError, parse


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal(0.1, 1)", D.Normal(0.1, 1.0)),
        ("normal()", D.Normal(0.0, 1.0)),
        ("normal(scale=2, loc=-1)", D.Normal(-1.0, 2.0)),
        ("gaussian(1e-1, 1.5E0)", D.Normal(0.1, 1.5)),
        ("  normal ( 0 ,\t2 )  ", D.Normal(0.0, 2.0)),
        ("student_t(3)", D.StudentT(3.0, 0.0, 1.0)),
        ("t(df=5, scale=2)", D.StudentT(5.0, 0.0, 2.0)),
        ("laplace(1, 2)", D.Laplace(1.0, 2.0)),
        ("logistic(scale=.5)", D.Logistic(0.0, 0.5)),
        ("exponential(2)", D.Exponential(2.0)),
        ("gamma(2, rate=3)", D.Gamma(2.0, 3.0)),
        ("gamma(concentration=2)", D.Gamma(2.0, 1.0)),
        ("beta(2, 5)", D.Beta(2.0, 5.0)),
        ("uniform(-1, 1)", D.Uniform(-1.0, 1.0)),
        ("categorical([0.2, 0.3, 0.5])", D.Categorical((0.2, 0.3, 0.5))),
        ("poisson(rate=4)", D.Poisson(4.0)),
        ("mvnormal([0, 1])", D.MultivariateNormal((0.0, 1.0), ((1.0, 0.0), (0.0, 1.0)))),
        (
            "mvn(loc=[0, 0], cov=[[2, 0.5], [0.5, 1]])",
            D.MultivariateNormal((0.0, 0.0), ((2.0, 0.5), (0.5, 1.0))),
        ),
    ],
)
def test_valid_specs(text: str, expected: D.Distribution) -> None:
    assert parse(text) == expected


def test_mixture_and_round_trip() -> None:
    d = parse("mixture([0.25, 0.75], [normal(-1, 1), student_t(df=3)])")
    assert isinstance(d, D.Mixture)
    assert d.weights == (0.25, 0.75)
    assert d.components == (D.Normal(-1.0, 1.0), D.StudentT(3.0, 0.0, 1.0))
    assert parse(d.spec) == d  # the canonical spec parses back to the same distribution


def test_variables_bind_names() -> None:
    assert parse("normal(mu, 1)", variables={"mu": 0.5}) == D.Normal(0.5, 1.0)


def _err(text: str, **kw: object) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse(text, **kw)  # type: ignore[arg-type]
    err = info.value
    assert isinstance(err, KlestError)
    lines = str(err).split("\n")
    # the last line is a caret under the offending character of the echoed input
    assert lines[-1].rstrip().endswith("^")
    return err


@pytest.mark.parametrize(
    ("text", "position", "words"),
    [
        # unknown name
        ("norml(0, 1)", 0, "unknown distribution 'norml'"),
        ("mixture([1], [nromal(0, 1)])", 14, "unknown distribution 'nromal'"),
        ("normal(mu, 1)", 7, "unknown name 'mu'"),
        ("normal(0, 1, extra=2)", 13, "no parameter 'extra'"),
        # wrong arity
        ("normal(1, 2, 3)", 13, "at most 2 arguments"),
        ("beta(2)", 6, "needs parameter 'b'"),
        ("student_t()", 10, "needs parameter 'df'"),
        ("normal(loc=1, 2)", 14, "positional argument after a keyword"),
        ("normal(loc=1, loc=2)", 14, "given twice"),
        # negative or zero scale and other parameter constraints
        ("normal(0, -1)", 10, "scale must be > 0"),
        ("normal(0, 0)", 10, "scale must be > 0"),
        ("student_t(-3)", 10, "df must be > 0"),
        ("poisson(rate=-1)", 13, "rate must be > 0"),
        ("uniform(1, 0)", 11, "low < high"),
        ("mvnormal([0, 0], [[1, 2], [2, 1]])", 17, "positive definite"),
        ("mvnormal([0, 0], [[1, 0]])", 17, "2×2"),
        # probabilities that do not sum to 1
        ("categorical([0.2, 0.3])", 12, "sum to 1"),
        ("categorical([1.2, -0.2])", 18, "must be >= 0"),
        ("mixture([0.5, 0.6], [normal(), normal(1)])", 8, "sum to 1"),
        ("mixture([0.5, 0.5], [normal()])", 20, "2 weights but 1 components"),
        ("mixture([0.5, 0.5], [normal(), poisson(1)])", 31, "discrete or all continuous"),
        # unbalanced brackets
        ("normal(0, 1", 6, "unbalanced '('"),
        ("normal(0, 1))", 12, "unbalanced ')'"),
        ("categorical([0.5, 0.5)", 21, "expected ',' or ']'"),
        ("categorical([0.5, 0.5", 12, "unbalanced '['"),
        ("normal 0, 1)", 7, "expected '('"),
        # other junk
        ("", 0, "empty spec"),
        ("normal(0; 1)", 8, "unexpected character ';'"),
        ("normal(0, 1) normal(1, 1)", 13, "after the end"),
        ("normal(1e, 1)", 8, "malformed exponent"),
        ("normal(0x10, 1)", 8, "after a number"),
        ("__import__('os')", 11, "unexpected character"),
        ("normal(0, 1e999)", 10, "out of range"),
        ("normal(0, [1])", 10, "must be a number"),
        # digits other than ASCII 0-9 ('٣' would read as 3, '²' would crash float())
        ("normal(0, ٣)", 10, "unexpected character '٣'"),
        ("normal(0, 1²)", 11, "unexpected character '²'"),
        # numbers whose densities would overflow or underflow
        ("normal(1e300, 1)", 7, "out of range"),
        ("normal(0, 1e-300)", 10, "too small"),
        ("student_t(1e308)", 10, "out of range"),
        ("poisson(1e300)", 8, "out of range"),
        ("poisson(2e6)", 8, "too large"),
        ("mvnormal([0], [[1e300]])", 16, "out of range"),
    ],
)
def test_bad_input_points_at_the_offending_character(text: str, position: int, words: str) -> None:
    err = _err(text)
    assert words in err.reason
    assert err.position == position
    caret_line = str(err).split("\n")[-1]
    assert caret_line.index("^") - 2 == position  # two spaces of indent; short inputs unshifted


def test_absurdly_long_input_is_refused_before_parsing() -> None:
    err = _err("normal(" + "1" * (MAX_LENGTH + 10) + ")")
    assert f"limit is {MAX_LENGTH}" in err.reason


def test_deep_nesting_is_refused() -> None:
    text = "mixture([1], [" * (MAX_DEPTH + 2) + "normal()" + "])" * (MAX_DEPTH + 2)
    err = _err(text)
    assert "nested deeper" in err.reason


def test_non_string_spec() -> None:
    with pytest.raises(KlestError):
        parse(3.0)  # type: ignore[arg-type]


# ------------------------------------------------ echoes are exact and parse back (issue 7 §2)
def test_echo_of_nearly_equal_probabilities_parses_back() -> None:
    d = parse("categorical([0.3333333, 0.3333333, 0.3333334])")
    assert d.spec == "categorical([0.3333333, 0.3333333, 0.3333334])"
    assert parse(d.spec) == d


_finite = st.floats(min_value=-1e100, max_value=1e100, allow_nan=False, allow_infinity=False)
_positive = st.floats(min_value=1e-100, max_value=1e100, allow_nan=False, allow_infinity=False)


@st.composite
def _probs(draw: st.DrawFn) -> list[float]:
    raw = draw(st.lists(st.floats(min_value=1e-6, max_value=1.0), min_size=1, max_size=5))
    total = math.fsum(raw)
    probs = [x / total for x in raw]
    probs[-1] = max(0.0, 1.0 - math.fsum(probs[:-1]))
    return probs


def _num(v: float) -> str:
    return repr(v)


_FAMILIES = (
    *("normal", "student_t", "laplace", "logistic", "exponential", "gamma", "beta"),
    *("uniform", "categorical", "poisson", "mixture"),
)


@st.composite
def _spec(draw: st.DrawFn) -> str:
    family = draw(st.sampled_from(_FAMILIES))
    if family in ("normal", "laplace", "logistic"):
        return f"{family}({_num(draw(_finite))}, {_num(draw(_positive))})"
    if family == "student_t":
        return f"student_t({_num(draw(_positive))}, {_num(draw(_finite))}, {_num(draw(_positive))})"
    if family == "exponential":
        return f"exponential({_num(draw(_positive))})"
    if family in ("gamma", "beta"):
        return f"{family}({_num(draw(_positive))}, {_num(draw(_positive))})"
    if family == "uniform":
        lo, hi = sorted(draw(st.lists(_finite, min_size=2, max_size=2, unique=True)))
        return f"uniform({_num(lo)}, {_num(hi)})"
    if family == "categorical":
        return "categorical([" + ", ".join(_num(p) for p in draw(_probs())) + "])"
    if family == "poisson":
        return f"poisson({_num(draw(st.floats(min_value=1e-100, max_value=1e6)))})"
    weights = draw(_probs())
    comps = [f"normal({_num(draw(_finite))}, {_num(draw(_positive))})" for _ in weights]
    return "mixture([" + ", ".join(map(_num, weights)) + "], [" + ", ".join(comps) + "])"


@settings(max_examples=300, deadline=None)
@given(_spec())
def test_echo_round_trips(text: str) -> None:
    """parse(echo(spec)) == spec: the echo holds every digit (repr) and parses back."""
    d = parse(text)
    again = parse(d.spec)
    assert again == d
    assert again.spec == d.spec
