"""Layout-independent pieces of tensors for torch.distributed.checkpoint (DCP).

A checkpoint names every tensor by its place in the single-device reference
model (``blocks.7.ffn.experts.w1``, full logical shape [E, H, F]); a rank
writes only the boxes of it that it owns and DCP's metadata records where each
box sits. Loading into another layout asks DCP for the boxes the new layout
owns, and DCP reads the overlapping parts of whatever boxes were saved: that is
the resharding.

DCP expresses this with DTensor or ShardedTensor, whose shards are even splits
of one dimension. A ZeRO-1 shard is not: it is a contiguous range of a flat
buffer that starts and ends anywhere inside a parameter. ``flat_range_boxes``
cuts such a range into the few hyper-rectangles it covers, and ``Boxes``
hands them to DCP through its checkpointable protocol
(``__create_write_items__`` / ``__create_chunk_list__``), with the two planner
hooks that look a box up by its offset.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


def flat_range_boxes(shape: Sequence[int], start: int, stop: int) -> list[Box]:
    """The boxes that cover exactly the flat (C-order) elements [start, stop) of ``shape``.

    Each box is itself contiguous in C order, so its data is ``flat[a:b].view(sizes)``;
    boxes come in flat order. At most 2 * len(shape) - 1 of them.
    """
    shape = tuple(shape)
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,), (stop - start,))] if shape else [((), ())]
    row = 1
    for d in shape[1:]:
        row *= d
    first, last = start // row, (stop - 1) // row
    if first == last:  # inside one row: recurse into it
        inner = flat_range_boxes(shape[1:], start - first * row, stop - first * row)
        return [((first, *off), (1, *size)) for off, size in inner]
    boxes: list[Box] = []
    lo = first
    if start % row:
        boxes += [((first, *o), (1, *s)) for o, s in flat_range_boxes(shape[1:], start % row, row)]
        lo = first + 1
    hi = stop // row  # rows [lo, hi) are whole
    if hi > lo:
        boxes.append(((lo, *(0,) * (len(shape) - 1)), (hi - lo, *shape[1:])))
    if stop % row:
        boxes += [((hi, *o), (1, *s)) for o, s in flat_range_boxes(shape[1:], 0, stop % row)]
    return boxes


def intersect(a: Box, b: Box) -> Box | None:
    """The overlap of two boxes, or None."""
    offsets, sizes = [], []
    for ao, asz, bo, bsz in zip(*a, *b, strict=True):
        lo, hi = max(ao, bo), min(ao + asz, bo + bsz)
        if hi <= lo:
            return None
        offsets.append(lo)
        sizes.append(hi - lo)
    return tuple(offsets), tuple(sizes)


class Boxes:
    """Some boxes of one logical tensor of shape ``shape``, as DCP writes or fills them.

    ``boxes`` maps each box's offsets to its tensor (sizes = the tensor's shape). For a
    save the tensors are host copies; for a load they are views into the live state,
    which DCP overwrites in place.
    """

    def __init__(self, shape: Sequence[int], boxes: dict[tuple[int, ...], torch.Tensor]) -> None:
        self.shape = torch.Size(shape)
        self.boxes = boxes

    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size(offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(torch.Size(offsets), t.shape),
                    properties=TensorProperties.create_from_tensor(t),
                    size=self.shape,
                ),
            )
            for offsets, t in self.boxes.items()
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(torch.Size(o), t.shape) for o, t in self.boxes.items()]

    def find(self, offsets: Sequence[int]) -> torch.Tensor:
        return self.boxes[tuple(offsets)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.boxes.values())


class BoxSavePlanner(DefaultSavePlanner):
    """DCP's default save planner, able to look a ``Boxes`` piece up by its offset."""

    def lookup_object(self, index: MetadataIndex):
        obj = self.state_dict.get(index.fqn)
        if isinstance(obj, Boxes):
            return obj.find(index.offset)
        return super().lookup_object(index)


class BoxLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner for state that holds ``Boxes``.

    The default planner's set-up walks the state dict to materialise meta tensors and
    replaces values it does not know (such as ``Boxes``) by None; they are put back.
    Keys of the checkpoint that the state dict lacks are fine (another layout's RNG
    states, for instance).
    """

    def __init__(self) -> None:
        super().__init__(allow_partial_load=True)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        boxes = {k: v for k, v in state_dict.items() if isinstance(v, Boxes)}
        super().set_up_planner(state_dict, metadata, is_coordinator)
        state_dict.update(boxes)
        self.state_dict.update(boxes)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict.get(index.fqn)
        if isinstance(obj, Boxes):
            return obj.find(index.offset)
        return super().lookup_tensor(index)
