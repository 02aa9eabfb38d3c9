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

from trainer.model.router import capacity_keep, group_capacity
from trainer.parallel.comm import Ready, Then
from trainer.parallel.fp8comm import all_gather_fp8, all_to_all_fp8, reduce_scatter_fp8
from trainer.parallel.ops import expert_bwd_data, swiglu_act, swiglu_fwd
from trainer.parallel.pairs import ag_grouped_gemm_rs

# ---------------------------------------------------------------- router


def router_fwd(ctx, x2, router_w):
    probs = torch.softmax((x2 @ router_w.T).float(), dim=-1)
    if ctx.forced_routing:
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
    stats = torch.cat([torch.bincount(ids.reshape(-1), minlength=E).float(), probs.sum(0)])
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


# ------------------------------------------------------- grouped experts


def segments_of(counts: list[int]) -> list[tuple[int, int]]:
    """Rows grouped by expert in expert order: [(expert, rows), ...]."""
    return list(enumerate(counts))


def _split(t, segments):
    return t.split([rows for _, rows in segments])


def grouped_fwd(xs, gs, segments, w1, w3, w2, gate_after=False):
    """One FC1/FC3/FC2 GEMM per segment of rows that share an expert; returns (y, fc1, fc3).

    ``segments`` lists (local expert, rows) in row order; an expert may appear in
    several segments (chunked pipelines). The gate multiplies before FC2 (the
    paper's placement), or after it in FP8 mode.
    """
    fc1s, fc3s, ys = [], [], []
    for (e, _), x_e, g_e in zip(segments, _split(xs, segments), _split(gs, segments), strict=True):
        fc1, fc3 = swiglu_fwd(x_e, w1[e], w3[e])
        fc1s.append(fc1)
        fc3s.append(fc3)
        if gate_after:
            ys.append((swiglu_act(fc1, fc3, torch.ones_like(g_e)) @ w2[e]) * g_e[:, None])
        else:
            ys.append(swiglu_act(fc1, fc3, g_e) @ w2[e])
    return torch.cat(ys), torch.cat(fc1s), torch.cat(fc3s)


def grouped_bwd_data(dys, gs, segments, fc1, fc3, w1, w3, w2, gate_after=False):
    """Per segment: dx, dgate, dW2 (summed per expert) and the FC1/FC3 output gradients."""
    dxs, dgs, dfc1, dfc3 = [], [], [], []
    dw2 = torch.zeros_like(w2)
    pieces = zip(segments, _split(dys, segments), _split(gs, segments), _split(fc1, segments),
                 _split(fc3, segments), strict=True)  # fmt: skip
    for (e, _), dy, g, a, b in pieces:
        dx, dg, g2, d1, d3 = expert_bwd_data(dy, a, b, g, w1[e], w3[e], w2[e], gate_after)
        dxs.append(dx)
        dgs.append(dg)
        dw2[e] += g2
        dfc1.append(d1)
        dfc3.append(d3)
    return torch.cat(dxs), torch.cat(dgs), dw2, dfc1, dfc3


def grouped_bwd_weights(xs, segments, dfc1, dfc3, w1):
    """dW1, dW3 = x^T d(fc1), x^T d(fc3) per expert: the GEMMs that hide communication."""
    dw1, dw3 = torch.zeros_like(w1), torch.zeros_like(w1)
    for (e, _), x, d1, d3 in zip(segments, _split(xs, segments), dfc1, dfc3, strict=True):
        dw1[e] += x.T @ d1
        dw3[e] += x.T @ d3
    return dw1, dw3


# ------------------------------------------------------------- ep_a2a


