"""pytest, whole repository: leave out of the doctest collection of ``src/klest`` the trainer
adapters whose trainer is not installed here (importing them imports it). verl and OpenRLHF run in
their own environment (``make test-trainers``), whose run collects only their tests."""

from __future__ import annotations

import importlib.util


def _missing(*modules: str) -> bool:
    return any(importlib.util.find_spec(m) is None for m in modules)


collect_ignore = [
    path
    for path, needs in (
        ("src/klest/integrations/verl.py", ("verl",)),
        ("src/klest/integrations/openrlhf.py", ("openrlhf", "deepspeed")),
    )
    if _missing(*needs)
]
