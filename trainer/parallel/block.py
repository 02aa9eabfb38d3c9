"""The MoE layer as one macro module: attention + MoE FFN with a hand-written backward.

``MacroLayer`` is one custom autograd Function around the whole layer, so
autograd sees a single node per layer and the operator order inside forward
and backward is ours to choose (the next step is running communication
beside independent computation). Between layers autograd is fine.

Selective activation rematerialisation (MegaScale-MoE (arXiv 2505.11432), overlap
section) decides what the Function keeps: the layer input ("hidden"), qkv after the all-to-all, the
attention output (+ its logsumexp), ln2_in (the residual after attention),
FC1 and FC3 outputs. Backward recomputes both norms and SiLU and re-runs the
attention-output all-to-all and the expert-input dispatch / all-gather.
``retained_bytes`` reports the kept tensors, which for SP + EP follow
(2kf + 4 + 2/m) * b s h / n elements.

Every tensor kept for backward - the SAR activations, the routing metadata and
the index tensors of the dispatch - goes through ``save_for_backward``, so
saved-tensor hooks (``torch.autograd.graph.save_on_cpu``, memory probes) see
each of them. The operators fill a nested dict ``saved`` (tensors beside the
ints and split lists that describe them); ``_pack`` swaps its tensors for
placeholders before saving and ``_unpack`` puts the unpacked ones back.

Forward order:  norm1 -> QKV -> a2a -> attention -> a2a -> W_o (+res)
                -> norm2 -> router (+ stats all-reduce) -> dispatch -> experts
                -> combine (+ shared expert) (+res)
Backward order: experts (re-dispatch inputs) -> router -> norm2 -> W_o
                (re-a2a output) -> a2a -> attention -> a2a -> QKV -> norm1
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from trainer.parallel import attention, moe
from trainer.parallel.comm import Comm, DoneHandle
from trainer.parallel.ops import expert_bwd, rmsnorm_bwd, rmsnorm_fwd

SAR_KEYS = ("x", "qkv_a2a", "attn_out", "h", "fc1", "fc3")


@dataclass(frozen=True)
class LayerCtx:
    """What one layer needs at run time that never changes during a run: the model's
    shapes, the layout, the communication options and the Comm it talks through.

    What a forward reports back (dropped tokens, retained bytes) goes to a
    :class:`LayerResult` instead, one per call.
    """

    comm: Comm
    n: int
    rank: int
    attention: str
    ffn_mode: str
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    topk: int
    norm_topk: bool
    capacity_factor: float
    balance_coef: float
    rope_theta: float
    eps: float
    overlap: bool = False  # comm.overlap: collectives run beside independent computation
    fp8: bool = False  # comm.fp8: FP8 reductions and backward all-gathers, gate after FC2
    chunks: int = 1  # comm.chunks: intra-operator pipelining pieces
    # Benchmarks and volume tests: replace the router's choice by a fixed, perfectly
    # balanced assignment, so every rank sends the closed-form volume. Never in training.
    balanced_routing: bool = False
    expert_gemm: bool | None = None  # grouped expert GEMMs: None = by device (ops.grouped_plan)

    def issue(self, collective, *args, **kwargs):
        """Start a collective: asynchronous under overlap (wait later), else done now."""
        if self.overlap:
            return collective(*args, async_op=True, **kwargs)
        return DoneHandle(collective(*args, **kwargs))

    def local_positions(self, L: int) -> torch.Tensor:
        return torch.arange(self.rank * L, (self.rank + 1) * L)

    def _global_tokens(self, T_l: int, rank: int) -> torch.Tensor:
        L = self.seq_len // self.n
        B = T_l // L
        b = torch.arange(B)[:, None]
        return (b * self.seq_len + rank * L + torch.arange(L)[None, :]).reshape(-1)

    def global_slots(self, T_l: int, k: int) -> torch.Tensor:
        """Batch-major (token * k + slot) index of each local (token, slot)."""
        tokens = self._global_tokens(T_l, self.rank)
        return (tokens[:, None] * k + torch.arange(k)[None, :]).reshape(-1)

    def gathered_to_global(self, T_l: int) -> torch.Tensor:
        """Batch-major token index of each row of an all-gather over the n ranks."""
        return torch.cat([self._global_tokens(T_l, r) for r in range(self.n)])


@dataclass
class LayerResult:
    """What one forward of one layer reports: tokens dropped by capacity, and the bytes
    of the activations it keeps for backward (the SAR tensors)."""

    dropped: int = 0
    retained_bytes: int = 0
    expert_counts: torch.Tensor | None = None  # (token, slot) assignments per expert, the group's


class _Slot:
    """Where ``_pack`` took a tensor out of the saved structure."""

    def __init__(self, index: int) -> None:
        self.index = index


def _pack(obj, tensors: list[torch.Tensor]):
    """``obj`` with every tensor replaced by a ``_Slot``; the tensors appended to ``tensors``."""
    if torch.is_tensor(obj):
        tensors.append(obj)
        return _Slot(len(tensors) - 1)
    if isinstance(obj, dict):
        return {k: _pack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_pack(v, tensors) for v in obj)
    return obj


def _unpack(obj, tensors):
    if isinstance(obj, _Slot):
        return tensors[obj.index]
    if isinstance(obj, dict):
        return {k: _unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unpack(v, tensors) for v in obj)
    return obj


def _shared_fwd(x2, w1, w3, w2):
    return (torch.nn.functional.silu(x2 @ w1) * (x2 @ w3)) @ w2


def _shared_bwd(d_out, x2, w1, w3, w2):
    fc1, fc3 = x2 @ w1, x2 @ w3
    ones = torch.ones(x2.shape[0], dtype=torch.float32, device=x2.device)
    dx, _, g1, g3, g2 = expert_bwd(d_out, x2, fc1, fc3, ones, w1, w3, w2)
    return dx, (g1, g3, g2)


class MacroLayer(torch.autograd.Function):
    @staticmethod
    def forward(fn_ctx, ctx: LayerCtx, result: LayerResult, x, *params):
        ln1_w, wqkv, wo, ln2_w, router_w, w1, w3, w2, *shared = params
        saved: dict[str, Any] = {}
        attn_fwd = attention.sp_forward if ctx.attention == "sp" else attention.tp_forward
        h = attn_fwd(ctx, x, ln1_w, wqkv, wo, saved)
        B, L, H = h.shape
        x2 = rmsnorm_fwd(h, ln2_w, ctx.eps).view(B * L, H)
        probs, scores, ids, gates = moe.router_fwd(ctx, x2, router_w)
        stats = moe.balance_issue(ctx, probs, ids)
        side = (lambda: _shared_fwd(x2, *shared)) if shared else None
        ffn_fwd = moe.a2a_forward if ctx.ffn_mode == "ep_a2a" else moe.gathered_forward
        out, shared_out = ffn_fwd(ctx, x2, ids, gates, scores, w1, w3, w2, saved, side)
        bal, coef_E = moe.balance_finish(ctx, stats, B * L)  # while the combine travels
        out = out.wait()
        if shared:
            out = out + shared_out
        saved.update(x=x, h=h, probs=probs, scores=scores, ids=ids, coef_E=coef_E)
        result.dropped = saved.pop("dropped")
        result.expert_counts = stats.wait()[: ctx.experts]  # the group-wide selection counts
        result.retained_bytes = sum(saved[k].numel() * saved[k].element_size() for k in SAR_KEYS)
        tensors: list[torch.Tensor] = []
        fn_ctx.layer, fn_ctx.structure = ctx, _pack(saved, tensors)
        fn_ctx.save_for_backward(*tensors, *params)
        fn_ctx.num_params = len(params)
        # Backward runs outside the caller's autocast; replay the forward's state.
        device = x.device.type
        fn_ctx.autocast = (
            device,
            torch.is_autocast_enabled(device),
            torch.get_autocast_dtype(device),
        )
        return h + out.view(B, L, H), bal

    @staticmethod
    def backward(fn_ctx, dy, d_bal):
        device, enabled, dtype = fn_ctx.autocast
        with torch.autocast(device, dtype, enabled=enabled):
            return MacroLayer._backward(fn_ctx, dy, d_bal)

    @staticmethod
    def _backward(fn_ctx, dy, d_bal):
        ctx, unpacked = fn_ctx.layer, fn_ctx.saved_tensors
        s = _unpack(fn_ctx.structure, unpacked[: -fn_ctx.num_params])
        ln1_w, wqkv, wo, ln2_w, router_w, w1, w3, w2, *shared = unpacked[-fn_ctx.num_params :]
        h = s["h"]
        B, L, H = h.shape
        d_out = dy.reshape(B * L, H)
        recompute_x2 = lambda: rmsnorm_fwd(h, ln2_w, ctx.eps).view(B * L, H)  # noqa: E731 (SAR)
        side = (lambda x2: _shared_bwd(d_out, x2, *shared)) if shared else None
        ffn_bwd = moe.a2a_backward if ctx.ffn_mode == "ep_a2a" else moe.gathered_backward
        d_x2, d_gates, expert_grads, x2, side_out = ffn_bwd(
            ctx, d_out, recompute_x2, w1, w3, w2, s, side
        )
        shared_grads: tuple = ()
        if shared:
            d_sx, shared_grads = side_out
            d_x2 = d_x2 + d_sx
        d_r, d_router = moe.router_bwd(
            ctx, d_gates, d_bal, s["probs"], s["scores"], s["ids"], x2, router_w, s["coef_E"]
        )
        d_ln2, d_ln2_w = rmsnorm_bwd((d_x2 + d_r).view(B, L, H), h, ln2_w, ctx.eps)
        d_h = dy + d_ln2
        attn_bwd = attention.sp_backward if ctx.attention == "sp" else attention.tp_backward
        dx, (d_ln1_w, d_wqkv, d_wo) = attn_bwd(ctx, d_h, s["x"], ln1_w, wqkv, wo, s)
        fn_ctx.structure = None
        grads = (d_ln1_w, d_wqkv, d_wo, d_ln2_w, d_router, *expert_grads, *shared_grads)
        return (None, None, dx, *grads)
