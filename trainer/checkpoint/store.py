"""Checkpoint directories on disk: commit, list, verify, choose, prune. No torch.

Layout: ``<checkpoint.dir>/step-NNNNNNNN/`` holds DCP's files (``.metadata``
and one ``__<rank>_<i>.distcp`` per writing rank) and, once committed,
``manifest.json``. The manifest is written last - temp file, fsync, rename,
fsync of the directory - after every rank's files are on disk; a directory
without one never happened (a save that died half-way) and is removed by the
next commit. The manifest records what resuming and inspecting need without
reading the tensors: step, tokens, layout, the model's logical shapes and their
hash, the config, every file's size and sha256, and the save's durations.

``choose`` picks the checkpoint to resume from: the newest committed one whose
files all match their manifest; a damaged one is reported in one warning line
naming the checkpoint and the file, and the previous one is tried.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.atomic import write_json_atomic
from trainer.errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT = "megamoe-checkpoint"
VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def shape_hash(shapes: dict[str, list[int] | tuple[int, ...]]) -> str:
    """sha256 over the sorted (name, shape) pairs: equal iff the models have equal shapes."""
    text = json.dumps(sorted((k, list(v)) for k, v in shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def commit(path: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Checksum every file of a finished save and write its manifest (atomically, last)."""
    files = {}
    for f in sorted(path.iterdir()):
        if f.is_file() and f.name != MANIFEST and not f.name.endswith(".tmp"):
            files[f.name] = {"bytes": f.stat().st_size, "sha256": file_digest(f)}
    manifest = {"format": FORMAT, "version": VERSION, **fields, "files": files}
    manifest["bytes"] = sum(f["bytes"] for f in files.values())
    write_json_atomic(path / MANIFEST, manifest)
    return manifest


@dataclass
class Entry:
    step: int
    path: Path
    manifest: dict[str, Any] | None  # None: never committed (or an unreadable manifest)
    problem: str = ""  # why the manifest is unusable, when it is present but bad


def scan(root: str | Path) -> list[Entry]:
    """Every ``step-*`` directory under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    entries = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if not m or not d.is_dir():
            continue
        entries.append(_entry(int(m.group(1)), d))
    return sorted(entries, key=lambda e: -e.step)


def _entry(step: int, d: Path) -> Entry:
    path = d / MANIFEST
    if not path.exists():
        return Entry(step, d, None)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return Entry(step, d, None, f"{MANIFEST}: unreadable ({exc})")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return Entry(step, d, None, f"{MANIFEST}: not a megamoe checkpoint manifest")
    return Entry(step, d, manifest)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of one checkpoint directory, or CheckpointError naming what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: no such directory")
    e = _entry(-1, path)
    if e.manifest is None:
        reason = e.problem or f"{MANIFEST}: missing (the save never committed)"
        raise CheckpointError(f"checkpoint {path}: {reason}")
    return e.manifest


def verify(path: str | Path, manifest: dict[str, Any] | None = None) -> str | None:
    """Re-read every file and check it against the manifest: None, or 'FILE: reason'."""
    path = Path(path)
    if manifest is None:
        try:
            manifest = read_manifest(path)
        except CheckpointError as exc:
            return str(exc).split(": ", 1)[1]
    for name, want in sorted(manifest.get("files", {}).items()):
        f = path / name
        if not f.is_file():
            return f"{name}: missing"
        size = f.stat().st_size
        if size != want["bytes"]:
            return f"{name}: {size} bytes, the manifest says {want['bytes']} (truncated?)"
        if file_digest(f) != want["sha256"]:
            return f"{name}: sha256 mismatch (corrupt)"
    return None


def committed(root: str | Path) -> list[Entry]:
    return [e for e in scan(root) if e.manifest is not None]


def commit_id(path: str | Path, manifest: dict) -> str:
    """One commit of a checkpoint directory: ``PATH@CREATED`` (a step re-saved later into
    the same directory is another commit)."""
    return f"{path}@{manifest.get('created_unix', 0)!r}"


def choose(
    root: str | Path, warn: Callable[[str], None], skip: Collection[str] = ()
) -> Entry | None:
    """The newest committed checkpoint that verifies and is not in ``skip`` (commit ids:
    restores from them failed before); damaged or skipped ones are warned about."""
    for e in scan(root):
        if e.manifest is not None and commit_id(e.path, e.manifest) in skip:
            warn(
                f"checkpoint {e.path}: a restore from it failed before; falling back to the "
                "previous checkpoint"
            )
            continue
        if e.manifest is None:
            reason = e.problem or f"{MANIFEST} missing (the save never committed)"
            warn(f"checkpoint {e.path}: {reason}; falling back to the previous checkpoint")
            continue
        problem = verify(e.path, e.manifest)
        if problem is None:
            return e
        warn(f"checkpoint {e.path}: {problem}; falling back to the previous checkpoint")
    return None


def prune(root: str | Path, keep: int, keep_every: int, now_step: int) -> list[Path]:
    """Delete committed checkpoints beyond the newest ``keep`` (those at a step divisible by
    ``keep_every`` stay) and uncommitted directories older than ``now_step``."""
    removed = []
    kept = 0
    for e in scan(root):
        if e.manifest is None:
            if e.step < now_step:
                shutil.rmtree(e.path, ignore_errors=True)
                removed.append(e.path)
            continue
        kept += 1
        if kept <= keep or (keep_every and e.step % keep_every == 0):
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(e.path)
    return removed


def describe(e: Entry, now: float | None = None) -> dict[str, Any]:
    """One committed checkpoint as ``megamoe checkpoint list`` reports it."""
    m = e.manifest or {}
    created = m.get("created_unix", 0.0)
    layout = m.get("layout", {})
    return {
        "step": e.step,
        "path": str(e.path),
        "layout": layout,
        "world": layout.get("world"),
        "bytes": m.get("bytes", 0),
        "tokens": m.get("tokens"),
        "age_s": max(0.0, (now or time.time()) - created) if created else None,
    }
