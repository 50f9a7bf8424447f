"""Docs that run: every Python snippet and every shown command output of README.md and docs/*.md
is executed and compared with what the page shows (``tests/test_docs.py``, part of ``make test``),
and ``make docs`` rewrites the shown outputs from what the code prints now.

What runs, and the rule each follows (comparison: exact text, after removing trailing spaces at
line ends and trailing blank lines):

- A fenced ```` ```python ```` block runs; the blocks of one page run in order, in one namespace,
  in a fresh interpreter per page (so that state such as numba being loaded is what a user's
  fresh process has), under the ``spawn`` start method of :mod:`multiprocessing` (macOS' and
  Windows' default: a function a snippet hands to a process pool must be importable). If the next
  fenced block, after blank lines only, is a bare ```` ``` ```` block, it is the snippet's output
  (its standard output); otherwise the snippet must print nothing.
- A ```` ```python ```` block whose first line starts with ``>>>`` is an interactive session: each
  statement runs as the interpreter's prompt runs it (expression values are printed with their
  repr) and the lines after it are its output.
- A fenced block whose first line starts with ``$ `` is a shell session: each ``$ `` command
  (continued over lines ending in a backslash) runs with ``bash`` in a fresh temporary directory,
  the virtual environment's ``bin`` first on ``PATH``, standard error merged into standard output,
  and the lines up to the next ``$`` are what it prints. A line ``...`` alone in a shown output
  stands for any number of lines (shown output shortened on purpose).
- ``<!-- doc-output: COMMAND -->TEXT<!-- /doc-output -->`` (inline or over lines): TEXT is what
  COMMAND prints, run with ``bash`` from the repository root (tables that are rendered as
  markdown, counts in prose). Outputs of the same command before a ``|`` are computed once.
- A marker on the line before a fence (blank lines between allowed) changes the rule, and says
  why: ``<!-- doc-test: skip REASON -->`` (not run: needs a cluster, ...) and
  ``<!-- doc-test: output varies REASON -->`` (run, must not fail, output not compared).

``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->`` blocks hold benchmark figures; they are
written by ``benchmarks/bench_NAME.py --write-docs`` (``benchmarks/_docs.py``) and only checked
for form here (a machine and a date; timings cannot be re-measured in a test).

Usage::

    python tests/docsync.py [PAGE ...]            # check, print a diff for every difference
    python tests/docsync.py --update [PAGE ...]   # rewrite the shown outputs (then read git diff)

PAGE may be ``docs/lab.md:54``: only the item whose block (or region) starts at that line.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(`{3,})(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*doc-test:\s*(skip|output varies)\b\s*(.*?)\s*-->\s*$")
REGION = re.compile(r"<!--\s*doc-output:\s*(.+?)\s*-->(.*?)<!--\s*/doc-output\s*-->", re.DOTALL)
ANY_LINES = "..."
RUNNABLE = ("klest", "python")  # what a shell block may run (nothing that lives on)

Kind = Literal["python", "session", "shell", "region"]


def pages() -> list[Path]:
    """README.md and docs/*.md, the pages whose snippets run."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass
class Item:
    """One checked thing on a page: a snippet with its output, a session, or a region."""

    page: Path
    line: int  # 1-based line of the opening fence (or of the region's comment)
    kind: Kind
    source: str  # code, session or shell text, or the region's command
    expected: str  # what the page shows ("" for a snippet that must print nothing)
    span: tuple[int, int] | None  # where `expected` sits in the page's text (None: nowhere)
    marker: tuple[str, str] | None = None  # ("skip" | "output varies", reason)

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


@dataclass
class _Fence:
    line: int  # 0-based index of the opening fence
    info: str
    body: tuple[int, int]  # character span of the content (without fences)
    text: str
    marker: tuple[str, str] | None
    blank_after: bool  # only blank lines between this fence's end and the next fence


def _fences(text: str) -> list[_Fence]:
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for ln in lines:
        offsets.append(offsets[-1] + len(ln))
    out: list[_Fence] = []
    i = 0
    last_nonblank = ""
    while i < len(lines):
        m = FENCE.match(lines[i].rstrip("\n"))
        if not m:
            if lines[i].strip():
                last_nonblank = lines[i].strip()
                if out:
                    out[-1].blank_after = False
            i += 1
            continue
        ticks, info = m.group(1), m.group(2)
        j = i + 1
        while j < len(lines) and lines[j].rstrip("\n").rstrip() != ticks:
            j += 1
        mk = MARKER.match(last_nonblank)
        marker = (mk.group(1), mk.group(2)) if mk else None
        body = (offsets[i + 1], offsets[min(j, len(lines))])
        out.append(_Fence(i, info, body, text[body[0] : body[1]], marker, True))
        last_nonblank = ""
        i = j + 1
    return out


def parse(page: Path) -> list[Item]:
    """The items of one page, in page order (regions last)."""
    text = page.read_text(encoding="utf-8")
    fences = _fences(text)
    items: list[Item] = []
    used: set[int] = set()
    for k, f in enumerate(fences):
        if k in used:
            continue
        first = f.text.lstrip("\n").split("\n", 1)[0]
        if f.info in ("python", "py", "pycon") and first.startswith(">>>"):
            items.append(Item(page, f.line + 1, "session", f.text, f.text, f.body, f.marker))
        elif f.info in ("python", "py"):
            nxt = fences[k + 1] if k + 1 < len(fences) else None
            if (
                nxt is not None
                and f.blank_after
                and nxt.info == ""
                and not nxt.text.startswith("$ ")
            ):
                used.add(k + 1)
                items.append(Item(page, f.line + 1, "python", f.text, nxt.text, nxt.body, f.marker))
            else:
                items.append(Item(page, f.line + 1, "python", f.text, "", None, f.marker))
        elif f.text.startswith("$ "):
            items.append(Item(page, f.line + 1, "shell", f.text, f.text, f.body, f.marker))
    for m in REGION.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        items.append(Item(page, line, "region", m.group(1), m.group(2), m.span(2)))
    return items


# ---------------------------------------------------------------------------------------------
# comparison


def _norm(text: str) -> list[str]:
    lines = [ln.rstrip() for ln in text.strip("\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def matches(expected: str, got: str) -> bool:
    """Exact match of the normalised lines; a line ``...`` alone matches any number of lines."""
    exp, act = _norm(expected), _norm(got)

    @functools.cache
    def m(i: int, j: int) -> bool:
        if i == len(exp):
            return j == len(act)
        if exp[i] == ANY_LINES:
            return any(m(i + 1, k) for k in range(j, len(act) + 1))
        return j < len(act) and exp[i] == act[j] and m(i + 1, j + 1)

    return m(0, 0)


def diff(expected: str, got: str, name: str) -> str:
    return "".join(
        difflib.unified_diff(
            [ln + "\n" for ln in _norm(expected)],
            [ln + "\n" for ln in _norm(got)],
            f"{name} (shown)",
            f"{name} (printed now)",
        )
    )


# ---------------------------------------------------------------------------------------------
# running


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLEST_")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["MPLBACKEND"] = "Agg"
    env.pop("PYTHONSTARTUP", None)
    return env


def _split_pipe(command: str) -> tuple[str, str]:
    """``base | rest`` at the first ``|`` outside quotes (``||`` is not a pipe)."""
    quote = ""
    for i, ch in enumerate(command):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "|" and command[i + 1 : i + 2] != "|" and command[i - 1 : i] != "|":
            return command[:i].strip(), command[i + 1 :].strip()
    return command.strip(), ""


def _bash(command: str, cwd: str | None, stdin: str | None, timeout: float) -> str:
    return _spawn(["bash", "-c", command], cwd, stdin, timeout)


def _spawn(argv: list[str], cwd: str | None, stdin: str | None, timeout: float) -> str:
    """Run ``argv`` in its own process group (killed whole at a timeout), in ``cwd`` or a fresh
    temporary directory; stdout and stderr together."""
    with tempfile.TemporaryDirectory(prefix="klest-docs-") as tmp:
        proc = subprocess.Popen(
            argv,
            cwd=cwd or tmp,
            env=_env(),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            out += f"\n[docsync: killed after {timeout:.0f} s]\n"
    return out


@functools.cache
def _run_shell(command: str, cwd: str | None) -> str:
    return _bash(command, cwd, None, 600)


def run_command(command: str, cwd: str | None = None) -> str:
    """What ``command`` prints (stdout and stderr); the part before a pipe is run once per process
    and its output fed to the rest, so that two pages filtering one run share it."""
    base, rest = _split_pipe(command)
    out = _run_shell(base, cwd)
    if not rest:
        return out
    return _bash(rest, cwd, out, 60)


def _shell_parts(text: str) -> list[tuple[str, str, str]]:
    """(command as shown, command to run, shown output) for each ``$`` command of a block."""
    parts: list[tuple[list[str], list[str]]] = []
    lines = text.strip("\n").split("\n")
    i = 0
    while i < len(lines):
        if lines[i].startswith("$ "):
            cmd = [lines[i]]
            while cmd[-1].endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd.append(lines[i])
            parts.append((cmd, []))
        elif parts:
            parts[-1][1].append(lines[i])
        i += 1
    return [("\n".join(c), "\n".join(c)[2:], "\n".join(o)) for c, o in parts]


def run_shell_block(text: str) -> str:
    """The block as it would read with every command's output printed now."""
    out = []
    for shown, cmd, expected in _shell_parts(text):
        if cmd.split(maxsplit=1)[0] not in RUNNABLE:
            raise ValueError(
                f"only {', '.join(RUNNABLE)} commands run here, not {cmd.split()[0]!r}: "
                "mark the block <!-- doc-test: skip REASON -->"
            )
        got = run_command(cmd)
        if matches(expected, got):  # keep a deliberately shortened output ('...') as shown
            got = expected
        else:
            got = _shorten_like(expected, got)
        out.append(shown + ("\n" + "\n".join(_norm(got)) if _norm(got) else ""))
    return "\n".join(out) + "\n"


def _shorten_like(expected: str, got: str) -> str:
    """``got`` cut as ``expected`` is: its first and last lines around one ``...`` line, as many as
    the page shows (so that ``make docs`` keeps a shortened output short)."""
    exp, act = _norm(expected), _norm(got)
    if exp.count(ANY_LINES) != 1:
        return got
    head = exp.index(ANY_LINES)
    tail = len(exp) - head - 1
    if len(act) <= head + tail:
        return got
    return "\n".join(act[:head] + [ANY_LINES] + (act[len(act) - tail :] if tail else [])) + "\n"


def _session_examples(text: str) -> list[tuple[list[str], str, str]]:
    """(prompt lines as shown, source, shown output) of each ``>>>`` statement."""
    out: list[tuple[list[str], list[str]]] = []
    for line in text.strip("\n").split("\n"):
        if line.startswith(">>>"):
            out.append(([line], []))
        elif line.startswith("...") and out and not out[-1][1]:
            out[-1][0].append(line)
        elif out:
            out[-1][1].append(line)
    return [
        (prompt, "\n".join(p[4:] for p in prompt) + "\n", "\n".join(shown)) for prompt, shown in out
    ]


def _exec_page(items: list[dict[str, str]]) -> list[dict[str, str | None]]:
    """Run a page's snippets in order in one namespace (in the child process)."""
    ns: dict[str, object] = {"__name__": "__main__"}
    results: list[dict[str, str | None]] = []
    for it in items:
        if it["kind"] == "session":
            pieces = []
            error = None
            for prompt, source, _shown in _session_examples(it["source"]):
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    try:
                        exec(compile(source, f"<{it['id']}>", "single"), ns)
                    except Exception as exc:
                        print("Traceback (most recent call last):")
                        print("  ...")
                        print("".join(traceback.format_exception_only(exc)).rstrip())
                        error = traceback.format_exc()
                pieces.append("\n".join(prompt + _norm(buf.getvalue())))
            results.append({"got": "\n".join(pieces) + "\n", "error": error})
        else:
            buf = io.StringIO()
            error = None
            with contextlib.redirect_stdout(buf):
                try:
                    exec(compile(it["source"], f"<{it['id']}>", "exec"), ns)
                except Exception:
                    error = traceback.format_exc()
            results.append({"got": buf.getvalue(), "error": error})
    return results


@functools.cache
def run_python(page: Path) -> dict[str, dict[str, str | None]]:
    """Run the page's Python snippets (not the skipped ones) in a fresh interpreter; by source."""
    items = [
        it
        for it in parse(page)
        if it.kind in ("python", "session") and not (it.marker and it.marker[0] == "skip")
    ]
    if not items:
        return {}
    payload = [{"kind": it.kind, "source": it.source, "id": it.id} for it in items]
    with tempfile.TemporaryDirectory(prefix="klest-docs-") as tmp:
        out = Path(tmp) / "results.json"
        (Path(tmp) / "items.json").write_text(json.dumps(payload), encoding="utf-8")
        log = _spawn([sys.executable, str(Path(__file__).resolve()), "--exec", tmp], tmp, None, 600)
        if not out.exists():
            raise RuntimeError(f"running the snippets of {page.name} failed:\n{log}")
        results = json.loads(out.read_text(encoding="utf-8"))
    return {it.source: r for it, r in zip(items, results, strict=True)}


def result(item: Item) -> tuple[str, str | None]:
    """(what the item prints now, a traceback if it raised)."""
    if item.kind == "shell":
        try:
            return run_shell_block(item.source), None
        except ValueError as exc:
            return "", str(exc)
    if item.kind == "region":
        got = run_command(item.source, cwd=str(ROOT))
        return got, None
    r = run_python(item.page).get(item.source)
    if r is None:
        return "", f"{item.page.name} changed while the tests ran (this snippet is gone): run again"
    return str(r["got"]), r["error"]


def check(item: Item) -> str | None:
    """None if the page shows what the item prints now, else the reason (a diff or a traceback)."""
    if item.marker and item.marker[0] == "skip":
        return None
    got, error = result(item)
    if error:
        return f"{item.id}: the {item.kind} block failed\n{error}"
    if item.marker and item.marker[0] == "output varies":
        return None
    expected = item.expected
    if item.kind == "region":
        got, expected = got.strip(), expected.strip()
    if matches(expected, got):
        return None
    return f"{item.id}: the page differs from what runs now\n" + diff(expected, got, item.id)


def update(page: Path, lines: set[int] | None = None) -> int:
    """Rewrite the page's shown outputs (only the items at ``lines``, if given) from what the
    code prints now; the number changed."""
    text = page.read_text(encoding="utf-8")
    edits: list[tuple[tuple[int, int], str, str, str]] = []
    for item in parse(page):
        if item.span is None or item.marker or (lines is not None and item.line not in lines):
            continue
        got, error = result(item)
        if error:
            print(
                f"{item.id}: the {item.kind} block failed, left as it is\n{error}", file=sys.stderr
            )
            continue
        if item.kind == "region":
            if matches(item.expected.strip(), got.strip()):
                continue
            new = f"\n\n{got.strip()}\n\n" if "\n" in item.expected else got.strip()
        else:
            if matches(item.expected, got):
                continue
            new = "\n".join(_norm(got)) + "\n" if _norm(got) else ""
        edits.append((item.span, text[item.span[0] : item.span[1]], new, item.id))
    # The runs take a while: apply the edits to the page as it is now (someone may have edited
    # it meanwhile), each where its old text still is, else not at all.
    text = page.read_text(encoding="utf-8")
    done = 0
    for (a, b), old, new, name in sorted(edits, reverse=True):
        if text[a:b] != old:
            if text.count(old) != 1:
                print(f"{name}: the page changed meanwhile, not updated", file=sys.stderr)
                continue
            a = text.index(old)
            b = a + len(old)
        text = text[:a] + new + text[b:]
        done += 1
        print(f"updated {name}")
    if done:
        page.write_text(text, encoding="utf-8")
    return done


def _resolve(names: Iterable[str]) -> list[tuple[Path, set[int] | None]]:
    """``PAGE`` or ``PAGE:LINE`` (the item whose block opens at LINE) arguments, grouped."""
    out: dict[Path, set[int] | None] = {}
    for name in names:
        path, _, line = name.partition(":")
        page = Path(path).resolve()
        if line:
            if out.get(page, set()) is not None:
                out.setdefault(page, set()).add(int(line))  # type: ignore[union-attr]
        else:
            out[page] = None
    return list(out.items()) or [(p, None) for p in pages()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pages", nargs="*", help="PAGE or PAGE:LINE (default: README.md, docs/*.md)")
    ap.add_argument("--update", action="store_true", help="rewrite the shown outputs")
    ap.add_argument("--exec", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.exec:  # the child process that runs one page's snippets
        import multiprocessing

        multiprocessing.set_start_method("spawn", force=True)
        d = Path(args.exec)
        items = json.loads((d / "items.json").read_text(encoding="utf-8"))
        (d / "results.json").write_text(json.dumps(_exec_page(items)), encoding="utf-8")
        return 0
    bad = 0
    for page, lines in _resolve(args.pages):
        missing = (lines or set()) - {item.line for item in parse(page)}
        if missing:
            print(f"{page.name}: no snippet, session or region starts at line(s) {sorted(missing)}")
            return 2
        if args.update:
            update(page, lines)
            continue
        for item in parse(page):
            if lines is not None and item.line not in lines:
                continue
            problem = check(item)
            if problem:
                bad += 1
                print(problem)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
