"""FP8 (E4M3) codec for communication: scale, cast, ship as bytes, decode in FP32.

E4M3 has 4 exponent bits and 3 mantissa bits: its largest finite value is
448, its smallest normal 2^-6, and round-to-nearest keeps a relative error
of at most 2^-4 (6.25 %) for values in the normal range. That is too coarse
to use raw, so every tensor travels with scales that stretch a block of
values onto E4M3's range: ``q = cast(x / s)``, ``x ~ q * s`` with
``s = amax(block) / 448``. The block decides what one outlier can spoil:

* per token (one scale per row): the recipe for forward reductions, where
  each rank's partial sums are sent to the rank that owns the token, which
  decodes and sums them in FP32 (the FP8 all-to-all that replaces a BF16
  reduce-scatter, MegaScale-MoE (arXiv 2505.11432), communication compression).
* per channel over groups of 128 tokens (one scale per column per group):
  the recipe for backward all-gathers of gradients, whose outliers sit in
  channels rather than tokens.

Scales are FP32 and cost 4 bytes per row (per 128 x 1 block for channel
scales): 1/h resp. 1/128 of the payload.

Edge cases, deliberately:

* A block of zeros gets scale 0 and decodes to exact zeros (no division by 0).
* Scales use the amax of the finite values, so one Inf cannot flush the rest
  of the block to zero. Non-finite inputs are not hidden: they are encoded
  as E4M3 NaN (E4M3 has no Inf), decode to NaN, and their count is returned
  in ``Encoded.nonfinite`` so the caller reports it; a NaN reaching the
  gradient makes the global norm non-finite and the step is skipped on every
  rank.
* Values below 2^-6 * s land in E4M3 subnormals: absolute error up to
  s * 2^-10 instead of relative error.

What it leaves out: delayed (history-based) scaling, E5M2, and FP8 GEMMs.
float8 tensors cross gloo as ``uint8`` views; NCCL moves them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
CHANNEL_GROUP = 128


@dataclass
class Encoded:
    payload: torch.Tensor  # uint8 view of E4M3 values, same shape as the input
    scales: torch.Tensor  # float32: [rows, 1] per token, or [groups, 1, cols] per channel
    nonfinite: torch.Tensor  # non-finite inputs (encoded as NaN): a count on the device

    @property
    def nbytes(self) -> int:
        return self.payload.numel() + self.scales.numel() * 4


def _finite_amax(x: torch.Tensor, dim) -> tuple[torch.Tensor, torch.Tensor]:
    finite = torch.isfinite(x)
    amax = torch.where(finite, x.abs(), torch.zeros((), dtype=x.dtype, device=x.device))
    return amax.amax(dim=dim, keepdim=True), finite


def _quantize(x32: torch.Tensor, scale: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = (x32 / safe).clamp(-E4M3_MAX, E4M3_MAX)
    scaled = torch.where(finite, scaled, torch.full_like(scaled, float("nan")))
    return scaled.to(E4M3).view(torch.uint8)


def encode_rows(x: torch.Tensor) -> Encoded:
    """Per-token scales: x [rows, cols] -> E4M3 bytes + one FP32 scale per row."""
    x32 = x.float()
    amax, finite = _finite_amax(x32, dim=-1)
    scales = amax / E4M3_MAX
    return Encoded(_quantize(x32, scales, finite), scales, (~finite).sum())


def encode_channels(x: torch.Tensor, group: int = CHANNEL_GROUP) -> Encoded:
    """Per-channel scales over groups of ``group`` rows: x [rows, cols], rows % group == 0
    or a single short group."""
    rows, cols = x.shape
    g = group if rows % group == 0 else rows
    x32 = x.float().view(rows // g, g, cols)
    amax, finite = _finite_amax(x32, dim=1)
    scales = amax / E4M3_MAX  # [groups, 1, cols]
    payload = _quantize(x32, scales, finite).view(rows, cols)
    return Encoded(payload, scales, (~finite).sum())


def decode(enc: Encoded, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """E4M3 bytes and scales -> values in ``dtype`` (FP32 by default)."""
    values = enc.payload.view(E4M3).float()
    if enc.scales.dim() == 3:  # per channel: [groups, 1, cols]
        groups = enc.scales.shape[0]
        rows, cols = values.shape
        out = (values.view(groups, rows // groups, cols) * enc.scales).view(rows, cols)
    else:
        out = values * enc.scales
    return out.to(dtype)
