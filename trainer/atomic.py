"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

The recipe: write a temporary file beside the target, fsync it, rename it over
the target (atomic on POSIX within one filesystem), then fsync the directory so
the rename itself survives a crash. The run summary, the data manifest, the
CPU-peak cache and the checkpoint manifest (written last, so its presence
commits a checkpoint) all go through here. No torch: the control plane uses it
too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: str | Path, obj: Any, indent: int = 1) -> None:
    """Write ``obj`` as JSON (keys in insertion order, newline at the end) atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=indent) + "\n").encode())
