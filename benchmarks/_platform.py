"""What a benchmark's figures depend on, printed with them: NumPy's SIMD kernels and klest[fast]."""

from __future__ import annotations

import os
import platform

import numpy as np


def describe() -> str:
    """Lines naming the CPU, NumPy's SIMD extensions (np.show_config) and whether numba is used."""
    lines = [f"cpu: {_cpu()} ({os.cpu_count()} logical cores), numpy {np.__version__}"]
    try:
        simd = np.show_config(mode="dicts")["SIMD Extensions"]
        lines.append(
            "numpy SIMD: baseline "
            + " ".join(simd.get("baseline", []))
            + "; found "
            + " ".join(simd.get("found", []))
            + "; not found "
            + " ".join(simd.get("not found", []))
        )
    except Exception as exc:  # older NumPy: no dict mode
        lines.append(f"numpy SIMD: unknown ({exc})")
    lines.append(f"klest[fast]: {fast_status()}")
    return "\n".join(lines)


def fast_status() -> str:
    from klest import _fast

    if _fast._nb is None:
        return "numba not installed: pure NumPy"
    state = "used" if _fast.available() else "installed but switched off (KLEST_FAST / options)"
    return f"numba {_fast._nb.__version__}, {state}"


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
