"""Initial weights drawn per logical tensor, so a rank can draw its own share alone.

The single-device reference and every parallel layout must start from identical values,
but a rank of a 352B model cannot build the whole model to cut its share out of it. So
every tensor of the reference has a random stream of its own, seeded from (base seed,
the tensor's reference name, unit): a tensor of stacked experts ([E, ...]) draws expert by
expert (unit = expert index), any other tensor whole (unit 0). A rank that holds experts
[8, 12) of a layer draws those four and nothing else; a TP slice draws its experts (or its
matrix) whole and keeps its columns - one expert's matrix at a time beside the shard, never
the model. The values do not depend on the device, the layout or the order of drawing.

Normal(0, init_std) everywhere, residual-branch outputs (attention output, FC2) with
init_std / sqrt(2 * layers), norms at one. The base seed comes from the global RNG when
none is given, so ``torch.manual_seed(s)`` before building still decides the weights.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from trainer.config import ModelConfig

Piece = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # local off, ref off, sizes


def base_seed(seed: int | None = None) -> int:
    """``seed``, or one drawn from torch's global generator."""
    if seed is not None:
        return int(seed)
    return int(torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu"))


def _std(name: str, shape: Sequence[int], cfg: ModelConfig) -> float | None:
    """The normal's std of reference tensor ``name``; None for ones (norm weights)."""
    if name.endswith("norm.weight") or len(shape) == 1:
        return None
    if name.endswith(("wo.weight", "w2")):
        return cfg.init_std / math.sqrt(2 * cfg.layers)
    return cfg.init_std


def _generator(seed: int, name: str, unit: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}:{unit}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def draw_unit(name: str, shape: Sequence[int], unit: int, cfg: ModelConfig, seed: int):
    """Unit ``unit`` of reference tensor ``name`` (shape ``shape``), fp32 on the CPU."""
    stacked = len(shape) == 3
    unit_shape = tuple(shape[1:]) if stacked else tuple(shape)
    std = _std(name, shape, cfg)
    if std is None:
        return torch.ones(unit_shape, device="cpu")
    out = torch.empty(unit_shape, device="cpu")
    return out.normal_(0.0, std, generator=_generator(seed, name, unit))


def _box(offsets, sizes) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))


def init_placed(
    name: str,
    shape: Sequence[int],
    pieces: Sequence[Piece],
    cfg: ModelConfig,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The local tensor made of ``pieces`` of reference tensor ``name``: each piece is
    (local offsets, reference offsets, sizes). Draws only the units the pieces touch."""
    local = [max(lo[d] + size[d] for lo, _, size in pieces) for d in range(len(shape))]
    out = torch.empty(local, dtype=dtype, device=device)
    whole = None
    for local_off, ref_off, sizes in pieces:
        if len(shape) == 3:  # stacked experts: expert by expert
            for i in range(sizes[0]):
                unit = draw_unit(name, shape, ref_off[0] + i, cfg, seed)
                part = unit[_box(ref_off[1:], sizes[1:])]
                out[local_off[0] + i][_box(local_off[1:], sizes[1:])] = part
        else:
            if whole is None:
                whole = draw_unit(name, shape, 0, cfg, seed)
            out[_box(local_off, sizes)] = whole[_box(ref_off, sizes)]
    return out


def init_reference(module: torch.nn.Module, cfg: ModelConfig, seed: int | None = None) -> None:
    """Every parameter of the reference model (named as in it) drawn whole; parameters on
    the meta device are left alone (a reference that only describes shapes)."""
    seed = base_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.is_meta:
                continue
            zeros = (0,) * p.dim()
            full = init_placed(name, p.shape, [(zeros, zeros, tuple(p.shape))], cfg, seed)
            p.copy_(full)
