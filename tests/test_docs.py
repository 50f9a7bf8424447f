"""The docs run: every Python snippet, session and shown command output of README.md and
docs/*.md is executed and compared with the page (rules and markers: tests/docsync.py; `make docs`
rewrites the shown outputs from the code). Benchmark blocks are checked for form: each names its
machine, date and command, and a block appears identically wherever it is."""

from __future__ import annotations

import importlib.util
import re
import sys

import docsync
import pytest

ROOT = docsync.ROOT
ITEMS = [item for page in docsync.pages() for item in docsync.parse(page)]


def _load_bench_docs():  # benchmarks/_docs.py, the writer of the blocks (not a package)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("_docs", ROOT / "benchmarks" / "_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _load_bench_docs()


@pytest.mark.parametrize(
    "item",
    [
        pytest.param(
            it,
            id=it.id,
            marks=[pytest.mark.skip(reason=it.marker[1])]
            if it.marker and it.marker[0] == "skip"
            else [],
        )
        for it in ITEMS
    ],
)
def test_page_shows_what_runs(item: docsync.Item) -> None:
    problem = docsync.check(item)
    assert problem is None, problem + "\n(if the code is right, `make docs` rewrites the page)"


def test_every_page_has_runnable_items() -> None:
    assert {it.page.name for it in ITEMS} >= {"README.md", "lab.md", "gradients.md", "rl.md"}


def test_markers_say_why() -> None:
    for page in docsync.pages():
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if "doc-test:" in line and not line.startswith("`"):
                m = docsync.MARKER.match(line)
                assert m and m.group(2), (
                    f"{page.name}:{n}: a doc-test marker needs a reason: {line}"
                )


def test_bench_blocks_name_machine_date_and_command() -> None:
    seen: dict[str, str] = {}
    for page in docsync.pages():
        text = page.read_text(encoding="utf-8")
        opens = re.findall(r"^<!-- bench:([\w-]+) -->$", text, re.MULTILINE)
        closes = re.findall(r"^<!-- /bench:([\w-]+) -->$", text, re.MULTILINE)
        assert opens == closes, f"{page.name}: unbalanced bench markers {opens} vs {closes}"
        blocks = BENCH.block_pattern().findall(text)
        assert [name for name, _ in blocks] == opens, f"{page.name}: nested or broken bench blocks"
        for name, body in blocks:
            where = f"{page.name}, bench:{name}"
            lines = BENCH.MEASURED.findall(body)
            assert len(lines) == 1, (
                f"{where}: needs one 'Measured DATE on MACHINE (`command`).' line"
            )
            m = BENCH.MEASURED.search(body)
            assert m.group("script") == f"bench_{name}.py", (
                f"{where}: written by {m.group('script')}"
            )
            assert (ROOT / "benchmarks" / m.group("script")).exists(), where
            assert re.search(r"\d", m.group("machine")), f"{where}: machine without core count"
            assert seen.setdefault(name, body) == body, (
                f"{where}: differs from the same block elsewhere"
            )
    assert seen, "no bench blocks found"


def test_no_unfilled_placeholders() -> None:
    pattern = re.compile(r"\b(?:TODO|TBD|FIXME|XXX|PLACEHOLDER|[A-Z]+TIME|MAKETEST)\b")
    for page in docsync.pages():
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            assert not pattern.search(line), f"{page.name}:{n}: unfilled placeholder: {line}"
