"""Shared machinery of :mod:`klest.logits`: input checks, row chunks, vocab-parallel reductions.

Every function here works on *rows*: the last axis of a logits tensor is the vocabulary (or this
rank's shard of it), the leading axes are positions. Rows are processed in chunks of a few rows,
read as views of the caller's tensor (never copied as a whole), converted to the computation dtype
chunk by chunk.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from .._torch import check_mask
from ..errors import KlestError

__all__ = [
    "CHUNK_ELEMENTS",
    "Group",
    "Plan",
    "check_logits",
    "check_temperature",
    "compute_dtype",
    "group_of",
    "plan",
    "real_arg",
    "rows_of",
]

# Elements per intra-op thread of one chunk buffer: 2^19 floats = 2 MiB (three rows of a 150k
# vocabulary), so a chunk's buffers stay in L2/L3 while each op is large enough that the few
# dozen parallel regions per chunk cost little. A chunk is at least one row per thread (row-wise
# kernels like softmax split rows over threads). Tune with ``chunk_size``.
CHUNK_ELEMENTS = 1 << 19


def compute_dtype(*xs: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (16-bit inputs are computed in float32)."""
    f64 = any(x is not None and x.dtype == torch.float64 for x in xs)
    return torch.float64 if f64 else torch.float32


def check_logits(name: str, x: Any, *, vocab_axis: bool = True) -> torch.Tensor:
    """A floating torch tensor with at least one (vocabulary) axis."""
    if not isinstance(x, torch.Tensor):
        raise KlestError("klest.logits works on torch tensors", argument=name, value=x)
    if not x.is_floating_point():
        raise KlestError(
            "logits must have a floating dtype (float16, bfloat16, float32, float64)",
            argument=name,
            value=x,
        )
    if vocab_axis and (x.ndim == 0 or x.shape[-1] == 0):
        raise KlestError("needs a non-empty last (vocabulary) axis", argument=name, value=x)
    return x


def real_arg(name: str, x: Any) -> float:
    """``x`` as a float: a real number (not a bool or a str) or a 0-d array/tensor; else a
    KlestError naming ``name`` (never a raw TypeError/ValueError from ``float()``)."""
    if isinstance(x, bool | str) or not (
        isinstance(x, numbers.Real) or getattr(x, "ndim", None) == 0
    ):
        raise KlestError(f"must be a real number, got {type(x).__name__}", argument=name, value=x)
    try:
        return float(x)
    except (TypeError, ValueError, RuntimeError):
        raise KlestError("must be a real number", argument=name, value=x) from None


def check_temperature(temperature: Any) -> float:
    t = real_arg("temperature", temperature)
    if not (t > 0.0 and math.isfinite(t)):
        raise KlestError(
            f"must be a finite number > 0, got {temperature!r}", argument="temperature"
        )
    return t


def check_same(name: str, x: torch.Tensor, ref: torch.Tensor, ref_name: str = "logits") -> None:
    if tuple(x.shape) != tuple(ref.shape):
        what = "vocabulary size" if x.shape[:-1] == ref.shape[:-1] else "shape"
        raise KlestError(
            f"{what} differs from {ref_name}'s {tuple(ref.shape)} (nothing is broadcast)",
            argument=name,
            value=x,
        )
    if x.device != ref.device:
        raise KlestError(f"is on {x.device}, {ref_name} on {ref.device}", argument=name, value=x)


# --------------------------------------------------------------------------- row views and chunks


