"""The MoE half of the macro module: router, balance loss, and the three FFN modes.

Tokens enter as this rank's sequence shard, x2 [T_l, H] (T_l = B * S / n).

* Router (every mode): replicated weight, top-k over softmax scores of local
  tokens. The device-level balance loss needs batch-wide statistics, so one
  small all-reduce sums the per-expert selection counts and score sums; each
  rank's backward then adds alpha * f'_g / T to its local scores' gradient,
  and the replicated router gradients summed over ranks give exactly the
  reference gradient.
* ``ep_a2a``: sort local (token, slot) rows by expert (= by destination rank),
  all-to-all dispatch with the per-expert counts exchanged first, grouped
  GEMMs over whole local experts (rows sorted by expert, then source rank),
  all-to-all combine, gather back through the same row mapping. Capacity is
  decided by the receiver, which sees every assignment to its device group:
  scores and global slot indices travel with the rows so the decision equals
  the reference's (score descending, ties by batch-major slot).
* ``ep_agrs``: all-gather tokens and routing, keep the rows routed to local
  experts ("scatter & drop"), grouped GEMM, "fill & gather" into a zero-filled
  [T, H], reduce-scatter back to the shard.
* ``tp``: the baseline: like ``ep_agrs`` but every rank runs every expert on
  its 1/n slice of h_ffn; the reduce-scatter sums the partial outputs.

Kept for backward (SAR): FC1 and FC3 outputs. Recomputed: the norm, SiLU and
the dispatch all-to-all / all-gather of the expert inputs.
"""

from __future__ import annotations

import torch

from trainer.model.experts import fill_and_gather, sum_slots
from trainer.model.router import capacity_keep, group_capacity
from trainer.parallel.comm import DoneHandle, JoinedHandle, PiecesOneAhead, issuer
from trainer.parallel.fp8comm import all_gather_fp8, all_to_all_fp8, reduce_scatter_fp8
from trainer.parallel.hostsync import counts_of, host_ints
from trainer.parallel.ops import (
    cat_rows,
    grouped_bwd_data,
    grouped_bwd_weights,
    grouped_fwd,
    runs_grouped,
    segments_of,
)
from trainer.parallel.pairs import (
    ag_grouped_gemm_rs,
    ag_grouped_gemm_rs_bwd,
    rows_bwd_data,
    select_rows,
)

# ---------------------------------------------------------------- router


def router_fwd(ctx, x2, router_w):
    probs = torch.softmax((x2 @ router_w.T).float(), dim=-1)
    if ctx.balanced_routing:
        # Benchmarks and volume tests: a fixed, perfectly balanced assignment
        # (slot j of global token t -> expert (t k + j) mod E); gradients still flow.
        slots = ctx.global_slots(x2.shape[0], ctx.topk).to(x2.device)
        ids = (slots % ctx.experts).view(-1, ctx.topk)
        scores = probs.gather(1, ids)
    else:
        scores, ids = torch.topk(probs, ctx.topk, dim=-1)
    gates = scores / scores.sum(-1, keepdim=True) if ctx.norm_topk else scores
    return probs, scores, ids, gates


def balance_issue(ctx, probs, ids):
    """Start the all-reduce of per-expert selection counts and score sums (2E floats)."""
    E = ctx.experts
    stats = torch.cat([counts_of(ids, E).float(), probs.sum(0)])
    return ctx.issue(ctx.comm.all_reduce, stats, "router_stats")


