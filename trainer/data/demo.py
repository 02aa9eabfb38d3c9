"""The offline demo corpus: the running Python's own standard-library sources.

Every machine with Python has them, so the demo trains on real text without
downloading anything. Third-party packages (site-packages), the regression
test suite and compiled modules are left out: what remains is ~12 MB of
hand-written Python.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

_SKIP = {"site-packages", "dist-packages", "test", "lib-dynload", "__pycache__", "idlelib"}


def stdlib_sources() -> list[Path]:
    """Top-level modules and packages of the standard library (sorted, deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    entries = []
    for entry in sorted(root.iterdir()):
        if entry.name in _SKIP or entry.name.startswith("config-"):
            continue
        if entry.is_dir() or entry.suffix == ".py":
            entries.append(entry)
    return entries
