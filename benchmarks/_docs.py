"""Benchmark figures into the docs: ``bench_NAME.py --write-docs`` replaces the text between
``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in README.md and docs/*.md (every page that
has the markers; a block appears identically wherever it is) with its table and one line naming
the machine, the date and the command that measured it. ``tests/test_docs.py`` checks the blocks'
form (it cannot re-time them).

A benchmark adds the flag and, at its end, one call::

    from _docs import add_write_docs_flag, write_block, markdown_table
    add_write_docs_flag(parser)
    ...
    if args.write_docs:
        write_block("NAME", markdown_table(["", "klest", "baseline", "ratio"], rows))

or, for a benchmark whose printed report is the figure, ``StdoutTee(args.write_docs, "NAME")``
right after parsing its arguments (the report then goes into the block as text).

Also ``python benchmarks/_docs.py truth-cases``: the number of (pair, divergence) cases of
tests/lab/test_truth_table.py, which the README quotes (a ``doc-output`` region).
"""

from __future__ import annotations

import argparse
import ast
import atexit
import datetime
import io
import os
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from _platform import _cpu

ROOT = Path(__file__).resolve().parents[1]

#: The line every block ends with; tests/test_docs.py reads it with MEASURED.
MEASURED_FORMAT = "Measured {date} on {machine} (`{command}`)."
MEASURED = re.compile(
    r"^Measured (?P<date>\d{4}-\d{2}-\d{2}(?: to \d{4}-\d{2}-\d{2})?) on (?P<machine>.+\S) "
    r"\(`(?P<command>python benchmarks/(?P<script>bench_\w+\.py)[^`]*)`\)\.$",
    re.MULTILINE,
)


def block_pattern(name: str = r"[\w-]+") -> re.Pattern[str]:
    """``<!-- bench:NAME -->`` body ``<!-- /bench:NAME -->`` (group 1: name, group 2: body)."""
    return re.compile(rf"<!-- bench:({name}) -->\n(.*?)<!-- /bench:\1 -->", re.DOTALL)


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def machine() -> str:
    """CPU model, cores, NumPy's SIMD level, numba and (if imported) torch: what timings hang on."""
    parts = [f"{_cpu()}, {os.cpu_count()} cores"]
    try:
        simd = np.show_config(mode="dicts")["SIMD Extensions"]
        found = simd.get("found", []) or simd.get("baseline", [])
        parts.append("NumPy SIMD " + (found[-1] if found else "none"))
    except Exception:  # older NumPy: no dict mode
        parts.append("NumPy SIMD unknown")
    parts.append(f"numpy {np.__version__}")
    try:
        import numba

        parts.append(f"numba {numba.__version__}")
    except ImportError:
        parts.append("no numba")
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    return ", ".join(parts)


def add_write_docs_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="write this run's figures into README.md/docs (between <!-- bench:NAME --> markers)",
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _command() -> str:
    args = [a for a in sys.argv[1:] if a != "--write-docs"]
    script = Path(sys.argv[0]).name
    return " ".join(["python", f"benchmarks/{script}", *map(shlex.quote, args)])


def render(body: str, *, date: str | None = None, on: str | None = None, command: str = "") -> str:
    """The block's text: ``body``, a blank line and the Measured line."""
    line = MEASURED_FORMAT.format(
        date=date or datetime.date.today().isoformat(),
        machine=on or machine(),
        command=command or _command(),
    )
    return f"{body.strip()}\n\n{line}\n"


def write_block(name: str, body: str, *, pages_: Sequence[Path] | None = None) -> list[Path]:
    """Put ``body`` (markdown) and the machine/date line between the ``bench:NAME`` markers of
    every page that has them; returns the pages written (none: a warning on stderr)."""
    text_block = render(body)
    pat = block_pattern(re.escape(name))
    written = []
    for page in pages_ or pages():
        text = page.read_text(encoding="utf-8")
        new, k = pat.subn(
            lambda m: f"<!-- bench:{m.group(1)} -->\n{text_block}<!-- /bench:{m.group(1)} -->",
            text,
        )
        if k and new != text:
            page.write_text(new, encoding="utf-8")
            written.append(page)
        elif k:
            written.append(page)
    where = ", ".join(str(p.relative_to(ROOT)) for p in written) or "no page (no markers found)"
    print(f"--write-docs: bench:{name} written to {where}", file=sys.stderr)
    return written


class StdoutTee(io.TextIOBase):
    """For a benchmark that prints its report: with ``enabled``, everything printed from here on
    also goes into the ``bench:NAME`` blocks, as a text block, when the script ends normally::

        add_write_docs_flag(ap)
        args = ap.parse_args()
        StdoutTee(args.write_docs, "NAME")
    """

    def __init__(self, enabled: bool, name: str) -> None:
        super().__init__()
        self.name, self.buffer_ = name, io.StringIO()
        self.failed = False
        if not enabled:
            return
        self.out = sys.stdout
        sys.stdout = self  # type: ignore[assignment]
        hook = sys.excepthook

        def on_error(*exc: object) -> None:
            self.failed = True
            hook(*exc)  # type: ignore[arg-type]

        sys.excepthook = on_error
        atexit.register(self._finish)

    def write(self, text: str) -> int:
        self.buffer_.write(text)
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()

    def _finish(self) -> None:
        self.out.flush()
        sys.stdout = self.out
        if not self.failed:
            write_block(self.name, "```text\n" + self.buffer_.getvalue().strip("\n") + "\n```")


def truth_cases() -> int:
    """Cases of tests/lab/test_truth_table.py (lab pairs and torch pairs): the elements of its
    ``CASES`` and ``TORCH_CASES`` list literals, read from the source (importing the test module
    would import torch and mpmath)."""
    tree = ast.parse((ROOT / "tests" / "lab" / "test_truth_table.py").read_text(encoding="utf-8"))
    lists = {
        node.target.id: node.value
        for node in tree.body
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and node.target.id in ("CASES", "TORCH_CASES")
        and isinstance(node.value, ast.List)
    }
    if len(lists) != 2 or any(isinstance(e, ast.Starred) for v in lists.values() for e in v.elts):
        raise SystemExit("the case lists of test_truth_table.py are not plain literals now")
    sizes = {name: len(value.elts) for name, value in lists.items()}
    return sizes["CASES"] + sizes["TORCH_CASES"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["machine", "truth-cases"])
    args = ap.parse_args()
    print(machine() if args.what == "machine" else truth_cases())


if __name__ == "__main__":
    main()
