"""Intra-operator overlap (``comm.chunks = K``): the communication-bound operator pairs,
pipelined in K pieces so each piece's communication runs beside the next piece's GEMM.

PAPER.md section 4 fuses these pairs into tile-level GPU kernels (tiles signal
arrival through flags). This module is the chunk-granularity form of the same
dependency structure, and the seam where a fused kernel plugs in: each pair is
one function with plain tensors in and out, and ``block.py`` /
``attention.py`` / ``moe.py`` call only these functions when ``chunks > 1``.
A fused implementation replaces a function's body, not the schedule.

* ``qkv_gemm_a2a``: QKV GEMM + RoPE on local token piece c, then its
  all-to-all to head-sharded layout, while piece c + 1's GEMM runs.
* ``a2a_out_gemm``: the attention output's all-to-all back in pieces of each
  destination's local sequence; W_o runs on piece c while c + 1 travels.
* ``ag_grouped_gemm_rs``: the two FFN pairs (AG + scatter + grouped GEMM,
  grouped GEMM + gather + RS) chained, in pieces ordered by source rank (own
  tokens first, then rank r + 1, r + 2, ..., each in K slices): the all-gather
  becomes pairwise exchanges (step j receives rank r + j's slice), so the first
  pieces need no communication at all and every piece depends on one source
  rank, as the paper's tiles do; rows inside a piece are sorted by expert. Each
  piece's partial output goes home (the pairwise form of the reduce-scatter,
  summed in FP32 by the owner) while the next piece computes.

Backward runs the duals, in the same pieces, for any K (K = 1 is the unchunked
schedule):

* ``wo_bwd_a2a``: d(attention output) = d(h) W_o on local token piece c, then
  its all-to-all to head-sharded layout, while piece c + 1's GEMM runs (and
  dW_o runs after the last piece is issued).
* ``a2a_qkv_bwd``: d(qkv) back to sequence-sharded in pieces of each
  destination's local sequence; RoPE backward and the QKV data and weight
  GEMMs run on piece c while c + 1 travels.
* ``ag_grouped_gemm_rs_bwd``: the FFN pairs' duals in the forward's pieces:
  d(out) and the re-gathered inputs of piece j + 1 arrive while piece j's
  FC2/SwiGLU/FC1/FC3 data gradients run; piece j's dx and gate gradients go
  home while its dW1/dW3 and the next piece run.
* The ep_a2a pairs (dispatch + grouped GEMM, grouped GEMM + combine) are
  pipelined the same way in ``moe.a2a_forward`` / ``moe.a2a_backward``: pieces
  of local tokens, capacity decided once over all pieces' routing metadata.

Collectives of chunked pairs are always asynchronous (chunking only makes
sense with overlap). Results equal the unchunked path up to GEMM summation order; the
saved tensors for backward have the same layout except the FFN rows, which are
ordered (piece, expert) and described by ``segments``.
"""

from __future__ import annotations

import torch

from trainer.compress.fp8 import Encoded, decode, encode_channels, encode_rows
from trainer.parallel.comm import Joined, Then
from trainer.parallel.ops import rope


class Ahead:
    """A chunked collective issued one piece ahead: piece c + 1 starts when piece c is waited.

    Issuing every piece at once would let them share the link (gloo runs async work
    on two threads), so piece 0 would arrive no sooner than the whole; one ahead, each
    piece has the link to itself while the previous piece computes - the order a GPU
    communication stream gives for free.
    """

    def __init__(self, start, count: int) -> None:
        self.start, self.count = start, count
        self.handles = {0: start(0)} if count else {}

    def wait(self, c: int):
        result = self.handles.pop(c).wait()
        if c + 1 < self.count:
            self.handles[c + 1] = self.start(c + 1)
        return result


def issuer(ctx):
    """How a pair starts a collective: asynchronous when chunked, else as ``comm.overlap`` says."""
    if ctx.chunks > 1:
        return lambda collective, *args: collective(*args, async_op=True)
    return ctx.issue


def _rope(ctx, t_BLX, positions, heads):
    B, L, _ = t_BLX.shape
    return rope(t_BLX.reshape(B, L, heads, ctx.head_dim), positions, ctx.rope_theta)


