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
from trainer.parallel.ops import expert_bwd, swiglu_act, swiglu_fwd

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


def balance_fwd(ctx, probs, ids):
    """Batch-wide device-level balance loss and d(loss)/d(score) per expert."""
    E, n = ctx.experts, ctx.n
    stats = torch.cat([torch.bincount(ids.reshape(-1), minlength=E).float(), probs.sum(0)])
    stats = ctx.comm.all_reduce(stats, "router_stats")
    T = probs.shape[0] * n
    f_group = (stats[:E] * (E / (ctx.topk * T))).view(n, E // n).mean(-1)
    p_group = (stats[E:] / T).view(n, E // n).sum(-1)
    loss = ctx.balance_coef * (f_group * p_group).sum()
    coef_E = ctx.balance_coef * f_group.repeat_interleave(E // n) / T
    return loss, coef_E


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


def grouped_fwd(xs, gs, counts, w1, w3, w2):
    """One FC1/FC3/FC2 GEMM per local expert; returns (y, fc1, fc3) over all rows."""
    fc1s, fc3s, ys = [], [], []
    for e, (x_e, g_e) in enumerate(zip(xs.split(counts), gs.split(counts), strict=True)):
        fc1, fc3 = swiglu_fwd(x_e, w1[e], w3[e])
        fc1s.append(fc1)
        fc3s.append(fc3)
        ys.append(swiglu_act(fc1, fc3, g_e) @ w2[e])
    return torch.cat(ys), torch.cat(fc1s), torch.cat(fc3s)


def grouped_bwd(dys, xs, gs, counts, fc1, fc3, w1, w3, w2):
    dxs, dgs, dw1, dw3, dw2 = [], [], [], [], []
    pieces = zip(
        dys.split(counts), xs.split(counts), gs.split(counts),
        fc1.split(counts), fc3.split(counts), strict=True,
    )  # fmt: skip
    for e, (dy, x, g, a, b) in enumerate(pieces):
        dx, dg, g1, g3, g2 = expert_bwd(dy, x, a, b, g, w1[e], w3[e], w2[e])
        dxs.append(dx)
        dgs.append(dg)
        dw1.append(g1)
        dw3.append(g3)
        dw2.append(g2)
    return torch.cat(dxs), torch.cat(dgs), torch.stack(dw1), torch.stack(dw3), torch.stack(dw2)


# ------------------------------------------------------------- ep_a2a


def a2a_forward(ctx, x2, ids, gates, scores, w1, w3, w2, saved):
    T_l, k = ids.shape
    n, E, El = ctx.n, ctx.experts, ctx.experts // ctx.n
    flat_e = ids.reshape(-1)
    slot_order = torch.sort(flat_e, stable=True).indices
    counts_E = torch.bincount(flat_e, minlength=E)
    recv_counts = ctx.comm.all_to_all(counts_E.view(n, El), None, None, "ep_counts")
    in_splits = counts_E.view(n, El).sum(1).tolist()
    out_splits = recv_counts.sum(1).tolist()
    token_of = slot_order // k
    recv_x = ctx.comm.all_to_all(x2[token_of], in_splits, out_splits, "ep_dispatch")
    # float64 carries the global slot index exactly (float32 would stop at 2**24).
    slots = ctx.global_slots(T_l, k).to(device=x2.device, dtype=torch.float64)
    meta = torch.stack([gates.reshape(-1).double(), scores.reshape(-1).double(), slots], dim=1)
    meta = meta[slot_order]
    recv_meta = ctx.comm.all_to_all(meta, in_splits, out_splits, "ep_meta")
    local_e = torch.arange(El, device=x2.device).repeat(n).repeat_interleave(recv_counts.flatten())
    keep = _receiver_keep(ctx, recv_meta, T_l * n, k)
    kept = keep.nonzero().squeeze(-1)
    perm = kept[torch.sort(local_e[kept], stable=True).indices]
    counts = torch.bincount(local_e[perm], minlength=El).tolist()
    gs = recv_meta[perm, 0].float()
    ys, fc1, fc3 = grouped_fwd(recv_x[perm], gs, counts, w1, w3, w2)
    y_recv = ys.new_zeros(recv_x.shape).index_copy(0, perm, ys)
    back = ctx.comm.all_to_all(y_recv, out_splits, in_splits, "ep_combine")
    out = back.new_zeros(T_l * k, back.shape[-1]).index_copy(0, slot_order, back)
    saved.update(
        fc1=fc1, fc3=fc3, slot_order=slot_order, token_of=token_of, perm=perm, counts=counts,
        gs=gs, in_splits=in_splits, out_splits=out_splits, rows=recv_x.shape[0],
    )  # fmt: skip
    saved["dropped"] = recv_x.shape[0] - perm.numel()
    saved["expert_counts"] = counts
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


def a2a_backward(ctx, d_out, x2, w1, w3, w2, saved):
    s = saved
    T_l, H = d_out.shape
    d_send = d_out[s["token_of"]]
    d_recv = ctx.comm.all_to_all(d_send, s["in_splits"], s["out_splits"], "ep_dispatch")
    recv_x = ctx.comm.all_to_all(x2[s["token_of"]], s["in_splits"], s["out_splits"], "ep_dispatch")
    perm = s["perm"]
    dxs, dgs, dw1, dw3, dw2 = grouped_bwd(
        d_recv[perm], recv_x[perm], s["gs"], s["counts"], s["fc1"], s["fc3"], w1, w3, w2
    )
    d_recv_x = dxs.new_zeros(s["rows"], H).index_copy(0, perm, dxs)
    d_back = ctx.comm.all_to_all(d_recv_x, s["out_splits"], s["in_splits"], "ep_combine")
    d_x2 = d_back.new_zeros(T_l, H).index_add(0, s["token_of"], d_back)
    d_g_recv = dgs.new_zeros(s["rows"]).index_copy(0, perm, dgs).double()
    d_g_send = ctx.comm.all_to_all(d_g_recv, s["out_splits"], s["in_splits"], "ep_meta")
    k = ctx.topk
    d_gates = d_g_send.new_zeros(T_l * k).index_copy(0, s["slot_order"], d_g_send)
    return d_x2, d_gates.view(T_l, k).float(), (dw1, dw3, dw2)


# ------------------------------------------------- ep_agrs and tp (gathered)


def gathered_forward(ctx, x2, ids, gates, scores, w1, w3, w2, saved):
    T_l, k = ids.shape
    n, El = ctx.n, ctx.experts // ctx.n
    x_all = ctx.comm.all_gather(x2, "ffn_ag")
    ids_all = ctx.comm.all_gather(ids, "routing")
    gs_all = ctx.comm.all_gather(torch.stack([gates, scores], dim=-1), "routing")
    keep = _global_keep(ctx, gs_all[..., 1], ids_all, T_l)
    if ctx.ffn_mode == "tp":
        mine, first = keep, 0
    else:
        mine, first = keep & (ids_all // El == ctx.rank), ctx.rank * El
    slots = mine.reshape(-1).nonzero().squeeze(-1)
    slot_sel = slots[torch.sort(ids_all.reshape(-1)[slots], stable=True).indices]
    tokens = slot_sel // k
    local_e = ids_all.reshape(-1)[slot_sel] - first
    counts = torch.bincount(local_e, minlength=w1.shape[0]).tolist()
    gs = gs_all[..., 0].reshape(-1)[slot_sel]
    ys, fc1, fc3 = grouped_fwd(x_all[tokens], gs, counts, w1, w3, w2)
    full = ys.new_zeros(n * T_l * k, ys.shape[-1]).index_copy(0, slot_sel, ys)
    out = ctx.comm.reduce_scatter(full.view(n * T_l, k, -1).sum(1), "ffn_rs")
    owner = ids_all // El == ctx.rank  # drops are counted by the rank owning the group
    saved.update(fc1=fc1, fc3=fc3, slot_sel=slot_sel, tokens=tokens, counts=counts, gs=gs)
    saved["dropped"] = int((~keep & owner).sum())
    saved["expert_counts"] = counts
    return out


def _global_keep(ctx, scores_all, ids_all, T_l):
    """The reference's capacity rule over the gathered batch, in batch-major order."""
    capacity = group_capacity(T_l * ctx.n, ids_all.shape[1], ctx.n, ctx.capacity_factor)
    if capacity <= 0:
        return torch.ones_like(ids_all, dtype=torch.bool)
    to_global = ctx.gathered_to_global(T_l)  # gathered row -> batch-major token index
    order = torch.argsort(to_global)
    keep_global = capacity_keep(scores_all[order], ids_all[order], ctx.experts, ctx.n, capacity)
    return keep_global[to_global]


def gathered_backward(ctx, d_out, x2, w1, w3, w2, saved):
    s = saved
    T_l, H = d_out.shape
    n = ctx.n
    d_all = ctx.comm.all_gather(d_out, "ffn_ag")
    x_all = ctx.comm.all_gather(x2, "ffn_ag")  # SAR: re-gather the expert inputs
    tokens = s["tokens"]
    dxs, dgs, dw1, dw3, dw2 = grouped_bwd(
        d_all[tokens], x_all[tokens], s["gs"], s["counts"], s["fc1"], s["fc3"], w1, w3, w2
    )
    d_x_all = dxs.new_zeros(n * T_l, H).index_add(0, tokens, dxs)
    d_x2 = ctx.comm.reduce_scatter(d_x_all, "ffn_rs")
    k = ctx.topk
    d_g_all = dgs.new_zeros(n * T_l * k).index_copy(0, s["slot_sel"], dgs).view(n * T_l, k)
    d_gates = ctx.comm.reduce_scatter(d_g_all.float(), "routing")
    return d_x2, d_gates, (dw1, dw3, dw2)
