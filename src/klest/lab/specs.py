r"""The distribution spec language: ``normal(0.1, 1)``, ``student_t(df=3)``, ``mixture(...)``.

Grammar (whitespace is free between tokens)::

    spec   := call
    call   := NAME "(" [arg ("," arg)*] ")"
    arg    := [NAME "="] value
    value  := number | list | call | NAME        (a NAME value is a sweep variable)
    list   := "[" [value ("," value)*] "]"
    number := ["-" | "+"] digits ["." digits] [("e" | "E") ["-" | "+"] digits]

A hand-written tokenizer and recursive-descent parser read the text; the only names that mean
anything are the families in :data:`FAMILIES` (and, in a sweep, the bound variable). Nothing is
ever evaluated as Python. Every error is a :class:`SpecError` whose message ends with the input and
a caret under the offending character.

Families (positional order as listed; every parameter can also be given by keyword):

=================  ============================================  ================================
name (aliases)     parameters (default)                          constraint
=================  ============================================  ================================
normal (gaussian)  loc (0), scale (1)                            scale > 0
student_t (t)      df, loc (0), scale (1)                        df > 0, scale > 0
laplace            loc (0), scale (1)                            scale > 0
logistic           loc (0), scale (1)                            scale > 0
exponential        rate (1)                                      rate > 0
gamma              shape, rate (1)                               shape > 0, rate > 0
beta               a, b                                          a > 0, b > 0
uniform            low (0), high (1)                             low < high
categorical        probs ([p1, ..., pK])                         p >= 0, Σ p = 1
poisson            rate                                          0 < rate <= 1e6
mvnormal (mvn)     loc ([...]), cov ([[...], ...], identity)      cov symmetric positive definite
mixture            weights ([...]), components ([spec, ...])      weights >= 0, Σ = 1, same kind
=================  ============================================  ================================

Every number must satisfy |value| <= 1e100 and every positive parameter (scale, df, rate, shape,
a, b) must be >= 1e-100: beyond these the densities overflow or underflow.

>>> parse("normal(0.1, 1)")
normal(0.1, 1)
>>> parse("mixture([0.3, 0.7], [normal(-1, 1), student_t(df=3)])")
mixture([0.3, 0.7], [normal(-1, 1), student_t(3, 0, 1)])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from klest import KlestError

from . import distributions as D

__all__ = [
    "FAMILIES",
    "MAX_DEPTH",
    "MAX_LENGTH",
    "SpecError",
    "as_distribution",
    "parse",
    "variables_used",
]

MAX_LENGTH = 2000  # characters; longer input is refused before tokenizing
MAX_DEPTH = 8  # nesting of calls and lists
PROB_TOL = 1e-9  # |Σ p - 1| allowed for probabilities and mixture weights
MAX_ABS = 1e100  # |every number|: locations, bounds, covariance entries, parameters
MIN_POSITIVE = 1e-100  # the smallest scale, rate, df, shape or Beta parameter
MAX_POISSON_RATE = 1e6  # exact sums enumerate the support, about rate + 12√rate points


class SpecError(KlestError):
    """A spec that cannot be read; ``position`` is the 0-based index of the offending character."""

    def __init__(self, message: str, text: str, position: int) -> None:
        self.text = text
        self.position = position
        self.reason = message
        super().__init__(f"{message} (column {position + 1})\n{_pointer(text, position)}")


def _pointer(text: str, pos: int, width: int = 76) -> str:
    start = max(0, min(pos - width // 2, len(text) - width))
    shown = text[start : start + width]
    prefix = "..." if start > 0 else ""
    suffix = "..." if start + width < len(text) else ""
    caret = " " * (len(prefix) + pos - start) + "^"
    return f"  {prefix}{shown}{suffix}\n  {caret}"


# ------------------------------------------------------------------------------ tokenizer
@dataclass(frozen=True)
class Token:
    kind: str  # "num", "name", "(", ")", "[", "]", ",", "=", "end"
    text: str
    pos: int


_PUNCT = "()[],="
_DIGITS = "0123456789"  # ASCII only: str.isdigit() is also true of "²" and "٣"


def tokenize(text: str) -> list[Token]:
    """Split ``text`` into tokens; signs are part of numbers only when a digit or '.' follows."""
    if len(text) > MAX_LENGTH:
        raise SpecError(
            f"spec is {len(text)} characters long; the limit is {MAX_LENGTH}", text, MAX_LENGTH
        )
    out: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n":
            i += 1
        elif c in _PUNCT:
            out.append(Token(c, c, i))
            i += 1
        elif (
            c in _DIGITS
            or c == "."
            or (c in "+-" and i + 1 < n and (text[i + 1] in _DIGITS or text[i + 1] == "."))
        ):
            j = i + 1 if c in "+-" else i
            start_digits = j
            while j < n and text[j] in _DIGITS:
                j += 1
            if j < n and text[j] == ".":
                j += 1
                while j < n and text[j] in _DIGITS:
                    j += 1
            if j == start_digits or text[start_digits:j] == ".":
                raise SpecError("malformed number", text, i)
            if j < n and text[j] in "eE":
                k = j + 1
                if k < n and text[k] in "+-":
                    k += 1
                if k < n and text[k] in _DIGITS:
                    while k < n and text[k] in _DIGITS:
                        k += 1
                    j = k
                else:
                    raise SpecError("malformed exponent in number", text, j)
            if j < n and (text[j].isalpha() or text[j] == "_"):
                raise SpecError("unexpected character after a number", text, j)
            out.append(Token("num", text[i:j], i))
            i = j
        elif c.isascii() and (c.isalpha() or c == "_"):
            j = i
            while j < n and text[j].isascii() and (text[j].isalnum() or text[j] == "_"):
                j += 1
            out.append(Token("name", text[i:j], i))
            i = j
        else:
            raise SpecError(f"unexpected character {c!r}", text, i)
    out.append(Token("end", "", n))
    return out


# --------------------------------------------------------------------------------- parser
@dataclass
class Node:
    pos: int
    end: int


@dataclass
class Num(Node):
    value: float


@dataclass
class ListNode(Node):
    items: list[Node]


@dataclass
class Var(Node):
    name: str


@dataclass
class Arg:
    keyword: str | None
    keyword_pos: int
    value: Node


@dataclass
class Call(Node):
    name: str
    args: list[Arg]
    close: int  # position of ")"


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0
        self.open: list[Token] = []

    def peek(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        t = self.tokens[self.i]
        self.i += 1
        return t

    def fail(self, message: str, pos: int) -> SpecError:
        return SpecError(message, self.text, pos)

    def expect(self, kind: str, what: str) -> Token:
        t = self.peek()
        if t.kind != kind:
            if t.kind == "end" and self.open:
                o = self.open[-1]
                closer = ")" if o.kind == "(" else "]"
                raise self.fail(f"unbalanced {o.kind!r}: missing {closer!r}", o.pos)
            found = "end of input" if t.kind == "end" else repr(t.text)
            raise self.fail(f"expected {what}, found {found}", t.pos)
        return self.take()

    def spec(self) -> Call:
        t = self.peek()
        if t.kind == "end":
            raise self.fail("empty spec; expected a distribution such as normal(0, 1)", 0)
        if t.kind != "name":
            raise self.fail(f"expected a distribution name, found {t.text!r}", t.pos)
        node = self.call(depth=1)
        t = self.peek()
        if t.kind != "end":
            if t.kind in ")]":
                raise self.fail(f"unbalanced {t.text!r}: nothing to close", t.pos)
            raise self.fail(f"unexpected {t.text!r} after the end of the spec", t.pos)
        return node

    def call(self, depth: int) -> Call:
        if depth > MAX_DEPTH:
            raise self.fail(f"nested deeper than {MAX_DEPTH} levels", self.peek().pos)
        name = self.take()
        if self.peek().kind != "(":
            raise self.fail(
                f"expected '(' after the distribution name {name.text!r}", self.peek().pos
            )
        opener = self.take()
        self.open.append(opener)
        args: list[Arg] = []
        if self.peek().kind != ")":
            while True:
                args.append(self.arg(depth))
                if self.peek().kind == ",":
                    self.take()
                    continue
                break
        close = self.expect(")", "',' or ')'")
        self.open.pop()
        return Call(name.pos, close.pos + 1, name.text, args, close.pos)

    def arg(self, depth: int) -> Arg:
        t = self.peek()
        if t.kind == "name" and self.tokens[self.i + 1].kind == "=":
            self.take()
            self.take()
            return Arg(t.text, t.pos, self.value(depth))
        return Arg(None, t.pos, self.value(depth))

    def value(self, depth: int) -> Node:
        t = self.peek()
        if t.kind == "num":
            self.take()
            v = float(t.text)
            if not math.isfinite(v):
                raise self.fail(f"number {t.text} is out of range", t.pos)
            return Num(t.pos, t.pos + len(t.text), v)
        if t.kind == "[":
            return self.list(depth + 1)
        if t.kind == "name":
            if self.tokens[self.i + 1].kind == "(":
                return self.call(depth + 1)
            self.take()
            return Var(t.pos, t.pos + len(t.text), t.text)
        if t.kind == "end" and self.open:
            o = self.open[-1]
            raise self.fail(
                f"unbalanced {o.kind!r}: missing {')' if o.kind == '(' else ']'!r}", o.pos
            )
        found = "end of input" if t.kind == "end" else repr(t.text)
        raise self.fail(f"expected a number, a list or a distribution, found {found}", t.pos)

    def list(self, depth: int) -> ListNode:
        if depth > MAX_DEPTH:
            raise self.fail(f"nested deeper than {MAX_DEPTH} levels", self.peek().pos)
        opener = self.take()
        self.open.append(opener)
        items: list[Node] = []
        if self.peek().kind != "]":
            while True:
                items.append(self.value(depth))
                if self.peek().kind == ",":
                    self.take()
                    continue
                break
        close = self.expect("]", "',' or ']'")
        self.open.pop()
        return ListNode(opener.pos, close.pos + 1, items)


# ----------------------------------------------------------------------------- families
_REQUIRED = object()


@dataclass(frozen=True)
class Param:
    name: str
    default: Any = _REQUIRED
    kind: str = "number"  # "number", "vector", "matrix", "components"
    check: str = ""  # "positive", "probs", "weights"


@dataclass(frozen=True)
class Family:
    name: str
    params: tuple[Param, ...]
    build: Callable[..., D.Distribution]
    aliases: tuple[str, ...] = ()
    keyword_aliases: tuple[tuple[str, str], ...] = ()


def _loc_scale() -> tuple[Param, ...]:
    return (Param("loc", 0.0), Param("scale", 1.0, check="positive"))


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("normal", _loc_scale(), D.Normal, ("gaussian",)),
        Family(
            "student_t",
            (Param("df", check="positive"), *_loc_scale()),
            D.StudentT,
            ("t", "studentt"),
        ),
        Family("laplace", _loc_scale(), D.Laplace),
        Family("logistic", _loc_scale(), D.Logistic),
        Family("exponential", (Param("rate", 1.0, check="positive"),), D.Exponential),
        Family(
            "gamma",
            (Param("shape", check="positive"), Param("rate", 1.0, check="positive")),
            D.Gamma,
            keyword_aliases=(("concentration", "shape"),),
        ),
        Family("beta", (Param("a", check="positive"), Param("b", check="positive")), D.Beta),
        Family("uniform", (Param("low", 0.0), Param("high", 1.0)), D.Uniform),
        Family("categorical", (Param("probs", kind="vector", check="probs"),), D.Categorical),
        Family("poisson", (Param("rate", check="positive"),), D.Poisson),
        Family(
            "mvnormal",
            (Param("loc", kind="vector"), Param("cov", None, kind="matrix")),
            D.MultivariateNormal,
            ("mvn", "multivariate_normal"),
        ),
        Family(
            "mixture",
            (
                Param("weights", kind="vector", check="weights"),
                Param("components", kind="components"),
            ),
            D.Mixture,
        ),
    )
}
_ALIASES = {a: f.name for f in FAMILIES.values() for a in (f.name, *f.aliases)}


class _Builder:
    def __init__(self, text: str, variables: dict[str, float]) -> None:
        self.text = text
        self.variables = variables

    def fail(self, message: str, pos: int) -> SpecError:
        return SpecError(message, self.text, pos)

    def build(self, node: Call) -> D.Distribution:
        canonical = _ALIASES.get(node.name.lower())
        if canonical is None:
            known = ", ".join(sorted(FAMILIES))
            raise self.fail(f"unknown distribution {node.name!r}; known: {known}", node.pos)
        fam = FAMILIES[canonical]
        values: dict[str, tuple[Any, Node]] = {}
        kw_alias = dict(fam.keyword_aliases)
        positional_done = False
        for i, arg in enumerate(node.args):
            if arg.keyword is None:
                if positional_done:
                    raise self.fail("positional argument after a keyword argument", arg.value.pos)
                if i >= len(fam.params):
                    raise self.fail(
                        f"{canonical} takes at most {len(fam.params)} argument"
                        f"{'s' if len(fam.params) > 1 else ''} "
                        f"({', '.join(p.name for p in fam.params)}), got {len(node.args)}",
                        arg.value.pos,
                    )
                param = fam.params[i]
            else:
                positional_done = True
                key = kw_alias.get(arg.keyword, arg.keyword)
                match = [p for p in fam.params if p.name == key]
                if not match:
                    raise self.fail(
                        f"{canonical} has no parameter {arg.keyword!r}; "
                        f"parameters: {', '.join(p.name for p in fam.params)}",
                        arg.keyword_pos,
                    )
                param = match[0]
                if param.name in values:
                    raise self.fail(f"parameter {param.name!r} given twice", arg.keyword_pos)
            values[param.name] = (self.convert(param, arg.value, canonical), arg.value)
        kwargs: dict[str, Any] = {}
        for param in fam.params:
            if param.name in values:
                kwargs[param.name] = values[param.name][0]
            elif param.default is _REQUIRED:
                raise self.fail(
                    f"{canonical} needs parameter {param.name!r} "
                    f"({', '.join(p.name for p in fam.params)})",
                    node.close,
                )
            else:
                kwargs[param.name] = param.default
        return self.finish(canonical, kwargs, values, node)

    # ---- values
    def number(self, node: Node, what: str) -> float:
        if isinstance(node, Num):
            return self.in_range(node.value, node, what)
        if isinstance(node, Var):
            if node.name in self.variables:
                return self.in_range(float(self.variables[node.name]), node, what)
            hint = (
                f" (bound: {', '.join(sorted(self.variables))})"
                if self.variables
                else " (names are allowed only as a swept variable)"
            )
            raise self.fail(f"unknown name {node.name!r}{hint}", node.pos)
        raise self.fail(f"{what} must be a number", node.pos)

    def in_range(self, v: float, node: Node, what: str) -> float:
        if not math.isfinite(v) or abs(v) > MAX_ABS:
            raise self.fail(f"{what} = {v:g} is out of range (|value| <= {MAX_ABS:g})", node.pos)
        return v

    def vector(self, node: Node, what: str) -> tuple[float, ...]:
        if not isinstance(node, ListNode):
            raise self.fail(f"{what} must be a list such as [0.5, 0.5]", node.pos)
        if not node.items:
            raise self.fail(f"{what} must not be empty", node.pos)
        return tuple(self.number(it, f"each entry of {what}") for it in node.items)

    def convert(self, param: Param, node: Node, family: str) -> Any:
        what = f"{family}'s {param.name}"
        if param.kind == "number":
            v = self.number(node, what)
            if param.check == "positive" and not v > 0:
                raise self.fail(f"{what} must be > 0, got {v:g}", node.pos)
            if param.check == "positive" and v < MIN_POSITIVE:
                raise self.fail(f"{what} = {v:g} is too small (>= {MIN_POSITIVE:g})", node.pos)
            if family == "poisson" and v > MAX_POISSON_RATE:
                raise self.fail(
                    f"{what} = {v:g} is too large (<= {MAX_POISSON_RATE:g}: exact sums "
                    "enumerate the support)",
                    node.pos,
                )
            return v
        if param.kind == "vector":
            vec = self.vector(node, what)
            if param.check in ("probs", "weights"):
                for it, v in zip(node.items, vec, strict=True):  # type: ignore[attr-defined]
                    if v < 0:
                        raise self.fail(f"{what} must be >= 0, got {v:g}", it.pos)
                total = math.fsum(vec)
                if abs(total - 1.0) > PROB_TOL:
                    raise self.fail(f"{what} must sum to 1, they sum to {total:.12g}", node.pos)
            return vec
        if param.kind == "matrix":
            if not isinstance(node, ListNode) or not node.items:
                raise self.fail(f"{what} must be a non-empty list of rows", node.pos)
            return tuple(self.vector(row, f"each row of {what}") for row in node.items)
        # components
        if not isinstance(node, ListNode) or not node.items:
            raise self.fail(f"{what} must be a non-empty list of distributions", node.pos)
        comps = []
        for it in node.items:
            if not isinstance(it, Call):
                raise self.fail(f"each entry of {what} must be a distribution", it.pos)
            comps.append((self.build(it), it))
        return tuple(comps)

    # ---- cross-parameter checks
    def finish(
        self, family: str, kw: dict[str, Any], values: dict[str, tuple[Any, Node]], node: Call
    ) -> D.Distribution:
        def at(name: str) -> int:
            return values[name][1].pos if name in values else node.pos

        if family == "uniform" and not kw["low"] < kw["high"]:
            raise self.fail(
                f"uniform needs low < high, got ({kw['low']:g}, {kw['high']:g})", at("high")
            )
        if family == "mvnormal":
            loc = kw["loc"]
            d = len(loc)
            cov = (
                kw["cov"]
                if kw["cov"] is not None
                else tuple(tuple(1.0 if i == j else 0.0 for j in range(d)) for i in range(d))
            )
            if len(cov) != d or any(len(row) != d for row in cov):
                raise self.fail(f"mvnormal's cov must be {d}×{d} to match loc", at("cov"))
            c = np.asarray(cov)
            if not np.allclose(c, c.T, rtol=1e-12, atol=1e-12):
                raise self.fail("mvnormal's cov must be symmetric", at("cov"))
            try:
                np.linalg.cholesky(c)
            except np.linalg.LinAlgError:
                raise self.fail("mvnormal's cov must be positive definite", at("cov")) from None
            return D.MultivariateNormal(tuple(loc), tuple(tuple(r) for r in cov))
        if family == "mixture":
            weights = kw["weights"]
            comps = kw["components"]
            if len(weights) != len(comps):
                raise self.fail(
                    f"mixture has {len(weights)} weights but {len(comps)} components",
                    at("components"),
                )
            first = comps[0][0]
            for comp, cnode in comps[1:]:
                if comp.discrete != first.discrete:
                    raise self.fail(
                        "mixture components must all be discrete or all continuous", cnode.pos
                    )
                if comp.dim != first.dim:
                    raise self.fail("mixture components must have the same dimension", cnode.pos)
            return D.Mixture(tuple(weights), tuple(c for c, _ in comps))
        return FAMILIES[family].build(**kw)


def variables_used(text: str) -> set[str]:
    """The bare names a spec uses as values (its sweep variables).

    >>> sorted(variables_used("mixture([w, 1], [normal(mu, 1), normal()])"))
    ['mu', 'w']
    """
    found: set[str] = set()

    def walk(node: Node) -> None:
        if isinstance(node, Var):
            found.add(node.name)
        elif isinstance(node, ListNode):
            for it in node.items:
                walk(it)
        elif isinstance(node, Call):
            for arg in node.args:
                walk(arg.value)

    walk(_Parser(text).spec())
    return found


def parse(text: str, *, variables: dict[str, float] | None = None) -> D.Distribution:
    """Parse a spec into a :class:`~klest.lab.distributions.Distribution`.

    ``variables`` binds bare names used as values (a sweep's parameter, e.g. ``normal(mu, 1)``
    with ``{"mu": 0.5}``). Raises :class:`SpecError` (a :class:`klest.KlestError`) on bad input.

    >>> parse("gamma(shape=2, rate=3)")
    gamma(2, 3)
    >>> parse("normal(0, -1)")
    Traceback (most recent call last):
    ...
    klest.lab.specs.SpecError: normal's scale must be > 0, got -1 (column 11)
      normal(0, -1)
                ^
    """
    if not isinstance(text, str):
        raise KlestError("a spec must be a string", argument="spec", value=text)
    tree = _Parser(text).spec()
    return _Builder(text, dict(variables or {})).build(tree)


def as_distribution(obj: Any, *, variables: dict[str, float] | None = None) -> D.Distribution:
    """A :class:`~klest.lab.distributions.Distribution` from a spec string (read by
    :func:`parse`, with ``variables`` bound), a Distribution, a SciPy frozen distribution or a
    torch.distributions object (wrapped by :func:`klest.lab.distributions.wrap`).

    >>> as_distribution("normal(0.1, 1)")
    normal(0.1, 1)
    """
    if isinstance(obj, str):
        return parse(obj, variables=variables)
    return D.wrap(obj)
