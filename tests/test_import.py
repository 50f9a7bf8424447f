"""Importing klest imports no array backend beyond NumPy."""

from __future__ import annotations

import subprocess
import sys


def test_import_leaves_torch_and_jax_out():
    code = (
        "import sys, klest\n"
        "mods = ('torch', 'jax', 'jaxlib', 'scipy', 'matplotlib')\n"
        "heavy = [m for m in mods if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_surface_is_sorted_and_complete():
    import klest

    assert klest.__all__ == sorted(klest.__all__)
    for name in klest.__all__:
        assert hasattr(klest, name)