def balance_finish(ctx, handle, tokens_local):
    """Batch-wide device-level balance loss and d(loss)/d(score) per expert."""
    E, n = ctx.experts, ctx.n
    stats = handle.wait()
    T = tokens_local * n
    f_group = (stats[:E] * (E / (ctx.topk * T))).view(n, E // n).mean(-1)
    p_group = (stats[E:] / T).view(n, E // n).sum(-1)
    loss = ctx.balance_coef * (f_group * p_group).sum()
    coef_E = ctx.balance_coef * f_group.repeat_interleave(E // n) / T
    return loss, coef_E


def balance_fwd(ctx, probs, ids):
    return balance_finish(ctx, balance_issue(ctx, probs, ids), probs.shape[0])


def router_bwd(ctx, d_gates, d_bal, probs, scores, ids, x2, router_w, coef_E):
    d_scores = d_gates
    if ctx.norm_topk:
        z = scores.sum(-1, keepdim=True)
        gates = scores / z
        d_scores = (d_gates - (d_gates * gates).sum(-1, keepdim=True)) / z
    d_probs = torch.zeros_like(probs).scatter_(1, ids, d_scores) + coef_E[None, :] * d_bal
    d_logits = probs * (d_probs - (d_probs * probs).sum(-1, keepdim=True))
    d_logits = d_logits.to(x2.dtype)
    return d_logits @ router_w, d_logits.T @ x2


# ------------------------------------------------------------- ep_a2a


def a2a_forward(ctx, x2, ids, gates, scores, w1, w3, w2, saved, side=None):
    """Dispatch all-to-all -> grouped GEMMs -> combine all-to-all, in ``comm.chunks`` pieces.

    Pieces are runs of local tokens. With K > 1 the two ep_a2a pairs (dispatch +
    grouped GEMM, grouped GEMM + combine) pipeline: piece c + 1 is dispatched
    while piece c's experts compute, and piece c is combined while c + 1's do.
    The routing metadata of all pieces travels first, in one all-to-all: the
    receiver's capacity decision needs every assignment to its device group.
    Overlap: ``side()`` (the shared expert) runs while the tokens are dispatched.
    """
    T_l, k = ids.shape
    n, E, El, K = ctx.n, ctx.experts, ctx.experts // ctx.n, ctx.chunks
    issue = issuer(ctx)
    flat_e = ids.reshape(-1)
    piece_of_slot = (torch.arange(T_l * k, device=ids.device) // k) * K // T_l
    # Send order: piece, then expert (= destination rank, then its local expert).
    key = piece_of_slot * E + flat_e
    slot_order = torch.sort(key, stable=True).indices
    counts_KNE = counts_of(key, K * E).view(K, n, El)
    send_counts = counts_KNE.transpose(0, 1).reshape(n, K * El)
    recv_counts = ctx.comm.all_to_all(send_counts, None, None, "ep_counts")
    # The layer's one host read: every split size of every piece, both directions.
    sizes = host_ints(torch.cat([counts_KNE.reshape(-1), recv_counts.reshape(-1)]))
    send_KN = [
        [sum(sizes[(c * n + r) * El : (c * n + r + 1) * El]) for r in range(n)] for c in range(K)
    ]
    recv_NKE = [
        [sizes[K * E + (r * K + c) * El : K * E + (r * K + c + 1) * El] for c in range(K)]
        for r in range(n)
    ]
    token_of = slot_order // k
    slot_place = inverse_permutation(slot_order)  # where each slot's row is in send order
    pieces = _pieces(send_KN, recv_NKE, x2.device)
    # float64 carries the global slot index exactly (float32 would stop at 2**24).
    slots = ctx.global_slots(T_l, k).to(device=x2.device, dtype=torch.float64)
    meta = torch.stack([gates.reshape(-1).double(), scores.reshape(-1).double(), slots], dim=1)
    # piece-major <-> rank-major
    send_major = _rank_major([[send_KN[c][r] for c in range(K)] for r in range(n)], x2.device)
    recv_major = _rank_major([[sum(row) for row in per_rank] for per_rank in recv_NKE], x2.device)
    meta_send = _to_rank_major(rows_at(meta, slot_order), send_major)
    meta_handle = issue(ctx.comm.all_to_all, meta_send, *_totals(pieces), "ep_meta")
    xs = PiecesOneAhead(
        lambda c: _dispatch(
            ctx, issue, rows_at(x2, token_of[pieces[c]["send"]]), pieces[c]["splits"]
        ),
        K,
    )
    side_out = side() if side else None
    recv_meta = rows_at(meta_handle.wait(), recv_major)  # piece-major, like the pieces' rows
    grouped = runs_grouped(x2, ctx.expert_gemm)
    _order_received(ctx, pieces, recv_NKE, recv_meta, T_l * n, k, grouped)
    backs, fc1s, fc3s, gss = [], [], [], []
    for c, p in enumerate(pieces):
        recv_meta_c = recv_meta[p["offset"] : p["offset"] + p["rows"]]
        gs = _take(recv_meta_c, p["perm"])[:, 0].float()
        recv_x = xs.wait(c)
        ys, fc1, fc3 = grouped_fwd(
            _take(recv_x, p["perm"]), gs, p["segments"], w1, w3, w2, ctx.fp8, ctx.expert_gemm
        )
        y_recv = _put(ys, p["perm"], recv_x.shape[0])
        backs.append(_dispatch(ctx, issue, y_recv, p["splits"][::-1], "ep_combine"))
        fc1s.append(fc1)
        fc3s.append(fc3)
        gss.append(gs)
    saved.update(
        fc1=cat_rows(fc1s),
        fc3=cat_rows(fc3s),
        slot_place=slot_place,
        token_of=token_of,
        pieces=pieces,
        gs=cat_rows(gss),
        send_major=send_major,
        recv_major=recv_major,
    )
    saved["dropped"] = sum(p["rows"] - p["kept"] for p in pieces)
    combined = JoinedHandle(backs, lambda rows: _gather_slots(cat_rows(rows), slot_place, T_l, k))
    return combined, side_out


def rows_at(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]`` along rows; ``index_select`` is several times faster than advanced
    indexing on the CPU (measured 0.4 vs 1.9 ms for 8192 bf16 rows of 512)."""
    return torch.index_select(t, 0, index)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] = i``: scattering by ``perm`` is gathering by ``inv``."""
    inv = torch.empty_like(perm)
    return inv.index_copy_(0, perm, torch.arange(perm.numel(), device=perm.device))


def _take(rows: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """Received rows in expert order (``perm``), or as they came (None)."""
    return rows if perm is None else rows_at(rows, perm)


def _put(values: torch.Tensor, perm: torch.Tensor | None, rows: int) -> torch.Tensor:
    """``_take`` undone: values back in received order, zero where a row was dropped."""
    if perm is None:
        return values
    return values.new_zeros(rows, *values.shape[1:]).index_copy(0, perm, values)


def _dispatch(ctx, issue, rows, splits, tag="ep_dispatch"):
    if ctx.fp8:
        return all_to_all_fp8(ctx, rows, *splits, tag)
    return issue(ctx.comm.all_to_all, rows, *splits, tag)


def _pieces(send_KN, recv_NKE, device):
    """Per piece: its rows in send order (positions in ``slot_order``), splits, received rows.

    ``send_KN[c][r]`` and ``recv_NKE[r][c][e]`` are host lists (the layer's one read)."""
    pieces, sent, offset = [], 0, 0
    for c, in_splits in enumerate(send_KN):
        out_splits = [sum(per_rank[c]) for per_rank in recv_NKE]
        rows = sum(out_splits)
        send = torch.arange(sent, sent + sum(in_splits), device=device)
        pieces.append(
            {"send": send, "splits": (in_splits, out_splits), "rows": rows, "offset": offset}
        )
        sent += sum(in_splits)
        offset += rows
    return pieces


def _totals(pieces):
    """Splits of one all-to-all carrying every piece's rows."""
    ins = [sum(col) for col in zip(*(p["splits"][0] for p in pieces), strict=True)]
    outs = [sum(col) for col in zip(*(p["splits"][1] for p in pieces), strict=True)]
    return ins, outs


def _blocks(ranges, device) -> torch.Tensor:
    """The row indices of consecutive (start, count) blocks, built on the host."""
    parts = [torch.arange(start, start + count) for start, count in ranges]
    return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)).to(device)


def _rank_major(counts_NK: list[list[int]], device) -> torch.Tensor:
    """Index that reads rank-major rows (rank, then piece) in piece-major order.

    ``counts_NK[r][c]``: rows of piece c exchanged with rank r. One all-to-all over all
    pieces is rank-major on both sides; the pieces' own all-to-alls are piece-major.
    """
    starts, at = {}, 0
    for r, per_piece in enumerate(counts_NK):
        for c, count in enumerate(per_piece):
            starts[r, c], at = at, at + count
    K = len(counts_NK[0]) if counts_NK else 0
    order = [(c, r) for c in range(K) for r in range(len(counts_NK))]
    return _blocks([(starts[r, c], counts_NK[r][c]) for c, r in order], device)


def _to_rank_major(rows_piece_major: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows placed at ``index`` (a permutation): a gather through its inverse."""
    return rows_at(rows_piece_major, inverse_permutation(index))


def _gather_slots(rows_AH, slot_place, T_l, k):
    """Rows in dispatch order -> [T_l, H]: back through the row mapping, summed over slots.

    One gather per slot, each added in place into the first: no [T_l, k, H] tensor is
    written and read back (measured alone, 4096 tokens x 2 slots x 512: bf16 2.0 against
    3.3 ms, fp32 3.7 against 4.8 ms). The same sums as ``sum_slots`` bit for bit: left to
    right, and in fp32 for more than two bf16/fp16 slots (that case keeps ``sum_slots``)."""
    if k > 2 and rows_AH.dtype != torch.float32:
        return sum_slots(rows_at(rows_AH, slot_place).view(T_l, k, -1))
    places = slot_place.view(T_l, k)
    out = rows_at(rows_AH, places[:, 0].contiguous())
    for j in range(1, k):
        out.add_(rows_at(rows_AH, places[:, j].contiguous()))
    return out


def _order_received(ctx, pieces, recv_NKE, recv_meta, tokens, k, grouped: bool):
    """Each piece's kept rows sorted by local expert (``perm``), their per-expert
    ``segments`` and count ``kept``.

    A piece's rows arrive by source rank, then local expert, with counts the host knows
    already, so the sorted order is a list of blocks. When every row stays and the expert
    GEMMs loop (not ``grouped``), no permutation at all: the loop takes each (source rank,
    expert) block where it arrived (``perm`` None), sparing a gather and a scatter of
    every row each way. Capacity (the receiver's rule, decided once over all pieces: it
    needs every assignment to this device group) is the only case that reads the host
    again: how many rows of each expert were kept.
    """
    n, K, El = len(recv_NKE), len(pieces), ctx.experts // ctx.n
    keep = _receiver_keep(ctx, recv_meta, tokens, k)
    device = recv_meta.device
    if keep is None and not grouped:
        for c, p in enumerate(pieces):
            blocks = [(e, recv_NKE[r][c][e]) for r in range(n) for e in range(El)]
            p["perm"], p["kept"] = None, p["rows"]
            p["segments"] = [(e, rows) for e, rows in blocks if rows]
        return
    if keep is None:  # dropless, or capacity not reached: every row stays
        for c, p in enumerate(pieces):
            start, at = {}, 0
            for r in range(n):
                for e in range(El):
                    start[r, e], at = at, at + recv_NKE[r][c][e]
            blocks = [(start[r, e], recv_NKE[r][c][e]) for e in range(El) for r in range(n)]
            p["perm"] = _blocks(blocks, device)
            p["segments"] = segments_of(
                [sum(recv_NKE[r][c][e] for r in range(n)) for e in range(El)]
            )
            p["kept"] = p["rows"]
        return
    keeps = keep.split([p["rows"] for p in pieces])
    orders, counts = [], []
    for c in range(K):
        local_e = torch.cat(
            [torch.full((recv_NKE[r][c][e],), e) for r in range(n) for e in range(El)]
        ).to(device)
        # dropped rows sort behind every expert (key El) and are cut off below
        key = torch.where(keeps[c], local_e, El)
        orders.append(torch.sort(key, stable=True).indices)
        counts.append(counts_of(key, El + 1)[:El])
    kept = host_ints(torch.stack(counts))
    for c, p in enumerate(pieces):
        per_expert = kept[c * El : (c + 1) * El]
        p["kept"] = sum(per_expert)
        p["perm"] = orders[c][: p["kept"]]
        p["segments"] = segments_of(per_expert)


def _receiver_keep(ctx, recv_meta, tokens, k):
    """Capacity on the receiving rank: best scores first, ties by global slot index.
    None when every row is kept (dropless, or fewer rows than the capacity)."""
    rows = recv_meta.shape[0]
    capacity = group_capacity(tokens, k, ctx.n, ctx.capacity_factor)
    if capacity <= 0 or rows <= capacity:
        return None
    keep = torch.ones(rows, dtype=torch.bool, device=recv_meta.device)
    by_slot = torch.sort(recv_meta[:, 2], stable=True).indices
    order = by_slot[torch.sort(recv_meta[by_slot, 1], descending=True, stable=True).indices]
    keep[order[capacity:]] = False
    return keep


def a2a_backward(ctx, d_out, recompute_x2, w1, w3, w2, saved, side=None):
    """The forward's pieces in reverse roles. Overlap: the norm is recomputed and the
    inputs re-dispatched while d(out) is dispatched; ``side()`` runs beside both; each
    piece's dx is combined while its dW1/dW3 and the next piece's data gradients run;
    the gate gradients of all pieces go back in one all-to-all at the end."""
    s = saved
    T_l = d_out.shape[0]
    k = ctx.topk
    issue = issuer(ctx)
    pieces, token_of = s["pieces"], s["token_of"]

    def dispatch(rows):
        return lambda c: issue(
            ctx.comm.all_to_all,
            rows_at(rows, token_of[pieces[c]["send"]]),
            *pieces[c]["splits"],
            "ep_dispatch",
        )

    ds = PiecesOneAhead(dispatch(d_out), len(pieces))
    x2 = recompute_x2()
    xs = PiecesOneAhead(dispatch(x2), len(pieces))
    side_out = side(x2) if side else None
    dw = None  # [dW1, dW3, dW2], summed over pieces
    backs, dgs_all, row = [], [], 0
    for c, p in enumerate(pieces):
        perm, segments = p["perm"], p["segments"]
        rows = slice(row, row + p["kept"])
        row = rows.stop
        dxs, dgs, dw2_p, dfc1, dfc3 = rows_bwd_data(
            ctx, _take(ds.wait(c), perm), s, rows, segments, w1, w3, w2
        )
        d_recv_x = _put(dxs, perm, p["rows"])
        backs.append(issue(ctx.comm.all_to_all, d_recv_x, *p["splits"][::-1], "ep_combine"))
        dgs_all.append(_put(dgs, perm, p["rows"]).double())
        dw1_p, dw3_p = grouped_bwd_weights(_take(xs.wait(c), perm), segments, dfc1, dfc3, w1)
        parts = (dw1_p, dw3_p, dw2_p)
        dw = list(parts) if dw is None else [a + b for a, b in zip(dw, parts, strict=True)]
    fwd_in, fwd_out = _totals(pieces)
    d_g_recv = _to_rank_major(cat_rows(dgs_all), s["recv_major"])
    g_back = issue(ctx.comm.all_to_all, d_g_recv, fwd_out, fwd_in, "ep_meta")
    back = cat_rows([b.wait() for b in backs]).to(d_out.dtype)
    d_x2 = _gather_slots(back, s["slot_place"], T_l, k)  # each token's slots summed
    d_g_send = rows_at(g_back.wait(), s["send_major"])  # piece-major: the send order
    d_gates = rows_at(d_g_send, s["slot_place"])  # back to (token, slot) order
    dw1, dw3, dw2 = (g.to(w.dtype) for g, w in zip(dw, (w1, w3, w2), strict=True))
    return d_x2, d_gates.view(T_l, k).float(), (dw1, dw3, dw2), x2, side_out


# ------------------------------------------------- ep_agrs and tp (gathered)


def gathered_forward(ctx, x2, ids, gates, scores, w1, w3, w2, saved, side=None):
    """Overlap: ``side()`` (the shared expert) runs while tokens and routing are gathered."""
    T_l, k = ids.shape
    n, El = ctx.n, ctx.experts // ctx.n
    chunked = ctx.chunks > 1
    x_handle = None if chunked else ctx.issue(ctx.comm.all_gather, x2, "ffn_ag")
    ids_handle = ctx.issue(ctx.comm.all_gather, ids, "routing")
    gs_handle = ctx.issue(ctx.comm.all_gather, torch.stack([gates, scores], dim=-1), "routing")
    side_out = side() if side else None
    ids_all, gs_all = ids_handle.wait(), gs_handle.wait()
    keep = _global_keep(ctx, gs_all[..., 1], ids_all, T_l)
    if ctx.ffn_mode == "tp":
        mine, first = keep, 0
    else:
        mine, first = keep & (ids_all // El == ctx.rank), ctx.rank * El
    owner = ids_all // El == ctx.rank  # drops are counted by the rank owning the group
    dropped = (~keep & owner).sum().view(1)
    if chunked:
        out, piece_saved = ag_grouped_gemm_rs(
            ctx, x2, mine, gs_all[..., 0], ids_all, first, w1, w3, w2, ctx.chunks, dropped
        )
        saved.update(piece_saved)
        return DoneHandle(out), side_out
    # The layer's one host read: the rows of each local expert (and the drop count).
    order, counts_d = select_rows(mine.reshape(-1), ids_all.reshape(-1) - first, w1.shape[0])
    sizes = host_ints(torch.cat([counts_d, dropped]))
    counts, saved["dropped"] = sizes[:-1], sizes[-1]
    x_all = x_handle.wait()
    slot_sel = order[: sum(counts)]
    tokens = slot_sel // k
    gs = gs_all[..., 0].reshape(-1)[slot_sel]
    ys, fc1, fc3 = grouped_fwd(
        rows_at(x_all, tokens), gs, segments_of(counts), w1, w3, w2, ctx.fp8, ctx.expert_gemm
    )
    summed = fill_and_gather(ys, tokens, n * T_l, k)
    if ctx.fp8:
        out = reduce_scatter_fp8(ctx, summed, "ffn_rs")
    else:
        out = ctx.issue(ctx.comm.reduce_scatter, summed, "ffn_rs")
    saved.update(fc1=fc1, fc3=fc3, slot_sel=slot_sel, tokens=tokens, gs=gs)
    saved["segments"] = segments_of(counts)
    return out, side_out


def _global_keep(ctx, scores_all, ids_all, T_l):
    """The reference's capacity rule over the gathered batch, in batch-major order."""
    capacity = group_capacity(T_l * ctx.n, ids_all.shape[1], ctx.n, ctx.capacity_factor)
    if capacity <= 0:
        return torch.ones_like(ids_all, dtype=torch.bool)
    # gathered row -> batch-major token index
    to_global = ctx.gathered_to_global(T_l).to(ids_all.device)
    order = torch.argsort(to_global)
    keep_global = capacity_keep(scores_all[order], ids_all[order], ctx.experts, ctx.n, capacity)
    return keep_global[to_global]


def gathered_backward(ctx, d_out, recompute_x2, w1, w3, w2, saved, side=None):
    """Overlap: the norm is recomputed and the inputs re-gathered while d(out) is gathered;
    ``side()`` runs beside both; dW1/dW3 run while dx is reduce-scattered."""
    if ctx.chunks > 1:
        return ag_grouped_gemm_rs_bwd(ctx, d_out, recompute_x2, w1, w3, w2, saved, side)
    s = saved
    T_l = d_out.shape[0]
    n, k = ctx.n, ctx.topk
    if ctx.fp8:
        d_handle = all_gather_fp8(ctx, d_out, "ffn_ag")
    else:
        d_handle = ctx.issue(ctx.comm.all_gather, d_out, "ffn_ag")
    x2 = recompute_x2()
    x_handle = ctx.issue(ctx.comm.all_gather, x2, "ffn_ag")  # SAR: re-gather the inputs
    side_out = side(x2) if side else None
    tokens = s["tokens"]
    dxs, dgs, dw2, dfc1, dfc3 = grouped_bwd_data(
        rows_at(d_handle.wait(), tokens),
        s["gs"],
        s["segments"],
        s["fc1"],
        s["fc3"],
        w1,
        w3,
        w2,
        ctx.fp8,
        ctx.expert_gemm,
    )
    d_x_all = fill_and_gather(dxs, tokens, n * T_l, k)
    rs = ctx.issue(ctx.comm.reduce_scatter, d_x_all, "ffn_rs")
    d_g_all = dgs.new_zeros(n * T_l * k).index_copy(0, s["slot_sel"], dgs).view(n * T_l, k)
    g_rs = ctx.issue(ctx.comm.reduce_scatter, d_g_all.float(), "routing")
    dw1, dw3 = grouped_bwd_weights(rows_at(x_handle.wait(), tokens), s["segments"], dfc1, dfc3, w1)
    return rs.wait(), g_rs.wait(), (dw1, dw3, dw2), x2, side_out
