"""Rows to text: an aligned plain table, Markdown, CSV or JSON (the JSON keys are stable)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .experiments import rows_to_csv, rows_to_json

__all__ = ["FORMATS", "format_rows"]

FORMATS = ("table", "markdown", "csv", "json")

_TARGET_LABEL = {"reverse_kl": "KL(q‖p)", "forward_kl": "KL(p‖q)"}


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if math.isnan(v):
            return "nan"
        if v == 0:
            return "0"
        if abs(v) >= 1e6 or abs(v) < 1e-4:
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


def _cells(r: dict[str, Any], with_q: bool = False) -> list[str]:
    reliable = r.get("stdev_reliable", True)
    flag = "not measured*" if r.get("values_overflow") else "unreliable*"
    stdev = _num(r["stdev_over_true"]) if reliable else flag
    se = _num(r["stderr_bias_over_true"], 2) if reliable else flag
    true = _num(r["true_value"], 5)
    if r.get("truth_stderr") is not None:
        true += f" ±{_num(r['truth_stderr'], 2)}"
    return [
        *([r["q"]] if with_q else []),
        r["p"],
        r["estimator"],
        _TARGET_LABEL.get(r["target"], r["target"]),
        true,
        _num(r["bias_over_true"]),
        _num(r["expected_bias_over_true"]),
        se,
        stdev,
        _num(r["expected_stdev_over_true"]),
    ]


_HEADER = [
    "p",
    "estimator",
    "estimates",
    "true value",
    "bias/true",
    "exact",
    "± SE",
    "stdev/true",
    "exact",
]


def _varies_q(rows: Sequence[dict[str, Any]]) -> bool:
    """True when the rows have more than one q (a sweep of q's parameter): q gets a column."""
    return len({r["q"] for r in rows}) > 1


def _header(with_q: bool) -> list[str]:
    return ["q", *_HEADER] if with_q else list(_HEADER)


def _notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    notes = []
    with_q = _varies_q(rows)

    def pair(r: dict[str, Any]) -> str:
        return f"{r['p']} from {r['q']}" if with_q else str(r["p"])

    sources = sorted({f"{r['target']} of {pair(r)}: {r['truth_source']}" for r in rows})
    if len(sources) <= 4:
        notes.append("true values: " + "; ".join(sources))
    else:
        notes.append("true values from: " + ", ".join(sorted({r["truth_source"] for r in rows})))
    infinite = sorted(
        {
            f"  {r['target']} of {pair(r)}: {r.get('truth_note') or 'diverges'}"
            for r in rows
            if isinstance(r.get("true_value"), float) and math.isinf(r["true_value"])
        }
    )
    if infinite:
        notes.append("true value +inf (every ratio to it undefined, '-'):")
        notes += infinite
    over = [r for r in rows if r.get("values_overflow")]
    if over:
        notes.append("* not measured: per-sample values beyond float64's range (about 1.8e308):")
        notes += [f"  {r['estimator']} vs {pair(r)}" for r in over]
    bad = [r for r in rows if not r.get("stdev_reliable", True) and not r.get("values_overflow")]
    if bad:
        notes.append(
            "* stdev unreliable: the per-sample variance may be infinite, the printed stdev would "
            "not settle as n grows:"
        )
        for r in bad:
            why = []
            if r.get("variance_finite") is False:
                why.append("exact second moment is infinite")
            why.append(f"one sample carries {100 * r['max_share']:.0f}% of the sum of squares")
            notes.append(
                f"  {r['estimator']} vs {pair(r)}: {'; '.join(why)} "
                f"(sample stdev/true {_num(r['stdev_over_true'])})"
            )
    if rows:
        n = rows[0]["n"]
        seed = (
            f"sweep seed {rows[0]['sweep_seed']} (one derived seed per point)"
            if "sweep_seed" in rows[0]
            else f"seed {rows[0]['seed']}"
        )
        q = "q per row" if with_q else f"q = {rows[0]['q']}"
        notes.append(
            f"{q}, n = {n:,} samples, {seed}; ± SE is the Monte "
            "Carlo standard error of bias/true; 'exact' columns: closed form, exact sum or "
            "quadrature ('-' where unavailable)"
        )
    return notes


def _table(rows: Sequence[dict[str, Any]]) -> str:
    with_q = _varies_q(rows)
    header = _header(with_q)
    body = [_cells(r, with_q) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    right = set(range(3 + with_q, len(header)))

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    prev = None
    for r, b in zip(rows, body, strict=True):
        if prev is not None and (r["q"], r["p"]) != prev:
            out.append("")
        prev = (r["q"], r["p"])
        out.append(line(b))
    return "\n".join([*out, "", *_notes(rows)])


def _markdown(rows: Sequence[dict[str, Any]]) -> str:
    with_q = _varies_q(rows)
    header = _header(with_q)
    out = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < 3 + with_q else "---:" for i in range(len(header))) + "|",
    ]
    for r in rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(r, with_q)) + " |")
    return "\n".join([*out, "", *_notes(rows)])


def format_rows(rows: Sequence[dict[str, Any]], fmt: str = "table") -> str:
    """Render rows as ``table`` (aligned text), ``markdown``, ``csv`` or ``json``."""
    if fmt == "json":
        return rows_to_json(rows)
    if fmt == "csv":
        return rows_to_csv(rows).rstrip("\n")
    if fmt == "markdown":
        return _markdown(rows)
    return _table(rows)
