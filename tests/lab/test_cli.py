"""The command line, run as a user runs it (``python -m klest`` in a subprocess): output formats,
one-line errors without tracebacks, and a sweep killed midway that resumes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def klest(
    *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "klest", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def test_reproduce_json_and_determinism() -> None:
    a = klest("reproduce", "--n", "1e5", "--format", "json")
    assert a.returncode == 0, a.stderr
    rows = json.loads(a.stdout)
    assert len(rows) == 10
    for key in (
        "p",
        "estimator",
        "true_value",
        "bias_over_true",
        "stdev_over_true",
        "expected_bias_over_true",
        "expected_stdev_over_true",
        "stderr_bias_over_true",
        "n",
    ):
        assert all(key in r for r in rows)
    assert rows[0]["p"] == "normal(0.1, 1)" and rows[0]["n"] == 100_000
    b = klest("reproduce", "--n", "100000", "--format", "json")
    assert a.stdout == b.stdout


def test_reproduce_table_markdown_csv_and_plot(tmp_path: Path) -> None:
    t = klest("reproduce", "--n", "1e5", "--plot", str(tmp_path / "r.png"))
    assert t.returncode == 0 and "stdev/true" in t.stdout and "k_opt" in t.stdout
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    m = klest("reproduce", "--n", "1e5", "--format", "markdown")
    assert m.stdout.startswith("| p |")
    c = klest("reproduce", "--n", "1e5", "--format", "csv")
    assert c.stdout.splitlines()[0].startswith("q,p,estimator,target,true_value")


def test_compare_heavy_tail() -> None:
    r = klest(
        "compare",
        "--q",
        "normal(0, 1)",
        "--p",
        "student_t(3)",
        "--n",
        "1e5",
        "--estimators",
        "k1,k3",
    )
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("student_t(3, 0, 1)")]
    rows = {line.split()[3]: line for line in lines}
    assert "unreliable" in rows["k3"]  # E_q[r²] = ∞: k3's stdev is flagged
    assert "unreliable" not in rows["k1"]  # k1 = -log r has finite variance: not flagged
    # k3's exact bias is 0 (E_q[r] = 1): the 'exact' column after bias/true
    assert rows["k3"].split()[7] == "0", rows["k3"]


SWEEP_ARGS = ["sweep", "--q", "normal(0,1)", "--p", "normal(mu,1)", "--vary", "mu=1,2"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (
            ["compare", "--q", "normal(0,1)", "--p", "normal(1,1)", "--estimators", "k9"],
            "unknown estimator 'k9'",
        ),
        (["reproduce", "--n", "0"], "n must be at least 2"),
        (["reproduce", "--n", "-5"], "n must be at least 2"),
        (["reproduce", "--n", "1"], "n must be at least 2"),  # a stdev needs two samples
        (["reproduce", "--scheduler", "tcp://localhost"], "no port"),
        (["reproduce", "--scheduler", "tcp//h:1"], "is not a scheduler address"),
        (["reproduce", "--scheduler", "foo://h:1"], "unknown protocol 'foo'"),
        (["reproduce", "--scheduler", "h:70000"], "outside 1-65535"),
        (["--import", "klest_no_such_module", "reproduce"], "No module named"),
        (["reproduce", "--import", "klest_no_such_module"], "No module named"),
        (["reproduce", "--n", "abc"], "not a number"),
        (["reproduce", "--n", "1.5"], "whole number"),
        (["compare", "--q", "normal(0,1)", "--p", "norml(1,1)"], "unknown distribution 'norml'"),
        (["compare", "--q", "normal(0,1", "--p", "normal(1,1)"], "unbalanced '('"),
        (["compare", "--q", "normal(0,1)", "--p", "exponential(1)"], "+inf"),
        (
            [
                "compare",
                "--q",
                "normal(0,1)",
                "--p",
                "normal(1,1)",
                "--estimators",
                "chi2",
                "--n",
                "10",
            ],
            "--",
        ),
        (
            [
                "sweep",
                "--q",
                "normal(0,1)",
                "--p",
                "normal(mu,1)",
                "--vary",
                "mu=1:2",
                "--out",
                "x.json",
            ],
            "START:STOP:COUNT",
        ),
        (
            [
                "sweep",
                "--q",
                "normal(0,1)",
                "--p",
                "normal(nu,1)",
                "--vary",
                "mu=1,2",
                "--out",
                "x.json",
            ],
            "unknown name 'nu'",
        ),
        (["reproduce", "--seed", "-1"], "seed must be >= 0"),
        (["reproduce", "--seed", "x"], "seed must be a whole number"),
        # output paths are checked before any work (the default n = 1e7 would take seconds)
        (["reproduce", "--plot", "out.txt"], "--plot out.txt: the file name must end in .png"),
        (["reproduce", "--plot", "nodir/out.png"], "directory nodir does not exist"),
        (["reproduce", "--plot", "."], "must end in"),
        (
            [*SWEEP_ARGS, "--out", "nodir/x.json"],
            "--out nodir/x.json: directory nodir does not exist",
        ),
        (
            [*SWEEP_ARGS, "--out", "x.txt"],
            "must end in .json, .csv",
        ),
        # parameters whose densities would overflow
        (["compare", "--q", "normal(0,1)", "--p", "student_t(1e308)"], "out of range"),
        (["compare", "--q", "normal(0,1e300)", "--p", "normal(0,1)"], "out of range"),
        (["compare", "--q", "normal(0,1)", "--p", "normal(1e300,1)"], "out of range"),
        (["compare", "--q", "normal(0,1)", "--p", "normal(0,1e-300)"], "too small"),
        (["compare", "--q", "exponential(1e-300)", "--p", "exponential(1)"], "too small"),
        (["compare", "--q", "logistic(0,1e300)", "--p", "logistic(0,1)"], "out of range"),
        (["compare", "--q", "gamma(1e300,1e300)", "--p", "gamma(1,1)"], "out of range"),
        (["compare", "--q", "poisson(1e300)", "--p", "poisson(1)"], "out of range"),
        (["compare", "--q", "poisson(1)", "--p", "poisson(2e6)"], "too large"),
        (["compare", "--q", "mvnormal([0],[[1e300]])", "--p", "normal(0,1)"], "out of range"),
        # p's mass in the gap of a mixture q: the forward KL is +inf
        (
            [
                "compare",
                "--q",
                "mixture([0.5,0.5],[uniform(0,1),uniform(2,3)])",
                "--p",
                "uniform(0,3)",
                "--estimators",
                "forward_k3",
            ],
            "support mismatch",
        ),
        (
            ["compare", "--q", "normal(0,1)", "--p", "mvnormal([0],[[2]])", "--n", "1000"],
            "--",
        ),
        ([*SWEEP_ARGS[:-1], "mu=1,nan", "--out", "x.json"], "must be finite"),
        (
            [
                "sweep",
                "--q",
                "normal(0,1)",
                "--p",
                "normal(1,1)",
                "--vary",
                "o=1,2",
                "--out",
                "x.json",
            ],
            "neither spec uses the swept variable 'o'",
        ),
        (["reproduce", "--format", "yaml"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
        (["compare", "--q", "normal(0,1)"], "required"),
    ],
)
def test_user_mistakes_are_one_line_errors(args: list[str], words: str, tmp_path: Path) -> None:
    r = klest(*args, cwd=tmp_path)
    if words == "--":  # a valid command: it must succeed
        assert r.returncode == 0, r.stderr
        return
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    first = r.stderr.splitlines()[0]
    assert first.startswith("klest: error: ") and words in first, r.stderr
    extra = r.stderr.splitlines()[1:]
    # only a spec error adds lines: the spec and a caret under the offending character
    assert not extra or (len(extra) == 2 and extra[1].strip() == "^"), r.stderr


SWEEP = [
    "sweep",
    "--q",
    "normal(0, 1)",
    "--p",
    "normal(mu, 1)",
    "--vary",
    "mu=0.2:2:8",
    "--estimators",
    "k1,k2,k3",
    "--n",
    "4e6",
    "--quiet",
    "--format",
    "json",
]


def _wait_for_rows(
    path: Path, proc: subprocess.Popen[str], minimum: int, timeout: float = 60
) -> list[dict[str, object]]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            rows = json.loads(path.read_text())  # always valid JSON: writes are atomic
            if len(rows) >= minimum:
                return rows
        assert proc.poll() is None, "sweep finished before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError("no point written in time")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_sweep_killed_midway_resumes(tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "sweep.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "klest", *SWEEP, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        # a shell that runs us in the background ignores SIGINT, and the child would inherit
        # that: give it the default disposition, so that Ctrl-C reaches it as in a terminal
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        _wait_for_rows(out, proc, 3)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    saved = json.loads(out.read_text())  # the file is valid after the interruption
    assert 3 <= len(saved) < 24 and len(saved) % 3 == 0
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] or sig == signal.SIGKILL
    r = klest(*SWEEP, "--out", str(out), "--plot", str(tmp_path / "s.png"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    final = json.loads(out.read_text())
    assert len(final) == 24
    assert final[: len(saved)] == saved  # finished points were kept, not recomputed
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    # an uninterrupted run gives the same rows (each point has its own seed)
    fresh = tmp_path / "fresh.json"
    assert klest(*SWEEP, "--out", str(fresh), cwd=tmp_path).returncode == 0
    key = lambda r: (r["value"], r["estimator"])  # noqa: E731
    assert sorted(final, key=key) == sorted(json.loads(fresh.read_text()), key=key)


def test_numeric_failures_are_one_line_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # whatever overflow the range checks miss ends as a one-line error with status 2
    import klest.lab.experiments as ex
    from klest.cli import main

    def boom(*args: object, **kw: object) -> None:
        raise OverflowError("math range error")

    monkeypatch.setattr(ex, "compare", boom)
    assert main(["compare", "--q", "normal(0,1)", "--p", "normal(1,1)", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("klest: error: ") and "OverflowError" in err
    assert len(err.splitlines()) == 1
    monkeypatch.setattr(ex, "compare", lambda *a, **k: math.sqrt(-1))
    assert main(["compare", "--q", "normal(0,1)", "--p", "normal(1,1)", "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("klest: error: ")


def test_imports_stay_light() -> None:
    code = (
        "import sys, klest.lab, klest.cli, klest.lab.engine, klest.lab.experiments; "
        "heavy = ('torch', 'jax', 'scipy', 'matplotlib', 'rich'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_command_prints_help() -> None:
    r = klest()
    assert r.returncode == 2 and "reproduce" in r.stdout


def test_progress_bar_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from klest.cli import _Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    fake = Tty()
    monkeypatch.setattr(sys, "stderr", fake)
    bar = _Progress(True, "test")
    bar.start -= 5.0  # pretend the run has lasted 5 s
    bar(10, 100)
    assert bar.bar is not None
    bar(100, 100)
    assert bar.bar is None  # stopped at the end
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a TTY: never shown
    quiet = _Progress(True, "test")
    quiet.start -= 5.0
    quiet(10, 100)
    assert quiet.bar is None


def test_unwritable_plot_or_out_fails_before_the_run(tmp_path: Path) -> None:
    # os.access says yes to root: the target is probed by creating it, before any work
    if hasattr(os, "geteuid") and os.geteuid() == 0 and Path("/proc").is_dir():
        bad_dir = Path("/proc")
    else:
        bad_dir = tmp_path / "ro"
        bad_dir.mkdir()
        bad_dir.chmod(0o555)
    compare = ["compare", "--q", "normal(0, 1)", "--p", "normal(1, 1)"]
    sweep = ["sweep", "--q", "normal(0, 1)", "--p", "normal(mu, 1)", "--vary", "mu=0.5,1"]
    for args in ([*compare, "--plot", f"{bad_dir}/x.png"], [*sweep, "--out", f"{bad_dir}/s.csv"]):
        r = klest(*args, "--n", "1e4", "--quiet")
        assert r.returncode == 2, r.stderr
        assert r.stdout == ""  # nothing was computed and printed first
        assert r.stderr.startswith("klest: error: --") and str(bad_dir) in r.stderr
