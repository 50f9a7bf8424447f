"""The ``klest`` command: ``reproduce``, ``compare``, ``sweep`` and ``gradients``. Thin: parses
arguments, calls :mod:`klest.lab`, prints. User mistakes end in a one-line ``klest: error: ...``
(a spec error adds the spec with a caret under the offending character) and exit status 2, never
a traceback.

Estimators registered outside klest reach the command two ways: ``--import MODULE`` (repeatable,
before or after the command) imports a module that calls :func:`klest.register_estimator`, and
every installed package's entry point in the group ``klest.estimators`` (:data:`ENTRY_POINT_GROUP`)
is loaded when the command starts (a broken one is reported in one line and skipped). The values
of every estimator are checked by the core (:func:`klest.table.check_values`) as it streams them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import re
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

__all__ = ["ENTRY_POINT_GROUP", "main"]

#: Entry points in this group are loaded (``ep.load()``) when the command starts: a package
#: registers its estimators in the module (or function call) the entry point names.
ENTRY_POINT_GROUP = "klest.estimators"

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _UsageError(Exception):
    pass


class _PathError(Exception):
    """An output path that cannot be written (reported without the --help hint)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _count(text: str) -> int:
    """A sample count: ``1000000``, ``1_000_000`` or ``1e6``."""
    try:
        v = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v) or v != int(v):
        raise argparse.ArgumentTypeError(f"n must be a whole number, got {text!r}")
    if v < 2:
        raise argparse.ArgumentTypeError(
            f"n must be at least 2 (a standard deviation needs two samples), got {text!r}"
        )
    if v > 1e12:
        raise argparse.ArgumentTypeError(f"n = {text} is more than 1e12 samples")
    return int(v)


def _seed(text: str) -> int:
    try:
        v = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be a whole number, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"seed must be >= 0, got {text!r}")
    if v >= 2**128:
        raise argparse.ArgumentTypeError(f"seed must be < 2**128, got {text!r}")
    return v


#: Figure formats matplotlib's Agg backend writes (checked before any work is done).
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".svgz", ".eps", ".ps", ".jpg", ".jpeg", ".tif", ".tiff")


