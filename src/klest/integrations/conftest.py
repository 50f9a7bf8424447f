"""pytest only: doctest each adapter module only where its trainer is installed (it imports it)."""

import importlib.util

_NEEDS = {"trl.py": "trl", "verl.py": "verl", "openrlhf.py": "openrlhf"}
collect_ignore = [f for f, pkg in _NEEDS.items() if importlib.util.find_spec(pkg) is None]
