"""FP8 collectives: the reduce-scatter and all-gather replacements of ``comm.fp8``.

* ``reduce_scatter_fp8``: a forward reduction (partial sums of every token on
  every rank, each rank owning a block of tokens) becomes an FP8 all-to-all
  with one scale per token, and the owner decodes the n partials and sums
  them in FP32 (MegaScale-MoE (arXiv 2505.11432), communication
  compression). A BF16/FP8 reduce-scatter would instead
  accumulate in low precision along the ring.
* ``all_gather_fp8``: a backward all-gather carries E4M3 with per-channel
  scales over groups of 128 tokens.
* ``all_to_all_fp8``: the expert-parallel dispatch and combine of token rows,
  one scale per row (the optional FP8 token dispatch).

Both return handles (``wait()`` decodes), so they overlap like the plain
collectives. Payload bytes are booked under the caller's tag, the scales
under ``fp8_scales``; non-finite inputs are counted in the CommStats
(``fp8_nonfinite``) and travel as NaN so the step is skipped.
"""

from __future__ import annotations

import torch

from trainer.compress.fp8 import Encoded, decode, encode_channels, encode_rows
from trainer.parallel.comm import MappedHandle


def reduce_scatter_fp8(ctx, full_RH: torch.Tensor, tag: str):
    """Sum [n * R_l, H] over ranks; rank r keeps rows [r R_l, (r + 1) R_l), via FP8 all-to-all."""
    enc = encode_rows(full_RH)
    ctx.comm.stats.nonfinite += enc.nonfinite
    n = ctx.n
    payload = ctx.issue(ctx.comm.all_to_all, enc.payload, None, None, tag)
    scales = ctx.issue(ctx.comm.all_to_all, enc.scales, None, None, "fp8_scales")

    def finish(got):
        sc = scales.wait()
        rows = got.shape[0] // n
        parts = [
            decode(Encoded(got[i * rows : (i + 1) * rows], sc[i * rows : (i + 1) * rows], 0))
            for i in range(n)
        ]
        return torch.stack(parts).sum(0).to(full_RH.dtype)

    return MappedHandle(payload, finish)


def all_gather_fp8(ctx, t_RH: torch.Tensor, tag: str):
    """Concatenate every rank's [R_l, H] (rank order) as E4M3 with 128-token channel scales."""
    enc = encode_channels(t_RH)
    ctx.comm.stats.nonfinite += enc.nonfinite
    n = ctx.n
    payload = ctx.issue(ctx.comm.all_gather, enc.payload, tag)
    scales = ctx.issue(ctx.comm.all_gather, enc.scales, "fp8_scales")

    def finish(got):
        sc = scales.wait()
        rows, groups = got.shape[0] // n, sc.shape[0] // n
        parts = [
            decode(Encoded(got[i * rows : (i + 1) * rows], sc[i * groups : (i + 1) * groups], 0))
            for i in range(n)
        ]
        return torch.cat(parts).to(t_RH.dtype)

    return MappedHandle(payload, finish)


def all_to_all_fp8(ctx, rows_RH: torch.Tensor, in_splits, out_splits, tag: str):
    """Token rows to other ranks as E4M3 with one scale per row (dispatch / combine)."""
    enc = encode_rows(rows_RH)
    ctx.comm.stats.nonfinite += enc.nonfinite
    payload = ctx.issue(ctx.comm.all_to_all, enc.payload, in_splits, out_splits, tag)
    scales = ctx.issue(ctx.comm.all_to_all, enc.scales, in_splits, out_splits, "fp8_scales")

    def finish(got):
        return decode(Encoded(got, scales.wait(), 0)).to(rows_RH.dtype)

    return MappedHandle(payload, finish)