def rows_of(x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``x`` [..., V] as 2-D row views (flat row offset, [n, V]) without copying.

    One view when the leading axes can be flattened (contiguous input); otherwise one view per
    index of the outer axes (e.g. ``logits[:, :-1]`` of a [B, T, V] tensor gives B views)."""
    V = x.shape[-1]
    if x.ndim <= 2:
        return [(0, x.unsqueeze(0) if x.ndim == 1 else x)]  # any strides: ops read views
    try:
        return [(0, x.view(-1, V))]
    except RuntimeError:
        pass
    out: list[tuple[int, torch.Tensor]] = []
    per = math.prod(x.shape[1:-1])
    for i in range(x.shape[0]):
        out.extend((i * per + o, v) for o, v in rows_of(x[i]))
    return out


def _block(segments: list[tuple[int, torch.Tensor]], start: int, stop: int) -> torch.Tensor:
    for off, v in segments:  # few segments; a linear scan is fine
        if off <= start and stop <= off + v.shape[0]:
            return v[start - off : stop - off]
    raise AssertionError("chunk crosses a segment boundary")  # pragma: no cover


@dataclass(frozen=True)
class Plan:
    """Chunks ``(start, stop)`` of valid flat rows, none crossing a view boundary of any input."""

    n_rows: int
    chunks: list[tuple[int, int]]
    all_valid: bool

    def block(self, segments: list[tuple[int, torch.Tensor]], c: tuple[int, int]) -> torch.Tensor:
        return _block(segments, c[0], c[1])


def plan(
    n_rows: int,
    vocab: int,
    segment_lists: list[list[tuple[int, torch.Tensor]]],
    mask: torch.Tensor | None,
    chunk_size: int | None,
) -> Plan:
    """Runs of valid rows (mask True) cut into chunks of ``chunk_size`` rows (default: about
    :data:`CHUNK_ELEMENTS` elements per intra-op thread)."""
    if chunk_size is None:
        rows = max(1, CHUNK_ELEMENTS // max(vocab, 1)) * max(1, torch.get_num_threads())
    else:
        rows = int(chunk_size)
        if rows < 1:
            raise KlestError(
                f"must be a positive number of rows, got {chunk_size}", argument="chunk_size"
            )
    cuts = {0, n_rows}
    for segs in segment_lists:
        cuts.update(off for off, _ in segs)
    if mask is None:
        runs = [(0, n_rows)]
    else:
        m = mask.reshape(-1).to("cpu", torch.int8)
        edges = torch.diff(m, prepend=m.new_zeros(1), append=m.new_zeros(1))
        starts = torch.nonzero(edges == 1).flatten().tolist()
        stops = torch.nonzero(edges == -1).flatten().tolist()
        runs = list(zip(starts, stops, strict=True))
    bounds = sorted(cuts)
    chunks: list[tuple[int, int]] = []
    for a, b in runs:
        inner = [c for c in bounds if a < c < b]
        for lo, hi in zip([a, *inner], [*inner, b], strict=True):
            chunks.extend((s, min(s + rows, hi)) for s in range(lo, hi, rows))
    return Plan(n_rows, chunks, mask is None)


def flat_mask(mask: Any, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    """The per-position mask (bool or 0/1) as given by :func:`klest.rl.aggregate`'s rules."""
    return check_mask(mask, shape, device)


# --------------------------------------------------------------------------- vocab parallelism


@dataclass(frozen=True)
class Group:
    """The process group over which the vocabulary is sharded (``world == 1``: not sharded)."""

    handle: Any
    world: int
    rank: int
    vocab_local: int

    @property
    def offset(self) -> int:
        """Global id of this rank's first vocabulary entry (shards are equal and in rank order)."""
        return self.rank * self.vocab_local

    @property
    def vocab(self) -> int:
        return self.world * self.vocab_local

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.handle)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.handle)
        return t


def group_of(process_group: Any, vocab_local: int, device: torch.device) -> Group:
    """Resolve ``process_group`` (None: no vocabulary sharding) and check the shards are equal."""
    if process_group is None:
        return Group(None, 1, 0, vocab_local)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise KlestError(
            "a process group was given but torch.distributed is not initialised",
            argument="process_group",
        )
    world = int(dist.get_world_size(process_group))
    rank = int(dist.get_rank(process_group))
    g = Group(process_group, world, rank, vocab_local)
    if world > 1:
        sizes = torch.tensor([float(vocab_local), -float(vocab_local)], device=device)
        g.max_(sizes)  # max of V and max of -V: equal shards iff both extremes agree
        if int(sizes[0]) != vocab_local or int(-sizes[1]) != vocab_local:
            raise KlestError(
                f"vocabulary shards must be of equal size on every rank; this rank holds "
                f"{vocab_local} entries, others between {int(-sizes[1])} and {int(sizes[0])}",
                argument="process_group",
            )
    return g


def safe_max(m: torch.Tensor) -> torch.Tensor:
    """Row maxima with -inf (an all -inf row or shard) replaced by 0, so x - m stays -inf, not
    NaN. NaN and +inf are kept (they are reported as bad input)."""
    return torch.where(m == -math.inf, torch.zeros((), dtype=m.dtype, device=m.device), m)


def combine_lse(m: torch.Tensor, sums: torch.Tensor, g: Group) -> tuple[torch.Tensor, torch.Tensor]:
    """Global row max M and sums Σ_ranks sums_r · e^{m_r - M}, from local (max, sums) per row.

    ``m`` [n], ``sums`` [n, k] local sums of terms carrying the factor e^{x - m_r}."""
    if g.world == 1:
        return m, sums
    M = g.max_(m.clone())
    scale = torch.exp(safe_max(m) - safe_max(M))
    scale = torch.where(m == -math.inf, torch.zeros_like(scale), scale)
    out = sums * scale[:, None]
    # 0 * inf (an infinite local term on a shard whose max is below the global one) stays inf
    out = torch.where(torch.isinf(sums), sums, out)
    return M, g.sum_(out)


def raise_bad_rows(name: str, x: torch.Tensor, m: torch.Tensor, g: Group) -> None:
    """Raise (on every rank alike) if a row holds NaN or +inf, or is -inf everywhere."""
    flags = torch.stack([torch.isnan(m).sum(), (m == math.inf).sum(), (m == -math.inf).sum()]).to(
        torch.float64
    )
    if g.world > 1:
        # a row is all -inf only if it is -inf on every shard: count per row across ranks
        allneg = g.sum_((m == -math.inf).to(torch.float64))
        flags[2] = (allneg == g.world).sum()
        flags[:2] = g.sum_(flags[:2].clone())
    nan, pinf, neg = (int(v) for v in flags.tolist())
    if nan:
        raise KlestError(f"contains NaN in {nan} row(s)", argument=name, value=x)
    if pinf:
        raise KlestError(f"contains +inf in {pinf} row(s)", argument=name, value=x)
    if neg:
        raise KlestError(
            f"{neg} row(s) are -inf everywhere (no token has positive probability)",
            argument=name,
            value=x,
        )
