"""Checkpoint boxes and directories without training: the flat-range cut, commit,
verification, the choice of checkpoint to resume from, and retention."""

import json
import os

import pytest
import torch

from trainer.checkpoint import store
from trainer.checkpoint.boxes import flat_range_boxes, intersect
from trainer.errors import CheckpointError


def _slices(offsets, sizes):
    return tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))


@pytest.mark.parametrize("shape", [(7,), (4, 6), (3, 4, 5), (2, 3, 2, 3)])
def test_flat_range_boxes_cover_exactly_the_range_in_flat_order(shape):
    numel = torch.Size(shape).numel()
    index = torch.arange(numel).view(shape)
    for start in range(numel):
        for stop in range(start + 1, numel + 1):
            boxes = flat_range_boxes(shape, start, stop)
            assert len(boxes) <= 2 * len(shape) - 1
            pieces = [index[_slices(off, size)].flatten() for off, size in boxes]
            assert torch.equal(torch.cat(pieces), torch.arange(start, stop)), (start, stop)


def test_intersect():
    assert intersect(((0, 0), (4, 6)), ((2, 3), (4, 4))) == ((2, 3), (2, 3))
    assert intersect(((0, 0), (2, 2)), ((2, 0), (1, 2))) is None


def _save(root, step, files=None):
    d = store.step_dir(root, step)
    d.mkdir(parents=True)
    for name, data in (files or {".metadata": b"meta", "__0_0.distcp": b"x" * 100}).items():
        (d / name).write_bytes(data)
    return d


def _commit(root, step):
    d = _save(root, step)
    store.commit(
        d, {"step": step, "tokens": step * 10, "created_unix": 0.0, "layout": {"world": 1}}
    )
    return d


def test_commit_writes_a_manifest_with_every_file_and_verify_reads_them_back(tmp_path):
    d = _commit(tmp_path, 5)
    manifest = json.loads((d / store.MANIFEST).read_text())
    assert manifest["step"] == 5 and manifest["bytes"] == 104
    assert set(manifest["files"]) == {".metadata", "__0_0.distcp"}
    assert store.verify(d) is None
    assert not list(d.glob("*.tmp"))  # the temp file was renamed over the manifest


def test_verify_names_a_truncated_and_a_corrupt_file(tmp_path):
    d = _commit(tmp_path, 5)
    with open(d / "__0_0.distcp", "r+b") as fh:
        fh.truncate(60)
    assert store.verify(d).startswith("__0_0.distcp: 60 bytes, the manifest says 100")
    (d / "__0_0.distcp").write_bytes(b"y" * 100)
    assert store.verify(d) == "__0_0.distcp: sha256 mismatch (corrupt)"
    os.remove(d / ".metadata")
    assert store.verify(d) == ".metadata: missing"


def test_choose_falls_back_past_damaged_and_uncommitted_checkpoints(tmp_path):
    _commit(tmp_path, 10)
    bad = _commit(tmp_path, 20)
    (bad / "__0_0.distcp").write_bytes(b"z" * 100)
    _save(tmp_path, 30)  # died before its commit
    warnings = []
    chosen = store.choose(tmp_path, warnings.append)
    assert chosen.step == 10
    assert len(warnings) == 2
    assert "step-00000030" in warnings[0] and "manifest.json missing" in warnings[0]
    assert "step-00000020" in warnings[1] and "__0_0.distcp: sha256 mismatch" in warnings[1]
    assert store.choose(tmp_path / "nothing-here", warnings.append) is None


def test_read_manifest_errors_name_the_checkpoint(tmp_path):
    d = _save(tmp_path, 3)
    with pytest.raises(CheckpointError, match=r"step-00000003: manifest.json: missing"):
        store.read_manifest(d)
    (d / store.MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"manifest.json: unreadable"):
        store.read_manifest(d)


def test_prune_keeps_the_newest_and_every_keep_every_step(tmp_path):
    for step in (10, 20, 30, 40, 50):
        _commit(tmp_path, step)
    _save(tmp_path, 45)  # an abandoned save older than the newest commit
    store.prune(tmp_path, keep=2, keep_every=20, now_step=50)
    assert [e.step for e in store.scan(tmp_path)] == [50, 40, 20]


def test_shape_hash_depends_on_shapes_only():
    a = store.shape_hash({"w": [2, 3], "b": [3]})
    assert a == store.shape_hash({"b": (3,), "w": (2, 3)})
    assert a != store.shape_hash({"w": [3, 2], "b": [3]})