def a2a_forward(ctx, x2, ids, gates, scores, w1, w3, w2, saved, side=None):
    """Overlap: ``side()`` (the shared expert) runs while the tokens are dispatched."""
    T_l, k = ids.shape
    n, E, El = ctx.n, ctx.experts, ctx.experts // ctx.n
    flat_e = ids.reshape(-1)
    slot_order = torch.sort(flat_e, stable=True).indices
    counts_E = torch.bincount(flat_e, minlength=E)
    recv_counts = ctx.comm.all_to_all(counts_E.view(n, El), None, None, "ep_counts")
    in_splits = counts_E.view(n, El).sum(1).tolist()
    out_splits = recv_counts.sum(1).tolist()
    token_of = slot_order // k
    if ctx.fp8:
        x_handle = all_to_all_fp8(ctx, x2[token_of], in_splits, out_splits, "ep_dispatch")
    else:
        x_handle = ctx.issue(
            ctx.comm.all_to_all, x2[token_of], in_splits, out_splits, "ep_dispatch"
        )
    # float64 carries the global slot index exactly (float32 would stop at 2**24).
    slots = ctx.global_slots(T_l, k).to(device=x2.device, dtype=torch.float64)
    meta = torch.stack([gates.reshape(-1).double(), scores.reshape(-1).double(), slots], dim=1)
    meta_handle = ctx.issue(ctx.comm.all_to_all, meta[slot_order], in_splits, out_splits, "ep_meta")
    side_out = side() if side else None
    recv_x, recv_meta = x_handle.wait(), meta_handle.wait()
    local_e = torch.arange(El, device=x2.device).repeat(n).repeat_interleave(recv_counts.flatten())
    keep = _receiver_keep(ctx, recv_meta, T_l * n, k)
    kept = keep.nonzero().squeeze(-1)
    perm = kept[torch.sort(local_e[kept], stable=True).indices]
    counts = torch.bincount(local_e[perm], minlength=El).tolist()
    gs = recv_meta[perm, 0].float()
    ys, fc1, fc3 = grouped_fwd(recv_x[perm], gs, segments_of(counts), w1, w3, w2, ctx.fp8)
    y_recv = ys.new_zeros(recv_x.shape).index_copy(0, perm, ys)
    if ctx.fp8:
        back = all_to_all_fp8(ctx, y_recv, out_splits, in_splits, "ep_combine")
    else:
        back = ctx.issue(ctx.comm.all_to_all, y_recv, out_splits, in_splits, "ep_combine")
    saved.update(
        fc1=fc1, fc3=fc3, slot_order=slot_order, token_of=token_of, perm=perm,
        segments=segments_of(counts),
        gs=gs, in_splits=in_splits, out_splits=out_splits, rows=recv_x.shape[0],
    )  # fmt: skip
    saved["dropped"] = recv_x.shape[0] - perm.numel()
    saved["expert_counts"] = counts
    combined = Then(back, lambda b: _gather_slots(b, slot_order, T_l, k))
    return combined, side_out


def _gather_slots(rows_AH, slot_order, T_l, k):
    """Rows in dispatch order -> [T_l, H]: back through the row mapping, summed over slots."""
    out = rows_AH.new_zeros(T_l * k, rows_AH.shape[-1]).index_copy(0, slot_order, rows_AH)
    return out.view(T_l, k, -1).sum(1)


def _receiver_keep(ctx, recv_meta, tokens, k):
    """Capacity on the receiving rank: best scores first, ties by global slot index."""
    rows = recv_meta.shape[0]
    capacity = group_capacity(tokens, k, ctx.n, ctx.capacity_factor)
    keep = torch.ones(rows, dtype=torch.bool, device=recv_meta.device)
    if capacity <= 0 or rows <= capacity:
        return keep
    by_slot = torch.sort(recv_meta[:, 2], stable=True).indices
    order = by_slot[torch.sort(recv_meta[by_slot, 1], descending=True, stable=True).indices]
    keep[order[capacity:]] = False
    return keep


