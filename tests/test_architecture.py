"""The package's imports run one way (architecture.md §13, §15): no import cycle among the modules
of src/klest, counting imports inside functions and under ``if TYPE_CHECKING:``; and the core's
layers import only the layers below them.

The import graph is read from the sources with :mod:`ast` (nothing is imported). An edge A → B
is drawn for every ``import B`` / ``from B import ...`` anywhere in A, relative imports resolved:
``from P import n`` reaches the submodule P.n when there is one, otherwise P itself (its
``__init__``, which defines n); ``import P.sub`` reaches P.sub. A module's own ancestor packages
run before it whatever it imports, so ``from . import sibling`` is an edge to the sibling only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "klest"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[tuple[str, bool]]:
    """(imported klest module, whether the import is inside a function) for each import."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    package = name if _is_package(name) else name.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name in MODULES:
                        found.append((alias.name, inner))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base_parts = package.split(".")
                    base_parts = base_parts[: len(base_parts) - (child.level - 1)]
                    base = ".".join(base_parts + ([child.module] if child.module else []))
                else:
                    base = child.module or ""
                if base not in MODULES:
                    continue
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    if sub in MODULES:
                        found.append((sub, inner))
                    else:
                        found.append((base, inner))  # a name defined by base (its __init__)
            visit(child, inner)

    visit(tree, False)
    return [(m, f) for m, f in found if m != name]


GRAPH = {m: {t for t, _ in _imports(m)} for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_reader_sees_what_python_resolves():
    """The graph reader on known edges: relative imports, a submodule imported from a package,
    a name from the package's __init__, and imports inside functions."""
    assert "klest.table" in GRAPH["klest.stats"]  # from .table import ...
    assert "klest._stream" in GRAPH["klest.stats"]  # from . import _stream
    assert "klest.errors" in GRAPH["klest._config"]
    assert ("klest._fast", True) in _imports("klest._stream")  # inside a function (numba)
    assert "klest" in GRAPH["klest.__main__"] or "klest.cli" in GRAPH["klest.__main__"]
    # the cycle finder on a graph with one cycle and one chain
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_the_package():
    """No cycle among the modules of src/klest, imports inside functions included."""
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


# The core, top to bottom (architecture.md §15): each module may import only these.
CORE = {
    "klest.stats": {
        "klest._stream",
        "klest.table",
        "klest.estimators",
        "klest.divergences",
        "klest._backend",
        "klest._config",
        "klest.errors",
    },
    "klest._stream": {
        "klest._fast",
        "klest.table",
        "klest._numerics",
        "klest._backend",
        "klest._config",
        "klest.errors",
    },
    "klest._fast": {"klest._numerics", "klest._config", "klest.errors"},
    "klest.estimators": {
        "klest.divergences",
        "klest._numerics",
        "klest._backend",
        "klest._names",
        "klest.errors",
    },
    "klest.table": {
        "klest.divergences",
        "klest._numerics",
        "klest._backend",
        "klest._names",
        "klest.errors",
    },
    "klest.divergences": {"klest._names", "klest._numerics", "klest._backend", "klest.errors"},
    "klest._numerics": {"klest._backend"},
    "klest._backend": {"klest._config", "klest.errors"},
    "klest._config": {"klest.errors"},
    "klest._names": {"klest.errors"},
    "klest.errors": set(),
}


@pytest.mark.parametrize("module", sorted(CORE))
def test_the_core_imports_only_downwards(module):
    extra = GRAPH[module] - CORE[module]
    assert not extra, f"{module} imports {sorted(extra)}, above it or beside it"


def test_the_core_imports_inside_functions_only_what_imports_numba():
    """An import inside a function is there to keep numba out of ``import klest``, never to
    dodge a cycle: in the core, only the compiled kernels are imported late."""
    late = {(m, t) for m in CORE for t, inside in _imports(m) if inside}
    assert late <= {("klest._stream", "klest._fast")}, sorted(late)


def _family(prefix: str) -> list[str]:
    return [m for m in MODULES if m == prefix or m.startswith(prefix + ".")]


def test_rl_builds_on_logits_never_the_reverse():
    """klest.logits imports nothing of klest.rl; what both need (mask checks, aggregation, global
    token counts) is klest._torch, which imports neither."""
    for m in _family("klest.logits"):
        up = {t for t in GRAPH[m] if t.startswith("klest.rl")}
        assert not up, f"{m} imports {sorted(up)}"
    assert not {t for t in GRAPH["klest._torch"] if t.startswith(("klest.rl", "klest.logits"))}


def test_torch_layers_import_inside_functions_only_what_imports_numba():
    """In klest._torch, klest.logits and klest.rl an import inside a function is there only to
    keep numba out of ``import klest`` (the compiled kernels), never to dodge a cycle."""
    mods = ["klest._torch", *_family("klest.logits"), *_family("klest.rl")]
    late = {(m, t) for m in mods for t, inside in _imports(m) if inside}
    assert late <= {("klest.logits._kl", "klest.logits._fused")}, sorted(late)
