"""Intra-operator overlap (``comm.chunks = K``): the communication-bound operator pairs,
pipelined in K pieces so each piece's communication runs beside the next piece's GEMM.

MegaScale-MoE (arXiv 2505.11432) (overlap section) fuses these pairs into tile-
level GPU kernels (tiles signal arrival through flags). This module is the
chunk-granularity form of the same dependency structure, and the seam where a
fused kernel plugs in: each pair is one function with plain tensors in and out,
and ``block.py`` / ``attention.py`` / ``moe.py`` call only these functions when
``chunks > 1``. A fused implementation replaces a function's body, not the
schedule.

* ``qkv_gemm_a2a``: QKV GEMM + RoPE on local token piece c, then its
  all-to-all to head-sharded layout, while piece c + 1's GEMM runs.
* ``a2a_out_gemm``: the attention output's all-to-all back in pieces of each
  destination's local sequence; W_o runs on piece c while c + 1 travels.
* ``ag_grouped_gemm_rs``: the all-gather of token piece c (from every rank),
  scatter to local experts, grouped FC1/FC3/FC2 GEMMs (rows sorted by expert,
  then by source rank), fill & gather, and the reduce-scatter of piece c -
  the two FFN pairs (AG + scatter + grouped GEMM, grouped GEMM + gather + RS)
  chained, so piece c + 1 is gathered while c computes and c is reduced while
  c + 1 computes.

Backward runs the duals, in the same pieces, for any K (K = 1 is the unchunked
schedule):

* ``wo_bwd_a2a``: d(attention output) = d(h) W_o on local token piece c, then
  its all-to-all to head-sharded layout, while piece c + 1's GEMM runs (and
  dW_o runs after the last piece is issued).
* ``a2a_qkv_bwd``: d(qkv) back to sequence-sharded in pieces of each
  destination's local sequence; RoPE backward and the QKV data and weight
  GEMMs run on piece c while c + 1 travels.
* ``ag_grouped_gemm_rs_bwd``: the FFN pairs' duals in the forward's token
  pieces: d(out) of piece c is all-gathered while c - 1's FC2/SwiGLU/FC1/FC3
  data gradients run; its dx is reduce-scattered while its dW1/dW3 and the
  next piece run.
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

from trainer.model.experts import fill_and_gather
from trainer.parallel.comm import JoinedHandle, PiecesOneAhead, issuer
from trainer.parallel.fp8comm import all_gather_fp8, reduce_scatter_fp8
from trainer.parallel.hostsync import counts_of, host_ints
from trainer.parallel.ops import (
    cat_rows,
    grouped_bwd_data,
    grouped_bwd_weights,
    grouped_fwd,
    rope,
)


def rows_bwd_data(ctx, dy, saved, rows: slice, segments, w1, w3, w2):
    """``grouped_bwd_data`` of the saved FFN rows ``rows`` (gates, FC1 and FC3 outputs)."""
    return grouped_bwd_data(
        dy,
        saved["gs"][rows],
        segments,
        saved["fc1"][rows],
        saved["fc3"][rows],
        w1,
        w3,
        w2,
        ctx.fp8,
        ctx.expert_gemm,
    )


def gather_pieces(ctx, rows, chunks: int, fp8: bool = False) -> PiecesOneAhead:
    """All-gathers of ``rows`` in ``chunks`` slices of local tokens, one ahead (FP8 in the
    backward's d(out) when ``comm.fp8``)."""
    size = rows.shape[0] // chunks

    def start(c):
        piece = rows[c * size : (c + 1) * size]
        if fp8:
            return all_gather_fp8(ctx, piece, "ffn_ag")
        return ctx.comm.all_gather(piece, "ffn_ag", async_op=True)

    return PiecesOneAhead(start, chunks)


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
        pending.append(
            ctx.comm.all_to_all(send.view(n * B * Lc, -1), None, None, "attn_qkv", async_op=True)
        )
    x = (ctx.heads + 2 * ctx.kv_heads) // n
    out = ln1_BLH.new_empty(B, n, L, x, D, dtype=send.dtype)  # bf16 under autocast
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

    pending, pieces = PiecesOneAhead(start, chunks), []
    for c in range(chunks):
        recv = pending.wait(c).view(n, B, Lc, nl, D).permute(1, 2, 0, 3, 4).reshape(B, Lc, -1)
        pieces.append(recv @ wo.T)
    return torch.cat(pieces, dim=1)


def piece_rows_index(n: int, T_l: int, c: int, Tc: int, device) -> torch.Tensor:
    """Rows of piece ``c`` in all-gather order (every source rank's Tc tokens from c Tc),
    on ``device``: the tensors it indexes and is indexed by live there."""
    ranks = torch.arange(n, device=device)[:, None] * T_l
    return (ranks + c * Tc + torch.arange(Tc, device=device)[None, :]).reshape(-1)


def select_rows(mine: torch.Tensor, local_e: torch.Tensor, experts: int):
    """Slots this rank computes, sorted by local expert (then slot), without a host read.

    Returns (order, counts): ``order[: sum(counts)]`` are the selected positions of
    ``mine``, ``counts`` [experts] (on the device) how many each expert receives; the
    unselected positions sort behind them."""
    key = torch.where(mine, local_e, experts)
    return torch.sort(key, stable=True).indices, counts_of(key, experts + 1)[:experts]


def ag_grouped_gemm_rs(ctx, x2, mine, gs_all, ids_all, first, w1, w3, w2, chunks: int, dropped):
    """Gathered-FFN forward in pieces of local tokens.

    ``mine`` [n T_l, k]: the (token, slot) pairs this rank computes (in all-gather
    order: source rank, then local token); ``gs_all`` their gate weights; ``dropped``
    the drop count on the device, read with the pieces' sizes in the one host read.
    Returns (out [T_l, H], saved dict for ``moe.gathered_backward``).
    """
    T_l = x2.shape[0]
    n, k, Tc = ctx.n, ctx.topk, T_l // chunks
    gathers = gather_pieces(ctx, x2, chunks)
    flat_ids, flat_gs = ids_all.reshape(-1), gs_all.reshape(-1)
    experts, plans = w1.shape[0], []
    for c in range(chunks):
        rows = piece_rows_index(n, T_l, c, Tc, mine.device)
        in_piece = (rows[:, None] * k + torch.arange(k, device=mine.device)).reshape(-1)
        order, counts_d = select_rows(mine[rows].reshape(-1), flat_ids[in_piece] - first, experts)
        plans.append((rows, in_piece, order, counts_d))
    sizes = host_ints(torch.cat([plan[3] for plan in plans] + [dropped]))
    outs, sel, toks, gates, segs, fc1s, fc3s, piece_rows = [], [], [], [], [], [], [], []
    for c, (rows, in_piece, order, _) in enumerate(plans):
        counts = sizes[c * experts : (c + 1) * experts]
        slots = order[: sum(counts)]  # within-piece (row, slot), by local expert
        global_slots = in_piece[slots]
        x_c = gathers.wait(c)
        g_c = flat_gs[global_slots]
        token_A = slots // k  # rows of the gathered piece
        ys, fc1, fc3 = grouped_fwd(
            x_c[token_A], g_c, list(enumerate(counts)), w1, w3, w2, ctx.fp8, ctx.expert_gemm
        )
        full = fill_and_gather(ys, token_A, n * Tc, k)
        if ctx.fp8:
            outs.append(reduce_scatter_fp8(ctx, full, "ffn_rs"))
        else:
            outs.append(ctx.comm.reduce_scatter(full, "ffn_rs", async_op=True))
        piece_rows.append(sum(counts))
        sel.append(global_slots)
        toks.append(rows[token_A])
        gates.append(g_c)
        segs += list(enumerate(counts))
        fc1s.append(fc1)
        fc3s.append(fc3)
    out = cat_rows([h.wait() for h in outs])
    saved = {
        "fc1": cat_rows(fc1s),
        "fc3": cat_rows(fc3s),
        "slot_sel": cat_rows(sel),
        "tokens": cat_rows(toks),
        "gs": cat_rows(gates),
        "segments": segs,
        "piece_rows": piece_rows,
        "dropped": sizes[-1],
    }
    return out, saved


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

    return JoinedHandle(pending, assemble)


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

    pending = PiecesOneAhead(start, chunks)
    ln1 = ln1_fn()
    d_ln1 = torch.empty_like(ln1)
    d_wqkv = torch.zeros_like(wqkv)

    def heads(t):  # [n, B, Lc, x, D] -> [B, Lc, n x, D]: global head order
        return t.permute(1, 2, 0, 3, 4).reshape(B, Lc, -1, D)

    for c in range(chunks):
        piece = slice(c * Lc, (c + 1) * Lc)
        dq, dk, dv = pending.wait(c).view(n, B, Lc, X, D).split([nl, gl, gl], dim=3)
        pos = positions[piece]
        dq = rope(heads(dq), pos, ctx.rope_theta, inverse=True)
        dk = rope(heads(dk), pos, ctx.rope_theta, inverse=True)
        d_qkv = torch.cat([t.reshape(B, Lc, -1) for t in (dq, dk, heads(dv))], dim=-1)
        d_ln1[:, piece] = d_qkv @ wqkv
        d_wqkv += d_qkv.reshape(B * Lc, -1).T @ ln1[:, piece].reshape(B * Lc, -1)
    return d_ln1, d_wqkv


def ag_grouped_gemm_rs_bwd(ctx, d_out, recompute_x2, w1, w3, w2, saved, side=None):
    """Backward of ``ag_grouped_gemm_rs`` piece by piece (same returns as
    ``moe.gathered_backward``); the inputs are re-gathered (SAR) in the same pieces."""
    s = saved
    T_l = d_out.shape[0]
    n, k, K = ctx.n, ctx.topk, ctx.chunks
    Tc = T_l // K
    ds = gather_pieces(ctx, d_out, K, fp8=ctx.fp8)
    x2 = recompute_x2()
    xs = gather_pieces(ctx, x2, K)
    side_out = side(x2) if side else None
    dw1, dw3, dw2 = torch.zeros_like(w1), torch.zeros_like(w1), torch.zeros_like(w2)
    rss, g_rss, row, El = [], [], 0, w1.shape[0]
    for c in range(K):
        rows = slice(row, row + s["piece_rows"][c])
        row = rows.stop
        segments = s["segments"][c * El : (c + 1) * El]  # each piece lists every local expert
        tokens = s["tokens"][rows]  # rows of the whole gathered batch -> rows of piece c
        local = (tokens // T_l) * Tc + tokens % T_l - c * Tc
        dxs, dgs, dw2_c, dfc1, dfc3 = rows_bwd_data(
            ctx, ds.wait(c)[local], s, rows, segments, w1, w3, w2
        )
        dw2 += dw2_c
        d_x = fill_and_gather(dxs, local, n * Tc, k)
        rss.append(ctx.comm.reduce_scatter(d_x, "ffn_rs", async_op=True))
        d_g = dgs.new_zeros(n * Tc * k).index_copy(0, local * k + s["slot_sel"][rows] % k, dgs)
        g_rss.append(ctx.comm.reduce_scatter(d_g.view(n * Tc, k).float(), "routing", async_op=True))
        dw1_c, dw3_c = grouped_bwd_weights(xs.wait(c)[local], segments, dfc1, dfc3, w1)
        dw1 += dw1_c
        dw3 += dw3_c
    d_x2 = cat_rows([h.wait() for h in rss])
    d_gates = cat_rows([h.wait() for h in g_rss])
    return d_x2, d_gates, (dw1, dw3, dw2), x2, side_out