def _check_writable(option: str, path: str, suffixes: Sequence[str]) -> None:
    """Fail before computing if ``path`` cannot be written: wrong suffix, missing or read-only
    directory, or a directory in its place."""
    import os
    from pathlib import Path

    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise _PathError(
            f"{option} {path}: the file name must end in {', '.join(suffixes)}"
            + (" (the figure's format comes from it)" if option == "--plot" else "")
        )
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise _PathError(f"{option} {path}: directory {parent} does not exist")
    if p.is_dir():
        raise _PathError(f"{option} {path}: is a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise _PathError(f"{option} {path}: permission denied")
    from klest.lab.experiments import probe_writable

    try:  # os.access says yes to root, and knows nothing of read-only file systems or long names
        probe_writable(p)
    except OSError as e:
        raise _PathError(f"{option} {path}: {e.strerror or e}") from None
    if option == "--plot":
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise _PathError(f"{option} {path}: drawing needs matplotlib (pip install klest[lab])")


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _nonnegative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _nonnegative(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return v


_SCHEDULER = re.compile(
    r"(?:(?P<proto>[a-z][a-z0-9+.-]*)://)?(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+)"
    r"(?::(?P<port>[0-9]{1,5}))?/?"
)
_SCHEDULER_PROTOCOLS = ("tcp", "tls", "ucx", "ws", "wss", "inproc")


def _scheduler(text: str) -> str:
    """A Dask scheduler address, checked before any connection is tried: ``tcp://host:port``
    (or tls, ucx, ws, wss, inproc), or ``host:port``; the port 1-65535."""
    m = _SCHEDULER.fullmatch(text.strip())
    why = None
    if m is None:
        why = "expected tcp://HOST:PORT (or tls://, ucx://, ws://, wss://, inproc://)"
    elif m["proto"] is not None and m["proto"] not in _SCHEDULER_PROTOCOLS:
        why = f"unknown protocol {m['proto']!r} (known: {', '.join(_SCHEDULER_PROTOCOLS)})"
    elif m["proto"] != "inproc" and m["port"] is None:
        why = "no port: expected HOST:PORT, e.g. tcp://127.0.0.1:8786"
    elif m["port"] is not None and not 1 <= int(m["port"]) <= 65535:
        why = f"port {m['port']} is outside 1-65535"
    if why is not None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a scheduler address: {why}")
    return text.strip()


def _workers(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError("workers must be >= 1")
    return v


def _estimators(text: str) -> list[str]:
    from klest import KlestError, get_estimator

    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no estimators given")
    for s in names:  # the estimator table decides (and suggests the name meant)
        if s == "k_opt_crossfit":
            raise argparse.ArgumentTypeError("k_opt_crossfit is not streamed; use k_opt")
        try:
            get_estimator(s)
        except KlestError as e:
            raise argparse.ArgumentTypeError(str(e.args[0]).split(": ", 1)[-1]) from None
    return names


def _import_option(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--import",
        dest="imports",
        metavar="MODULE",
        action="append",
        default=None,
        help="import MODULE first (it may register estimators); repeatable",
    )


def _load_plugins(argv: Sequence[str]) -> None:
    """Load the ``klest.estimators`` entry points, then import every ``--import MODULE`` of
    ``argv`` (read before the full parse, so that ``--estimators`` can name what they register).
    A module that fails to import is a usage error; a broken entry point is reported and skipped."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:  # a third-party plugin: its failure must not block the command
            first = (str(e).splitlines() or [""])[0]
            _warn(
                f"entry point {ep.name!r} ({ep.value}) of {ENTRY_POINT_GROUP} failed to load "
                f"and was skipped: {type(e).__name__}: {first}"
            )
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--import", dest="imports", action="append", default=[])
    known, _ = pre.parse_known_args(list(argv))
    for name in known.imports:
        try:
            importlib.import_module(name)
        except Exception as e:
            first = (str(e).splitlines() or [""])[0]
            raise _PathError(f"--import {name}: {type(e).__name__}: {first}") from None


def _build_parser() -> _Parser:
    from klest import __version__

    parser = _Parser(
        prog="klest",
        description="Monte Carlo estimators of KL and f-divergences: experiments.",
    )
    parser.add_argument("--version", action="version", version=f"klest {__version__}")
    _import_option(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def common(sp: argparse.ArgumentParser, n_default: int) -> None:
        sp.add_argument(
            "--n", type=_count, default=n_default, help=f"samples per row (default {n_default:.0e})"
        )
        sp.add_argument("--seed", type=_seed, default=0, help="random seed >= 0 (default 0)")
        sp.add_argument("--format", choices=("table", "markdown", "csv", "json"), default="table")
        sp.add_argument("--workers", type=_workers, default=None, help="threads (default 2)")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")
        sp.add_argument(
            "--scheduler",
            metavar="ADDRESS",
            type=_scheduler,
            default=None,
            help="run the sampling on a Dask cluster, e.g. tcp://host:8786 (needs klest[dask])",
        )
        _import_option(sp)

    rp = sub.add_parser("reproduce", help="the seed's table: q = N(0,1), p = N(0.1,1), N(1,1)")
    common(rp, 10_000_000)
    rp.add_argument("--plot", metavar="FILE.png", help="also draw stdev/true per estimator")

    cp = sub.add_parser("compare", help="the same table for any pair of distributions")
    cp.add_argument("--q", required=True, metavar="SPEC", help="sampler, e.g. 'normal(0, 1)'")
    cp.add_argument("--p", required=True, metavar="SPEC", help="target, e.g. 'student_t(3)'")
    cp.add_argument(
        "--estimators",
        type=_estimators,
        default=None,
        help="comma-separated (default k1,k2,k3,forward_k3,k_opt); "
        "fdiv:NAME is a divergence's control-variate estimator (e.g. fdiv:chi2, fdiv:alpha:0.5)",
    )
    common(cp, 1_000_000)
    cp.add_argument("--plot", metavar="FILE.png")

    sw = sub.add_parser("sweep", help="bias/true and stdev/true against a parameter, with a plot")
    sw.add_argument("--q", required=True, metavar="SPEC", help="may use the swept name")
    sw.add_argument("--p", required=True, metavar="SPEC", help="e.g. 'normal(mu, 1)'")
    sw.add_argument(
        "--vary",
        required=True,
        metavar="NAME=START:STOP:COUNT[:log]",
        help="the swept variable and its values (or NAME=v1,v2,...)",
    )
    sw.add_argument("--estimators", type=_estimators, default=None)
    common(sw, 1_000_000)
    sw.add_argument(
        "--out",
        required=True,
        metavar="FILE.json|FILE.csv",
        help="rows, written after each point; re-running resumes",
    )
    sw.add_argument("--plot", metavar="FILE.png", help="figure written at the end")

    gr = sub.add_parser(
        "gradients",
        help="exact expected gradient of every KL option on a toy autoregressive policy",
    )
    gr.add_argument("--V", type=_positive, default=4, help="vocabulary size (default 4)")
    gr.add_argument("--T", type=_positive, default=4, help="sequence length (default 4)")
    gr.add_argument("--B", type=_positive, default=64, help="batch size for tr Cov (default 64)")
    gr.add_argument(
        "--distance", type=_nonnegative, default=1.0, help="π_ref's logits: θ + distance·N(0,1)"
    )
    gr.add_argument(
        "--off-policy",
        type=_nonnegative,
        default=0.5,
        help="sampler μ's logits: θ + off_policy·N(0,1); 0: no off-policy rows (default 0.5)",
    )
    gr.add_argument("--eos", action="store_true", help="token 0 ends a sequence (variable length)")
    gr.add_argument("--steps", type=_nonnegative_int, default=150, help="training steps; 0: none")
    gr.add_argument("--beta", type=_nonnegative, default=0.5, help="KL coefficient in training")
    gr.add_argument("--no-presets", action="store_true", help="leave the peer presets out")
    gr.add_argument("--seed", type=_seed, default=0, help="random seed >= 0 (default 0)")
    gr.add_argument("--format", choices=("table", "markdown", "csv", "json"), default="table")
    gr.add_argument("--plot", metavar="FILE.png", help="training curves (needs --steps > 0)")
    gr.add_argument(
        "--mismatch",
        type=_nonnegative,
        default=None,
        metavar="D",
        help="instead: the bias of each importance-weight correction when the sampler μ is at "
        "KL(μ‖π) = D nats per sequence (--plot: bias against D; --off-policy, --steps, --beta "
        "unused)",
    )
    _import_option(gr)
    return parser


class _Progress:
    """A rich progress bar on stderr, shown only on a TTY and only once a run passes 1 s."""

    def __init__(self, enabled: bool, label: str) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.label = label
        self.start = time.perf_counter()
        self.bar: Any = None
        self.task: Any = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            if time.perf_counter() - self.start < 1.0 or done >= total:
                return
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TimeRemainingColumn

            self.bar = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                "{task.percentage:>5.1f}%",
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=total, completed=done)
        self.bar.update(self.task, completed=done, total=total)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _executor(args: argparse.Namespace) -> contextlib.AbstractContextManager[Any]:
    """The Dask executor of ``--scheduler`` (closed on exit), or None: the local threads."""
    if args.scheduler is None:
        return contextlib.nullcontext(None)
    from klest.lab._executors import dask_executor

    return dask_executor(args.scheduler)


def _print(text: str) -> None:
    sys.stdout.write(text + ("\n" if not text.endswith("\n") else ""))
    sys.stdout.flush()


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from klest.lab.experiments import reproduce

    if args.plot:
        _check_writable("--plot", args.plot, PLOT_SUFFIXES)

    def run(prog: Any) -> Any:
        with _executor(args) as ex:
            return reproduce(args.n, args.seed, workers=args.workers, progress=prog, executor=ex)

    return _run_and_report(args, "reproduce", run)


def _run_and_report(args: argparse.Namespace, name: str, run: Any) -> int:
    """Run with a progress bar (closed whatever happens), print the rows, plot them if asked."""
    from klest.lab.report import format_rows

    prog = _Progress(not args.quiet, name)
    try:
        rows = run(prog)
    finally:
        prog.close()
    _print(format_rows(rows, args.format))
    if args.plot:
        from klest.lab.plots import plot_rows

        plot_rows(rows, args.plot)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from klest.lab.experiments import DEFAULT_ESTIMATORS, compare

    q = _spec("--q", args.q)
    p = _spec("--p", args.p)
    if args.plot:
        _check_writable("--plot", args.plot, PLOT_SUFFIXES)

    estimators = args.estimators or list(DEFAULT_ESTIMATORS)

    def run(prog: Any) -> Any:
        with _executor(args) as ex:
            return compare(
                q,
                p,
                estimators,
                args.n,
                args.seed,
                workers=args.workers,
                progress=prog,
                executor=ex,
            )

    return _run_and_report(args, "compare", run)


def _cmd_gradients(args: argparse.Namespace) -> int:
    import importlib.util

    from klest import KlestError

    if importlib.util.find_spec("torch") is None:
        raise KlestError(
            "klest gradients differentiates klest.rl, which needs PyTorch: install torch "
            "(its CPU build is enough), e.g. pip install 'klest[torch]'"
        )
    from klest.lab.gradients import format_gradient_rows, plot_training, run_gradients

    if args.mismatch is not None:
        return _gradients_mismatch(args)
    if args.plot:
        _check_writable("--plot", args.plot, PLOT_SUFFIXES)
        if args.steps == 0:
            raise _UsageError("--plot draws the training curves: it needs --steps > 0")
    rows, history = run_gradients(
        V=args.V,
        T=args.T,
        B=args.B,
        distance=args.distance,
        off_policy=args.off_policy,
        seed=args.seed,
        presets=not args.no_presets,
        steps=args.steps,
        beta=args.beta,
        eos=args.eos,
    )
    _print(format_gradient_rows(rows, args.format))
    if args.plot:
        plot_training(history, args.plot)
    return 0


def _gradients_mismatch(args: argparse.Namespace) -> int:
    from klest.lab import mismatch_lab as ml

    if args.plot:
        _check_writable("--plot", args.plot, PLOT_SUFFIXES)
    kw = {"V": args.V, "T": args.T, "B": args.B, "distance": args.distance, "seed": args.seed}
    rows = ml.run_mismatch(args.mismatch, presets=not args.no_presets, eos=args.eos, **kw)
    _print(ml.format_mismatch_rows(rows, args.format))
    if args.plot:
        ml.plot_mismatch(ml.sweep_mismatch(eos=args.eos, **kw), args.plot)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from klest.lab.experiments import DEFAULT_ESTIMATORS, sweep, sweep_values
    from klest.lab.report import format_rows

    name, values, log = sweep_values(args.vary)
    _check_writable("--out", args.out, (".json", ".csv"))
    if args.plot:
        _check_writable("--plot", args.plot, PLOT_SUFFIXES)

    def on_point(i: int, n_points: int, rows: list[dict[str, Any]]) -> None:
        if not args.quiet:
            sys.stderr.write(
                f"point {i + 1}/{n_points}: {name} = {values[i]:g} saved to {args.out}\n"
            )

    prog = _Progress(not args.quiet, "sweep point")
    stack = contextlib.ExitStack()
    try:
        ex = stack.enter_context(_executor(args))
        rows = sweep(
            _template("--q", args.q, name, values[0]),
            _template("--p", args.p, name, values[0]),
            name,
            values,
            args.estimators or list(DEFAULT_ESTIMATORS),
            args.n,
            args.seed,
            out=args.out,
            workers=args.workers,
            on_point=on_point,
            progress=prog,
            executor=ex,
        )
    except KeyboardInterrupt:
        prog.close()
        _error(f"interrupted; finished points are in {args.out}: run the same command to resume")
        return EXIT_INTERRUPTED
    finally:
        prog.close()
        stack.close()
    _print(format_rows(rows, args.format))
    if args.plot:
        from klest.lab.plots import plot_sweep

        plot_sweep(rows, args.plot, log_x=log)
    return 0


class _SpecFailure(Exception):
    def __init__(self, option: str, err: Exception) -> None:
        self.option = option
        self.err = err


def _spec(option: str, text: str) -> Any:
    from klest.lab.specs import parse

    try:
        return parse(text)
    except Exception as e:
        raise _SpecFailure(option, e) from None


def _template(option: str, text: str, name: str, value: float) -> str:
    from klest.lab.specs import parse

    try:
        parse(text, variables={name: value})
    except Exception as e:
        raise _SpecFailure(option, e) from None
    return text


def _error(message: str) -> None:
    sys.stderr.write(f"klest: error: {message}\n")
    sys.stderr.flush()


def _warn(message: str) -> None:
    sys.stderr.write(f"klest: warning: {message}\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``klest`` console script; returns the exit status."""
    from klest import KlestError

    parser = _build_parser()
    try:
        _load_plugins(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        handler = {
            "reproduce": _cmd_reproduce,
            "compare": _cmd_compare,
            "sweep": _cmd_sweep,
            "gradients": _cmd_gradients,
        }[args.command]
        return handler(args)
    except _UsageError as e:
        _error(f"{e} (see klest --help)")
        return EXIT_USAGE
    except _PathError as e:
        _error(str(e))
        return EXIT_USAGE
    except _SpecFailure as e:
        from klest.lab.specs import SpecError

        if isinstance(e.err, SpecError):
            _error(f"{e.option}: {e.err.reason} (column {e.err.position + 1})")
            lines = str(e.err).split("\n")[1:]
            sys.stderr.write("\n".join(lines) + "\n")
        else:
            _error(f"{e.option}: {str(e.err).splitlines()[0]}")
        return EXIT_USAGE
    except KlestError as e:
        _error(str(e).splitlines()[0].replace("`", ""))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except OSError as e:
        _error(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))
        return 1
    except (ArithmeticError, ValueError) as e:
        # numbers beyond what the computation can represent, for input the checks let through
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        _error(f"cannot compute this ({type(e).__name__}: {text}); try less extreme parameters")
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