def a2a_backward(ctx, d_out, recompute_x2, w1, w3, w2, saved, side=None):
    """Overlap: the norm is recomputed and the inputs re-dispatched while d(out) is
    dispatched; ``side()`` runs beside both; dW1/dW3 run while dx is combined."""
    s = saved
    T_l, H = d_out.shape
    k = ctx.topk
    splits = (s["in_splits"], s["out_splits"])
    d_handle = ctx.issue(ctx.comm.all_to_all, d_out[s["token_of"]], *splits, "ep_dispatch")
    x2 = recompute_x2()
    x_handle = ctx.issue(ctx.comm.all_to_all, x2[s["token_of"]], *splits, "ep_dispatch")
    side_out = side(x2) if side else None
    perm = s["perm"]
    dxs, dgs, dw2, dfc1, dfc3 = grouped_bwd_data(
        d_handle.wait()[perm], s["gs"], s["segments"], s["fc1"], s["fc3"], w1, w3, w2, ctx.fp8
    )
    d_recv_x = dxs.new_zeros(s["rows"], H).index_copy(0, perm, dxs)
    back = ctx.issue(ctx.comm.all_to_all, d_recv_x, s["out_splits"], s["in_splits"], "ep_combine")
    d_g_recv = dgs.new_zeros(s["rows"]).index_copy(0, perm, dgs).double()
    g_back = ctx.issue(ctx.comm.all_to_all, d_g_recv, s["out_splits"], s["in_splits"], "ep_meta")
    dw1, dw3 = grouped_bwd_weights(x_handle.wait()[perm], s["segments"], dfc1, dfc3, w1)
    d_x2 = d_out.new_zeros(T_l, H).index_add(0, s["token_of"], back.wait().to(d_out.dtype))
    d_g_send = g_back.wait()
    d_gates = d_g_send.new_zeros(T_l * k).index_copy(0, s["slot_order"], d_g_send)
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
    saved["dropped"] = int((~keep & owner).sum())
    if chunked:
        out, piece_saved = ag_grouped_gemm_rs(
            ctx, x2, mine, gs_all[..., 0], ids_all, first, w1, w3, w2, ctx.chunks
        )
        saved.update(piece_saved)
        counts = [0] * w1.shape[0]
        for e, rows in piece_saved["segments"]:
            counts[e] += rows
        saved["expert_counts"] = counts
        return Ready(out), side_out
    x_all = x_handle.wait()
    slots = mine.reshape(-1).nonzero().squeeze(-1)
    slot_sel = slots[torch.sort(ids_all.reshape(-1)[slots], stable=True).indices]
    tokens = slot_sel // k
    local_e = ids_all.reshape(-1)[slot_sel] - first
    counts = torch.bincount(local_e, minlength=w1.shape[0]).tolist()
    gs = gs_all[..., 0].reshape(-1)[slot_sel]
    ys, fc1, fc3 = grouped_fwd(x_all[tokens], gs, segments_of(counts), w1, w3, w2, ctx.fp8)
    full = ys.new_zeros(n * T_l * k, ys.shape[-1]).index_copy(0, slot_sel, ys)
    summed = full.view(n * T_l, k, -1).sum(1)
    if ctx.fp8:
        out = reduce_scatter_fp8(ctx, summed, "ffn_rs")
    else:
        out = ctx.issue(ctx.comm.reduce_scatter, summed, "ffn_rs")
    saved.update(fc1=fc1, fc3=fc3, slot_sel=slot_sel, tokens=tokens, gs=gs)
    saved["segments"] = segments_of(counts)
    saved["expert_counts"] = counts
    return out, side_out


def _global_keep(ctx, scores_all, ids_all, T_l):
    """The reference's capacity rule over the gathered batch, in batch-major order."""
    capacity = group_capacity(T_l * ctx.n, ids_all.shape[1], ctx.n, ctx.capacity_factor)
    if capacity <= 0:
        return torch.ones_like(ids_all, dtype=torch.bool)
    to_global = ctx.gathered_to_global(T_l)  # gathered row -> batch-major token index
    order = torch.argsort(to_global)
    keep_global = capacity_keep(scores_all[order], ids_all[order], ctx.experts, ctx.n, capacity)
    return keep_global[to_global]


def gathered_backward(ctx, d_out, recompute_x2, w1, w3, w2, saved, side=None):
    """Overlap: the norm is recomputed and the inputs re-gathered while d(out) is gathered;
    ``side()`` runs beside both; dW1/dW3 run while dx is reduce-scattered."""
    s = saved
    T_l, H = d_out.shape
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
        d_handle.wait()[tokens], s["gs"], s["segments"], s["fc1"], s["fc3"], w1, w3, w2, ctx.fp8
    )
    d_x_all = dxs.new_zeros(n * T_l, H).index_add(0, tokens, dxs)
    rs = ctx.issue(ctx.comm.reduce_scatter, d_x_all, "ffn_rs")
    d_g_all = dgs.new_zeros(n * T_l * k).index_copy(0, s["slot_sel"], dgs).view(n * T_l, k)
    g_rs = ctx.issue(ctx.comm.reduce_scatter, d_g_all.float(), "routing")
    dw1, dw3 = grouped_bwd_weights(x_handle.wait()[tokens], s["segments"], dfc1, dfc3, w1)
    return rs.wait(), g_rs.wait(), (dw1, dw3, dw2), x2, side_out
