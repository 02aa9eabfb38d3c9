"""Attention of the macro module over the n ranks: Ulysses SP and the TP baseline.

Both keep the residual stream sequence-sharded, [B, L, H] with L = S / n.

* ``sp`` (the method: MegaScale-MoE (arXiv 2505.11432), SP for attention):
  replicated W_qkv and W_o. QKV GEMM and RoPE on the local shard; one all-to-all
  turns sequence-sharded q, k, v into head-sharded tensors over the full
  sequence (rank j gets q heads [j N/n, (j+1) N/n) and the matching kv heads, so
  GQA groups stay whole); causal attention on the local heads; one all-to-all
  back; W_o on the local shard. Kept for backward (SAR): the all-to-all'd qkv,
  the attention output and its logsumexp. The output all-to-all is re-run in
  backward.
* ``tp`` (Megatron-style baseline with sequence parallelism): all-gather the
  normed input, column-parallel QKV (local heads), attention, row-parallel
  W_o, reduce-scatter. Kept: qkv and the attention output + logsumexp; the
  all-gather is re-run in backward.

Functions take a ``Ctx`` (the layer's static facts and its Comm) and a dict
``saved`` they fill in forward and read in backward.
"""

from __future__ import annotations

import torch

from trainer.parallel import pairs
from trainer.parallel.comm import MappedHandle
from trainer.parallel.fp8comm import all_gather_fp8, reduce_scatter_fp8
from trainer.parallel.ops import (
    attention_bwd,
    attention_fwd,
    linear_bwd,
    rmsnorm_bwd,
    rmsnorm_fwd,
    rope,
)