def _to_ranks(t_BLXD: torch.Tensor, n: int) -> torch.Tensor:
    B, L, X, D = t_BLXD.shape
    return t_BLXD.view(B, L, n, X // n, D).permute(2, 0, 1, 3, 4)


def qkv_gemm_a2a(ctx, ln1_BLH, wqkv, positions, chunks: int) -> torch.Tensor:
    """Sequence-sharded ln1 -> head-sharded qkv over the full sequence [B, S, Nl + 2 Gl, D]."""
    B, L, _ = ln1_BLH.shape
    n, D, Lc = ctx.n, ctx.head_dim, L // chunks
    nq, nkv = ctx.heads * D, ctx.kv_heads * D
    pending = []
    for c in range(chunks):
        piece = slice(c * Lc, (c + 1) * Lc)
        q, k, v = (ln1_BLH[:, piece] @ wqkv.T).split([nq, nkv, nkv], dim=-1)
        pos = positions[piece]
        parts = [_rope(ctx, q, pos, ctx.heads), _rope(ctx, k, pos, ctx.kv_heads)]
        parts.append(v.reshape(B, Lc, ctx.kv_heads, D))
        send = torch.cat([_to_ranks(t, n) for t in parts], dim=3).contiguous()
        pending.append(ctx.comm.all_to_all(send.view(n * B * Lc, -1), None, None, "attn_qkv",
                                           async_op=True))  # fmt: skip
    x = (ctx.heads + 2 * ctx.kv_heads) // n
    out = ln1_BLH.new_empty(B, n, L, x, D)
    for c, handle in enumerate(pending):
        out[:, :, c * Lc : (c + 1) * Lc] = handle.wait().view(n, B, Lc, x, D).transpose(0, 1)
    return out.view(B, n * L, x, D)


def a2a_out_gemm(ctx, out_BNSD, wo, chunks: int) -> torch.Tensor:
    """Head-sharded attention output -> W_o applied on this rank's sequence shard [B, L, H]."""
    B, nl, S, D = out_BNSD.shape
    n = ctx.n
    L = S // n
    Lc = L // chunks
    o = out_BNSD.transpose(1, 2).reshape(B, n, L, nl, D)

    def start(c):
        send = o[:, :, c * Lc : (c + 1) * Lc].transpose(0, 1).reshape(n * B * Lc, nl * D)
        return ctx.comm.all_to_all(send, None, None, "attn_out", async_op=True)

    pending, pieces = Ahead(start, chunks), []
    for c in range(chunks):
        recv = pending.wait(c).view(n, B, Lc, nl, D).permute(1, 2, 0, 3, 4).reshape(B, Lc, -1)
        pieces.append(recv @ wo.T)
    return torch.cat(pieces, dim=1)


def _rank_pieces(ctx, T_l: int, chunks: int):
    """The gathered FFN's pieces in schedule order: (offset j, source rank, token slice).

    Source rank r + j's tokens at step j, own tokens first (j = 0 needs no
    communication, so the experts start at once), each rank's tokens in ``chunks``
    slices. Rows inside a piece are sorted by expert: every piece depends on one
    source rank only.
    """
    Tc = T_l // chunks
    return [(j, (ctx.rank + j) % ctx.n, slice(c * Tc, (c + 1) * Tc))
            for j in range(ctx.n) for c in range(chunks)]  # fmt: skip


def _fetch(ctx, pieces, rows_of, channel: int, fp8: bool = False):
    """Pairwise all-gather of the remote pieces, one ahead: step j receives rank r + j's
    slice and sends ours to rank r - j."""
    n, r = ctx.n, ctx.rank
    remote = [(j, sl) for j, _, sl in pieces if j > 0]

    def start(i):
        j, sl = remote[i]
        to, frm = (r - j) % n, (r + j) % n
        if not fp8:
            return ctx.comm.exchange(rows_of[sl], to, frm, "all_gather", "ffn_ag", channel)
        enc = encode_channels(rows_of[sl])
        ctx.comm.stats.nonfinite += enc.nonfinite
        got = ctx.comm.exchange(enc.payload, to, frm, "all_gather", "ffn_ag", channel)
        scales = ctx.comm.exchange(enc.scales, to, frm, "all_gather", "fp8_scales", channel + 1)
        return Then(got, lambda x: decode(Encoded(x, scales.wait(), 0)).to(rows_of.dtype))

    return Ahead(start, len(remote))


def _return_partial(ctx, partial, j: int, kind: str, tag: str, channel: int, fp8: bool = False):
    """Send the partial sums for rank r + j's tokens home while receiving rank r - j's
    partial sums for ours (the pairwise form of a reduce-scatter, summed in FP32)."""
    n, r = ctx.n, ctx.rank
    to, frm = (r + j) % n, (r - j) % n
    if not fp8:
        return ctx.comm.exchange(partial, to, frm, kind, tag, channel)
    enc = encode_rows(partial)
    ctx.comm.stats.nonfinite += enc.nonfinite
    got = ctx.comm.exchange(enc.payload, to, frm, "all_to_all", tag, channel)
    scales = ctx.comm.exchange(enc.scales, to, frm, "all_to_all", "fp8_scales", channel + 1)
    return Then(got, lambda x: decode(Encoded(x, scales.wait(), 0)))


def ag_grouped_gemm_rs(ctx, x2, mine, gs_all, ids_all, first, w1, w3, w2, chunks: int):
    """Gathered-FFN forward piece by piece, in source-rank order (``_rank_pieces``).

    ``mine`` [n T_l, k]: the (token, slot) pairs this rank computes (in all-gather
    order: source rank, then local token); ``gs_all`` their gate weights.
    Piece j + 1 arrives while piece j's grouped GEMMs run; piece j's partial output
    goes home while the next piece computes. Returns (out [T_l, H], saved dict).
    """
    from trainer.parallel.moe import grouped_fwd

    T_l, H = x2.shape
    k, Tc, El = ctx.topk, T_l // chunks, w1.shape[0]
    pieces = _rank_pieces(ctx, T_l, chunks)
    gathers = _fetch(ctx, pieces, x2, channel=1)
    flat_ids, flat_gs = ids_all.reshape(-1), gs_all.reshape(-1)
    acc = torch.zeros(T_l, H, dtype=torch.float32, device=x2.device)
    outs, sel, toks, gates, segs, fc1s, fc3s, piece_rows = [], [], [], [], [], [], [], []
    for i, (j, src, sl) in enumerate(pieces):
        rows = src * T_l + torch.arange(sl.start, sl.stop)  # gathered rows of this piece
        slots = mine[rows].reshape(-1).nonzero().squeeze(-1)  # (row in piece) * k + slot
        slots = slots[torch.sort(flat_ids[(rows[slots // k] * k + slots % k)], stable=True).indices]
        global_slots = rows[slots // k] * k + slots % k
        counts = torch.bincount(flat_ids[global_slots] - first, minlength=El).tolist()
        x_c = x2[sl] if j == 0 else gathers.wait(i - chunks)
        g_c = flat_gs[global_slots]
        ys, fc1, fc3 = grouped_fwd(x_c[slots // k], g_c, list(enumerate(counts)), w1, w3, w2,
                                   ctx.fp8)  # fmt: skip
        partial = ys.new_zeros(Tc * k, H).index_copy(0, slots, ys).view(Tc, k, H).sum(1)
        if j == 0:
            acc[sl] += partial.float()
        else:
            outs.append((sl, _return_partial(ctx, partial, j, "reduce_scatter", "ffn_rs", 2,
                                             ctx.fp8)))  # fmt: skip
        piece_rows.append(slots.numel())
        sel.append(global_slots)
        toks.append(rows[slots // k])
        gates.append(g_c)
        segs += list(enumerate(counts))
        fc1s.append(fc1)
        fc3s.append(fc3)
    for sl, handle in outs:
        acc[sl] += handle.wait().float()
    saved = {
        "fc1": torch.cat(fc1s), "fc3": torch.cat(fc3s), "slot_sel": torch.cat(sel),
        "tokens": torch.cat(toks), "gs": torch.cat(gates), "segments": segs,
        "piece_rows": piece_rows,
    }  # fmt: skip
    return acc.to(x2.dtype), saved


def wo_bwd_a2a(ctx, d_h_BLH, wo, chunks: int):
    """d(attn output) on the local sequence -> handle of [B, Nl, S, D] (head-sharded).

    Piece c of the local sequence is multiplied by W_o and sent while c + 1 is.
    """
    B, L, _ = d_h_BLH.shape
    n, nl, D, Lc = ctx.n, ctx.heads // ctx.n, ctx.head_dim, L // chunks
    issue = issuer(ctx)
    pending = []
    for c in range(chunks):
        d_c = d_h_BLH[:, c * Lc : (c + 1) * Lc] @ wo  # [B, Lc, N * D]
        send = d_c.view(B, Lc, n, nl * D).permute(2, 0, 1, 3).reshape(n * B * Lc, nl * D)
        pending.append(issue(ctx.comm.all_to_all, send, None, None, "attn_out"))

    def assemble(recvs):  # piece c from source s covers positions s L + c Lc ...
        pieces = torch.stack([r.view(n, B, Lc, nl, D) for r in recvs], dim=2)
        return pieces.reshape(n, B, L, nl, D).permute(1, 3, 0, 2, 4).reshape(B, nl, n * L, D)

    return Joined(pending, assemble)


def a2a_qkv_bwd(ctx, d_BSXD, ln1_fn, wqkv, positions, chunks: int):
    """Head-sharded d(qkv) over the full sequence -> (d(ln1) [B, L, H], dW_qkv).

    ``ln1_fn()`` recomputes the norm (SAR) while the first pieces travel.
    """
    B, S, X, D = d_BSXD.shape
    n = ctx.n
    L = S // n
    Lc = L // chunks
    nl, gl = ctx.heads // n, ctx.kv_heads // n
    issue = issuer(ctx)
    per_rank = d_BSXD.view(B, n, L, X, D)

    def start(c):
        send = per_rank[:, :, c * Lc : (c + 1) * Lc].transpose(0, 1).reshape(n * B * Lc, X * D)
        return issue(ctx.comm.all_to_all, send, None, None, "attn_qkv")

    pending = Ahead(start, chunks)
    ln1 = ln1_fn()
    d_ln1 = torch.empty_like(ln1)
    d_wqkv = torch.zeros_like(wqkv)
    for c in range(chunks):
        piece = slice(c * Lc, (c + 1) * Lc)
        dq, dk, dv = pending.wait(c).view(n, B, Lc, X, D).split([nl, gl, gl], dim=3)
        pos = positions[piece]

        def heads(t):  # [n, B, Lc, x, D] -> [B, Lc, n x, D]: global head order
            return t.permute(1, 2, 0, 3, 4).reshape(B, Lc, -1, D)

        dq = rope(heads(dq), pos, ctx.rope_theta, inverse=True)
        dk = rope(heads(dk), pos, ctx.rope_theta, inverse=True)
        d_qkv = torch.cat([t.reshape(B, Lc, -1) for t in (dq, dk, heads(dv))], dim=-1)
        d_ln1[:, piece] = d_qkv @ wqkv
        d_wqkv += d_qkv.reshape(B * Lc, -1).T @ ln1[:, piece].reshape(B * Lc, -1)
    return d_ln1, d_wqkv


def ag_grouped_gemm_rs_bwd(ctx, d_out, recompute_x2, w1, w3, w2, saved, side=None):
    """Backward of ``ag_grouped_gemm_rs`` in the same pieces (same returns as
    ``moe.gathered_backward``): d(out) and the re-gathered inputs (SAR) arrive one
    source rank ahead; each piece's dx and gate gradients go home while the next
    piece computes."""
    from trainer.parallel.moe import grouped_bwd_data, grouped_bwd_weights

    s = saved
    T_l, H = d_out.shape
    k, K, El = ctx.topk, ctx.chunks, w1.shape[0]
    pieces = _rank_pieces(ctx, T_l, K)
    ds = _fetch(ctx, pieces, d_out, channel=4, fp8=ctx.fp8)
    x2 = recompute_x2()
    xs = _fetch(ctx, pieces, x2, channel=6)
    side_out = side(x2) if side else None
    dw1, dw3, dw2 = torch.zeros_like(w1), torch.zeros_like(w1), torch.zeros_like(w2)
    dx_acc = torch.zeros(T_l, H, dtype=torch.float32, device=d_out.device)
    dg_acc = torch.zeros(T_l, k, dtype=torch.float32, device=d_out.device)
    pending, row = [], 0
    for i, (j, src, sl) in enumerate(pieces):
        rows = slice(row, row + s["piece_rows"][i])
        row = rows.stop
        segments = s["segments"][i * El : (i + 1) * El]  # each piece lists every local expert
        local = s["tokens"][rows] - (src * T_l + sl.start)  # row of the piece's tokens
        d_c = d_out[sl] if j == 0 else ds.wait(i - K)
        dxs, dgs, dw2_c, dfc1, dfc3 = grouped_bwd_data(
            d_c[local], s["gs"][rows], segments, s["fc1"][rows], s["fc3"][rows],
            w1, w3, w2, ctx.fp8,
        )  # fmt: skip
        dw2 += dw2_c
        d_x = dxs.new_zeros(sl.stop - sl.start, H).index_add(0, local, dxs)
        d_g = dgs.new_zeros((sl.stop - sl.start) * k)
        d_g = d_g.index_copy(0, local * k + s["slot_sel"][rows] % k, dgs).view(-1, k).float()
        if j == 0:
            dx_acc[sl] += d_x.float()
            dg_acc[sl] += d_g
        else:
            pending.append(
                (
                    sl,
                    _return_partial(ctx, d_x, j, "reduce_scatter", "ffn_rs", 8),
                    _return_partial(ctx, d_g, j, "reduce_scatter", "routing", 10),
                )
            )
        x_c = x2[sl] if j == 0 else xs.wait(i - K)
        dw1_c, dw3_c = grouped_bwd_weights(x_c[local], segments, dfc1, dfc3, w1)
        dw1 += dw1_c
        dw3 += dw3_c
    for sl, dx_handle, dg_handle in pending:
        dx_acc[sl] += dx_handle.wait().float()
        dg_acc[sl] += dg_handle.wait()
    return dx_acc.to(d_out.dtype), dg_acc, (dw1, dw3, dw2), x2, side_out
