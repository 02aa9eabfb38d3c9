"""Check what a benchmark needs before it starts, not in its last step.

    from bench._deps import require
    if a.png:
        require("matplotlib", why="--png")

A missing module ends the process at once with exit status 2 and one line on
stderr naming the module and the install command; a
missing corpus (``require_corpus``) likewise names how to prepare it.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

INSTALL = "pip install -e ."  # matplotlib is one of megamoe's dependencies


def missing(*modules: str) -> list[str]:
    """The modules of ``modules`` that cannot be imported (a broken install counts)."""
    out = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            out.append(name)
    return out


def require(*modules: str, why: str = "") -> None:
    """Exit with status 2 and an install hint unless every module imports."""
    absent = missing(*modules)
    if not absent:
        return
    script = Path(sys.argv[0]).name or "bench"
    need = f"{why} needs" if why else "needs"
    names = ", ".join(absent)
    print(
        f"{script}: error: {need} {names}, which is not installed: {INSTALL}",
        file=sys.stderr,
    )
    raise SystemExit(2)


def require_corpus(path: str) -> None:
    """Exit with status 2 unless ``path`` holds a prepared token corpus (its manifest)."""
    if (Path(path) / "manifest.json").is_file():
        return
    script = Path(sys.argv[0]).name or "bench"
    print(
        f"{script}: error: --data {path} holds no prepared corpus (no manifest.json): "
        f"`make demo`, or `megamoe data prepare --stdlib --output {path}`",
        file=sys.stderr,
    )
    raise SystemExit(2)
