"""Figures (matplotlib, imported lazily with the Agg backend): a sweep's bias/true and
stdev/true against the swept parameter, and a table's measured against exact stdev/true."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_rows", "plot_sweep"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _f(v: Any) -> float:
    return math.nan if v is None else float(v)


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | Path, *, log_x: bool = False) -> Path:
    """Two panels against the swept value, one line per estimator: bias/true with ±2 SE bars
    (symmetric-log y) and stdev/true (log y). Hollow markers: stdev flagged unreliable; dashed:
    exact values where known."""
    plt = _pyplot()
    path = Path(path)
    param = rows[0]["param"] if rows else "value"
    estimators = list(dict.fromkeys(r["estimator"] for r in rows))
    fig, (ax_b, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for i, est in enumerate(estimators):
        rs = sorted((r for r in rows if r["estimator"] == est), key=lambda r: r["value"])
        x = [float(r["value"]) for r in rs]
        color = f"C{i % 10}"
        b = [_f(r["bias_over_true"]) for r in rs]
        se = [2 * _f(r["stderr_bias_over_true"]) for r in rs]
        ax_b.errorbar(x, b, yerr=se, color=color, marker="o", ms=3, lw=1.2, capsize=2, label=est)
        eb = [_f(r["expected_bias_over_true"]) for r in rs]
        if any(math.isfinite(v) for v in eb):
            ax_b.plot(x, eb, color=color, ls="--", lw=0.8)
        s = [_f(r["stdev_over_true"]) for r in rs]
        ax_s.plot(x, s, color=color, lw=1.2, label=est)
        good = [(xx, v) for xx, v, r in zip(x, s, rs, strict=True) if r["stdev_reliable"]]
        bad = [(xx, v) for xx, v, r in zip(x, s, rs, strict=True) if not r["stdev_reliable"]]
        if good:
            ax_s.plot(*zip(*good, strict=True), "o", color=color, ms=3)
        if bad:
            ax_s.plot(*zip(*bad, strict=True), "o", mfc="none", color=color, ms=6)
        es = [_f(r["expected_stdev_over_true"]) for r in rs]
        if any(math.isfinite(v) for v in es):
            ax_s.plot(x, es, color=color, ls="--", lw=0.8)
    ax_b.set_yscale("symlog", linthresh=1e-3)
    ax_b.axhline(0, color="0.6", lw=0.6)
    ax_s.set_yscale("log")
    for ax in (ax_b, ax_s):
        ax.set_xlabel(param)
        if log_x:
            ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.25)
    ax_b.set_ylabel("bias / true  (±2 SE)")
    ax_s.set_ylabel("stdev / true  (per sample)")
    q = rows[0]["q_template"] if rows else ""
    p = rows[0]["p_template"] if rows else ""
    n = rows[0]["n"] if rows else 0
    fig.suptitle(
        f"q = {q},  p = {p},  n = {n:,}\ndashed: exact;  hollow: stdev unreliable", fontsize=10
    )
    ax_s.legend(fontsize=8, loc="best")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_rows(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One panel per p: measured stdev/true per estimator (dots, log scale) with the exact value
    as a black bar; each tick label carries the measured bias/true ± 2 SE."""
    plt = _pyplot()
    path = Path(path)
    ps = list(dict.fromkeys(r["p"] for r in rows))
    estimators = list(dict.fromkeys(r["estimator"] for r in rows))
    fig, axes = plt.subplots(1, len(ps), figsize=(4.8 * len(ps), 4.2), squeeze=False)
    for ax, p in zip(axes[0], ps, strict=True):
        rs = [r for r in rows if r["p"] == p]
        for x, r in enumerate(rs):
            color = f"C{estimators.index(r['estimator']) % 10}"
            v = _f(r["stdev_over_true"])
            if r["stdev_reliable"]:
                ax.plot([x], [v], "o", color=color, ms=8)
            else:
                ax.plot([x], [v], "o", mfc="none", color=color, ms=10)
            ex = _f(r["expected_stdev_over_true"])
            if math.isfinite(ex):
                ax.plot([x - 0.3, x + 0.3], [ex, ex], color="k", lw=1.5)
        labels = [
            f"{r['estimator']}\nbias {_f(r['bias_over_true']):+.2g}"
            + (f"\n±{2 * _f(r['stderr_bias_over_true']):.1g}" if r["stdev_reliable"] else "\n± ?")
            for r in rs
        ]
        ax.set_xticks(range(len(rs)), labels, fontsize=7)
        ax.set_xlim(-0.6, len(rs) - 0.4)
        ax.set_yscale("log")
        ax.grid(True, which="both", axis="y", alpha=0.25)
        ax.set_title(f"p = {p}", fontsize=10)
        ax.set_ylabel("stdev / true (dots: measured, bars: exact)")
    n = rows[0]["n"] if rows else 0
    q = rows[0]["q"] if rows else ""
    fig.suptitle(
        f"q = {q}, n = {n:,}\nhollow: stdev unreliable; bias/true ± 2 SE under each name",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