def _to_ranks(t_BLXD: torch.Tensor, n: int) -> torch.Tensor:
    """[B, L, heads, D] -> [n, B, L, heads / n, D]: chunk j holds rank j's heads."""
    B, L, X, D = t_BLXD.shape
    return t_BLXD.view(B, L, n, X // n, D).permute(2, 0, 1, 3, 4).contiguous()


def _split_local_heads(ctx, qkv_BSXD):
    """[B, S, Nl + 2 Gl, D] -> q [B, Nl, S, D], k, v [B, Gl, S, D]."""
    nl, gl = ctx.heads // ctx.n, ctx.kv_heads // ctx.n
    q, k, v = qkv_BSXD.split([nl, gl, gl], dim=2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _issue_heads_to_seq(ctx, t_BSXD, tag):
    """Head-sharded full sequence [B, S, X, D] -> handle of [n, B, L, X, D] (every head group)."""
    B, S, X, D = t_BSXD.shape
    L = S // ctx.n
    send = t_BSXD.view(B, ctx.n, L, X, D).permute(1, 0, 2, 3, 4).reshape(ctx.n * B * L, X * D)
    handle = ctx.issue(ctx.comm.all_to_all, send, None, None, tag)
    return MappedHandle(handle, lambda recv: recv.view(ctx.n, B, L, X, D))


def _issue_seq_to_heads(ctx, send_nBLXD, tag):
    """[n, B, L, X, D] (chunk j for rank j) -> handle of [B, S, X, D] over the full sequence."""
    n, B, L, X, D = send_nBLXD.shape
    handle = ctx.issue(ctx.comm.all_to_all, send_nBLXD.reshape(n * B * L, X * D), None, None, tag)
    return MappedHandle(
        handle, lambda r: r.view(n, B, L, X, D).permute(1, 0, 2, 3, 4).reshape(B, n * L, X, D)
    )


def _rope_heads(ctx, t_BLX, positions, heads, inverse=False):
    B, L, _ = t_BLX.shape
    return rope(t_BLX.reshape(B, L, heads, ctx.head_dim), positions, ctx.rope_theta, inverse)


def sp_forward(ctx, x, ln1_w, wqkv, wo, saved):
    """Overlap: the q all-to-all runs while the k/v projections are computed."""
    L = x.shape[1]
    nq = ctx.heads * ctx.head_dim
    pos = ctx.local_positions(L)
    ln1 = rmsnorm_fwd(x, ln1_w, ctx.eps)
    if ctx.chunks > 1:  # intra-operator: QKV GEMM piece by piece beside its all-to-all
        qkv_a2a = pairs.qkv_gemm_a2a(ctx, ln1, wqkv, pos, ctx.chunks)
    else:
        q = _rope_heads(ctx, ln1 @ wqkv[:nq].T, pos, ctx.heads)
        q_handle = _issue_seq_to_heads(ctx, _to_ranks(q, ctx.n), "attn_qkv")
        k, v = (ln1 @ wqkv[nq:].T).split(nq // ctx.heads * ctx.kv_heads, dim=-1)
        k = _rope_heads(ctx, k, pos, ctx.kv_heads)
        kv = torch.cat([_to_ranks(k, ctx.n), _to_ranks(v.reshape(k.shape), ctx.n)], dim=3)
        kv_handle = _issue_seq_to_heads(ctx, kv, "attn_qkv")
        qkv_a2a = torch.cat([q_handle.wait(), kv_handle.wait()], dim=2)  # [B, S, Nl + 2 Gl, D]
    out, lse = attention_fwd(*_split_local_heads(ctx, qkv_a2a))
    saved.update(qkv_a2a=qkv_a2a, attn_out=out, attn_lse=lse)
    if ctx.chunks > 1:
        return x + pairs.a2a_out_gemm(ctx, out, wo, ctx.chunks)
    attn_a2a = _sp_output_a2a(ctx, out, "attn_out").wait()
    return x + attn_a2a @ wo.T


def _sp_output_a2a(ctx, out_BNSD, tag):
    """Head-sharded attention output -> handle of [B, L, N * D], heads in global order."""

    def merge(recv):  # [n, B, L, Nl, D]
        n, B, L, nl, D = recv.shape
        return recv.permute(1, 2, 0, 3, 4).reshape(B, L, n * nl * D)

    return MappedHandle(_issue_heads_to_seq(ctx, out_BNSD.transpose(1, 2), tag), merge)


def sp_backward(ctx, d_h, x, ln1_w, wqkv, wo, saved):
    """Overlap: dW_o while d(attn) is all-to-all'd; the norm is recomputed while d(qkv) is.

    Both communication-bound pairs go through ``pairs`` in ``comm.chunks`` pieces.
    """
    L = x.shape[1]
    attn_handle = _sp_output_a2a(ctx, saved["attn_out"], "attn_out")  # SAR: re-communicate
    d_out_handle = pairs.wo_bwd_a2a(ctx, d_h, wo, ctx.chunks)
    _, d_wo = linear_bwd(d_h, attn_handle.wait(), wo)
    q, k, v = _split_local_heads(ctx, saved["qkv_a2a"])
    dq, dk, dv = attention_bwd(d_out_handle.wait(), q, k, v, saved["attn_out"], saved["attn_lse"])
    d_local = torch.cat([dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)], dim=2)
    d_ln1, d_wqkv = pairs.a2a_qkv_bwd(
        ctx,
        d_local,
        lambda: rmsnorm_fwd(x, ln1_w, ctx.eps),
        wqkv,
        ctx.local_positions(L),
        ctx.chunks,
    )
    dx, d_ln1_w = rmsnorm_bwd(d_ln1, x, ln1_w, ctx.eps)
    return d_h + dx, (d_ln1_w, d_wqkv, d_wo)


def _qkv_rope(ctx, qkv_BSX, positions, n_q, n_kv):
    B, S, _ = qkv_BSX.shape
    D = ctx.head_dim
    q, k, v = qkv_BSX.split([n_q * D, n_kv * D, n_kv * D], dim=-1)
    q = rope(q.reshape(B, S, n_q, D), positions, ctx.rope_theta)
    k = rope(k.reshape(B, S, n_kv, D), positions, ctx.rope_theta)
    return q, k, v.reshape(B, S, n_kv, D)


def _issue_seq_gather(ctx, t_BLX, tag, fp8=False):
    B, L, X = t_BLX.shape
    if fp8:
        handle = all_gather_fp8(ctx, t_BLX.reshape(B * L, X), tag)
    else:
        handle = ctx.issue(ctx.comm.all_gather, t_BLX.reshape(B * L, X), tag)
    return MappedHandle(
        handle, lambda out: out.view(ctx.n, B, L, X).permute(1, 0, 2, 3).reshape(B, -1, X)
    )


def _issue_seq_reduce_scatter(ctx, t_BSX, tag, fp8=False):
    B, S, X = t_BSX.shape
    L = S // ctx.n
    chunks = t_BSX.view(B, ctx.n, L, X).permute(1, 0, 2, 3).reshape(ctx.n * B * L, X)
    if fp8:
        return MappedHandle(reduce_scatter_fp8(ctx, chunks, tag), lambda out: out.view(B, L, X))
    return MappedHandle(
        ctx.issue(ctx.comm.reduce_scatter, chunks, tag), lambda out: out.view(B, L, X)
    )


def tp_forward(ctx, x, ln1_w, wqkv, wo, saved):
    ln1_full = _issue_seq_gather(ctx, rmsnorm_fwd(x, ln1_w, ctx.eps), "attn_ag").wait()
    B, S, _ = ln1_full.shape
    nl, gl = ctx.heads // ctx.n, ctx.kv_heads // ctx.n
    q, k, v = _qkv_rope(ctx, ln1_full @ wqkv.T, torch.arange(S, device=x.device), nl, gl)
    qkv = torch.cat([q, k, v], dim=2)
    out, lse = attention_fwd(*_split_local_heads(ctx, qkv))
    saved.update(qkv_a2a=qkv, attn_out=out, attn_lse=lse)
    partial = out.transpose(1, 2).reshape(B, S, nl * ctx.head_dim) @ wo.T
    return x + _issue_seq_reduce_scatter(ctx, partial, "attn_rs", fp8=ctx.fp8).wait()


def tp_backward(ctx, d_h, x, ln1_w, wqkv, wo, saved):
    """Overlap: the input is re-normed and re-gathered while d(h) is gathered; dW_qkv runs
    while d(ln1) is reduce-scattered."""
    B = x.shape[0]
    nl, D = ctx.heads // ctx.n, ctx.head_dim
    d_handle = _issue_seq_gather(ctx, d_h, "attn_ag", fp8=ctx.fp8)
    ln1_handle = _issue_seq_gather(ctx, rmsnorm_fwd(x, ln1_w, ctx.eps), "attn_ag")  # SAR
    d_partial = d_handle.wait()
    S = d_partial.shape[1]
    out = saved["attn_out"]
    o = out.transpose(1, 2).reshape(B, S, nl * D)
    d_o, d_wo = linear_bwd(d_partial, o, wo)
    q, k, v = _split_local_heads(ctx, saved["qkv_a2a"])
    dq, dk, dv = attention_bwd(
        d_o.view(B, S, nl, D).transpose(1, 2), q, k, v, out, saved["attn_lse"]
    )
    pos = torch.arange(S, device=x.device)
    dq = rope(dq.transpose(1, 2), pos, ctx.rope_theta, True).reshape(B, S, -1)
    dk = rope(dk.transpose(1, 2), pos, ctx.rope_theta, True).reshape(B, S, -1)
    d_qkv = torch.cat([dq, dk, dv.transpose(1, 2).reshape(B, S, -1)], dim=-1)
    ln1_full = ln1_handle.wait()
    rs_handle = _issue_seq_reduce_scatter(ctx, d_qkv @ wqkv, "attn_rs")
    d_wqkv = d_qkv.reshape(-1, d_qkv.shape[-1]).T @ ln1_full.reshape(-1, ln1_full.shape[-1])
    dx, d_ln1_w = rmsnorm_bwd(rs_handle.wait(), x, ln1_w, ctx.eps)
    return d_h + dx, (d_ln1_w, d_wqkv, d_wo)
