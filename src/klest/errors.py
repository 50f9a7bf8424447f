"""The one exception type klest raises for bad input."""

from __future__ import annotations

from typing import Any

__all__ = ["KlestError"]


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    kind = type(value).__module__.split(".")[0] + "." + type(value).__name__
    if shape is None and dtype is None:
        return kind
    return f"{kind} of shape {tuple(shape) if shape is not None else '?'} and dtype {dtype}"


class KlestError(ValueError):
    """Bad input to a klest function, raised before any arithmetic on it.

    The message names the argument and, where there is one, its shape and dtype. The same facts are
    attributes: ``argument`` (the parameter's name or ``None``), ``shape`` and ``dtype``.
    """

    def __init__(self, message: str, *, argument: str | None = None, value: Any = None) -> None:
        self.argument = argument
        self.shape = tuple(value.shape) if getattr(value, "shape", None) is not None else None
        self.dtype = getattr(value, "dtype", None)
        if argument is not None:
            where = f"`{argument}`"
            if value is not None:
                where += f" ({_describe(value)})"
            message = f"{where}: {message}"
        super().__init__(message)
