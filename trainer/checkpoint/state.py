"""What a checkpoint holds, under names that do not depend on the layout.

Every parameter is saved under its name in the single-device reference model
(``blocks.<global layer>.attn.wqkv.weight``, ``blocks.<l>.ffn.experts.w1``
with all E experts, ``embed.weight``, ...) at its full logical shape, and so
are both AdamW moments (``optim.exp_avg.<name>``, ``optim.exp_avg_sq.<name>``).
A parameter's ``megamoe_place`` (set by ``trainer.parallel.model``) says which
boxes of the logical tensor a rank's local tensor holds; a one-process model
holds every tensor whole.

* One process (torch AdamW): the tensors are saved whole.
* N ranks (ZeRO-1): each rank saves exactly its optimizer shard - the range
  [a, b) of every flat buffer it steps - for the parameters and both moments,
  cut into boxes (``boxes.flat_range_boxes``) and placed in the logical
  tensors. Shards are disjoint, so every element is written once. On load a
  rank asks for the boxes of its full local parameters (no all-gather
  afterwards) and of its new optimizer shard.

Besides tensors: the training position (step, tokens, skipped steps, the AdamW
step count, the sampler's state), the loss history, and every rank's torch RNG
states (``rng.rank<r>``; a rank without one in the checkpoint keeps its own).
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.checkpoint.boxes import Box, Boxes, flat_range_boxes, intersect

MOMENTS = ("exp_avg", "exp_avg_sq")


def _place(name: str, p: torch.Tensor):
    """(reference name, logical shape, pieces) of a parameter; pieces are
    (local offsets, global offsets, sizes)."""
    place = getattr(p, "megamoe_place", None)
    if place is not None:
        return place.name, tuple(place.shape), place.pieces
    zeros = (0,) * p.dim()
    return name, tuple(p.shape), [(zeros, zeros, tuple(p.shape))]


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Logical shape of every parameter the model holds a part of, by reference name."""
    out = {}
    for name, p in model.named_parameters():
        ref, shape, _ = _place(name, p)
        out[ref] = shape
    return out


def _global_boxes(local_box: Box, pieces) -> list[tuple[Box, tuple[slice, ...]]]:
    """Where a box of the local tensor lands in the logical tensor: (global box, the
    slices of the local box that land there), one per piece it overlaps."""
    out = []
    for local_off, global_off, sizes in pieces:
        hit = intersect(local_box, (local_off, sizes))
        if hit is None:
            continue
        off, size = hit
        g = tuple(go + o - lo for go, o, lo in zip(global_off, off, local_off, strict=True))
        inner = tuple(
            slice(o - bo, o - bo + s) for o, bo, s in zip(off, local_box[0], size, strict=True)
        )
        out.append(((g, size), inner))
    return out


def _whole_boxes(p: torch.Tensor, pieces) -> dict[tuple[int, ...], torch.Tensor]:
    """Views of a whole local tensor, one per piece, keyed by global offsets."""
    return {
        g_off: p[tuple(slice(lo, lo + s) for lo, s in zip(l_off, sizes, strict=True))]
        for l_off, g_off, sizes in pieces
    }


def _shard_boxes(group, source: torch.Tensor, base: int):
    """The boxes of ``group``'s shard: ``source[i - base]`` holds flat element i of the
    group's buffer. Yields (reference name, logical shape, global offsets, view)."""
    a, b = group.shard.start, group.shard.stop
    offset = 0
    for p in group.params:
        name, shape, pieces = _place("", p)
        lo, hi = max(a, offset), min(b, offset + p.numel())
        for off, sizes in flat_range_boxes(p.shape, lo - offset, hi - offset) if lo < hi else []:
            start = offset + sum(o * st for o, st in zip(off, _strides(p.shape), strict=True))
            numel = 1
            for s in sizes:
                numel *= s
            view = source[start - base : start - base + numel].view(sizes)
            for (g_off, _), inner in _global_boxes((off, sizes), pieces):
                yield name, shape, g_off, view[inner]
        offset += p.numel()


def _strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(tuple(shape)):
        strides.append(acc)
        acc *= d
    return tuple(reversed(strides))


def _add(state: dict, key: str, shape, g_off, tensor) -> None:
    entry = state.setdefault(key, Boxes(shape, {}))
    entry.boxes[g_off] = tensor


def tensor_views(model: torch.nn.Module, optimizer) -> dict[str, Any]:
    """Live views of the state this rank saves (its shard) - copy before writing."""
    state: dict[str, Any] = {}
    if hasattr(optimizer, "groups"):  # ZeroOptimizer
        for g in optimizer.groups:
            base = g.shard.start
            for name, shape, g_off, view in _shard_boxes(g, g.data[g.shard], base):
                _add(state, f"model.{name}", shape, g_off, view)
            moments = optimizer.adamw.state.get(g.master, {})
            for m in MOMENTS:
                if m in moments:
                    for name, shape, g_off, view in _shard_boxes(g, moments[m], base):
                        _add(state, f"optim.{m}.{name}", shape, g_off, view)
        return state
    for name, p in model.named_parameters():
        state[f"model.{name}"] = p.detach()
        for m in MOMENTS:
            if m in optimizer.state.get(p, {}):
                state[f"optim.{m}.{name}"] = optimizer.state[p][m]
    return state


def adam_steps(optimizer) -> int:
    """AdamW's step count (steps taken; skipped steps do not count)."""
    inner = getattr(optimizer, "adamw", optimizer)
    for s in inner.state.values():
        if "step" in s:
            return int(s["step"])
    return 0


def load_targets(model: torch.nn.Module, optimizer, steps: int) -> dict[str, Any]:
    """Views of the live state DCP fills on load: every local parameter whole, and this
    rank's optimizer shard, whose AdamW state is created here at ``steps`` steps."""
    state: dict[str, Any] = {}
    inner = getattr(optimizer, "adamw", optimizer)
    if hasattr(optimizer, "groups"):
        for name, p in model.named_parameters():
            ref, shape, pieces = _place(name, p)
            state[f"model.{ref}"] = Boxes(shape, _whole_boxes(p.data, pieces))
        for g in optimizer.groups if steps else []:
            moments = _fresh_adam_state(inner, g.master, steps)
            for m in MOMENTS:
                for name, shape, g_off, view in _shard_boxes(g, moments[m], g.shard.start):
                    _add(state, f"optim.{m}.{name}", shape, g_off, view)
        return state
    for name, p in model.named_parameters():
        state[f"model.{name}"] = p.data
        if steps:
            moments = _fresh_adam_state(inner, p, steps)
            for m in MOMENTS:
                state[f"optim.{m}.{name}"] = moments[m]
    return state


def _fresh_adam_state(adamw: torch.optim.Optimizer, p: torch.Tensor, steps: int) -> dict:
    """AdamW's per-parameter state as its first step would create it, at ``steps`` steps."""
    state = adamw.state[p]
    state["step"] = torch.tensor(float(steps), dtype=torch.float32)
    for m in MOMENTS:
        state[m] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(saved: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(saved["torch"])
    if device.type == "cuda" and "cuda" in saved:
        torch.cuda.set_rng_state(saved["cuda"], device)
