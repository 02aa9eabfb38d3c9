"""One MoE layer on one GPU for one micro-batch: compute, collectives, overlap.

Compute. Every GEMM is timed from its FLOPs and an efficiency that depends
on its shape: ``base * g(M) * g(N) * g(K)`` with ``g(x) = x / (x + x_half)``,
the share of the tile grid a dimension of size x fills. Whole experts (EP)
keep the full h_ffn; TP splits every expert along h_ffn into n slivers whose
GEMMs fill fewer tiles, and TP runs all E experts per GPU as one grouped GEMM
instead of E/n. Forward, data-gradient and weight-gradient GEMMs are timed
with their own shapes (the weight gradient reduces over the token rows).
Causal attention runs at one flash-attention efficiency. Element-wise work
(norms, residuals, RoPE, routing scatter/gather, SwiGLU and their
recomputation) is HBM traffic. All kernel time is divided by one global
``framework`` efficiency (launch gaps, host jitter, skew between ranks).

Communication. The collectives of the layer's layout inside the n-group,
sized by ``trainer.parallel.volumes`` (one rank's bytes, (n-1)/n of a
gathered tensor), each costing ``latency + bytes / (link * efficiency)``
over NVLink. Backward sends the dual of every forward collective plus what
the activation policy re-communicates: SAR re-runs the all-to-all of the
attention output and the expert dispatch (or the all-gathers in TP / AG-RS
modes); full recomputation re-runs the whole forward's collectives.

Overlap, following the method's schedule:

* none (the baseline): every collective is on the critical path.
* inter-operator (``overlap``): backward collectives run beside the
  independent weight-gradient GEMMs and recomputation of the same layer;
  the forward is a dependency chain (each collective feeds the next
  operator), so nothing of it is hidden at this level.
* intra-operator (``chunks`` > 1): what is still exposed is pipelined with
  the GEMM that produces or consumes it in ``chunks`` pieces: a collective
  of time e beside a GEMM of time g leaves ``max(e - g, 0) + min(e, g) /
  chunks`` exposed plus one latency per extra piece. This is the paper's
  criterion: the FFN's communication hides only while it is shorter than its
  GEMM (R > 1).

On CPU ranks with no spare core (``Hardware.comm_cpu_share``) that share of
every collective is the cores copying the data, so it stays exposed whatever
the schedule; only the rest (waiting for a slower wire) can hide.

``Layout.implementation`` picks between the ideal the paper describes (fused
kernels: every collective pipelined, FP8 on all of them, metadata travelling
with the data) and what ``trainer.parallel`` does (chunks on the SP-attention
and FFN pairs, forward and backward, not on the TP-attention baseline; FP8 on
dispatch/combine, forward reductions and gradient all-gathers, plus the separate calls for q vs k/v,
routing metadata and FP8 scales; see :func:`_trainer_calls`). Where the FP8
codec runs as separate kernels (``Hardware.fp8_codec_rate``) its encode and
decode are compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from trainer.config import ModelConfig
from trainer.parallel import volumes
from trainer.plan.hardware import Efficiency, Hardware
from trainer.plan.layout import Layout


@dataclass(frozen=True)
class Gemm:
    """``count`` GEMMs [m x k] @ [k x n] (forward shape), grouped when count > 1."""

    name: str
    m: float
    n: float
    k: float
    count: int = 1

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k * self.count


@dataclass(frozen=True)
class GemmTimes:
    fwd: float
    dgrad: float
    wgrad: float


@dataclass(frozen=True)
class Collective:
    name: str
    kind: str  # a2a | ag | rs | ar
    bytes: float
    partner: float  # seconds of the GEMM that produces or consumes it
    seconds: float
    fp8: bool = False


@dataclass
class LayerCost:
    """Seconds per micro-batch on one GPU for one layer."""

    fwd_compute: float
    bwd_compute: float  # data + weight gradients, attention backward, element-wise
    wgrad: float  # part of bwd_compute independent of the backward collectives
    recompute: float  # extra forward work done during backward
    fwd_comm: list[Collective] = field(default_factory=list)
    bwd_comm: list[Collective] = field(default_factory=list)
    exposed_fwd: float = 0.0
    exposed_bwd: float = 0.0

    @property
    def compute(self) -> float:
        return self.fwd_compute + self.bwd_compute + self.recompute

    @property
    def comm(self) -> float:
        return sum(c.seconds for c in self.fwd_comm + self.bwd_comm)

    @property
    def exposed(self) -> float:
        return self.exposed_fwd + self.exposed_bwd

    @property
    def total(self) -> float:
        return self.compute + self.exposed


def act_bytes(dtype: str) -> int:
    return 2 if dtype == "bf16" else 4


def gemm_efficiency(m: float, n: float, k: float, grouped: bool, eff: Efficiency) -> float:
    def fill(x: float) -> float:
        return x / (x + eff.gemm_half_dim)

    base = eff.gemm_grouped if grouped else eff.gemm_dense
    return base * fill(m) * fill(n) * fill(k)


def gemm_times(g: Gemm, hw: Hardware, dtype: str) -> GemmTimes:
    eff, peak, grouped = hw.efficiency, hw.peak(dtype), g.count > 1

    def seconds(m: float, n: float, k: float) -> float:
        return g.flops / (peak * gemm_efficiency(m, n, k, grouped, eff) * eff.framework)

    return GemmTimes(
        fwd=seconds(g.m, g.n, g.k),
        dgrad=seconds(g.m, g.k, g.n),
        wgrad=seconds(g.k, g.n, g.m),
    )


def layer_gemms(model: ModelConfig, layout: Layout) -> dict[str, Gemm]:
    """The layer's GEMMs on one GPU, by layout (T = tokens of one micro-batch)."""
    h, n, f = model.hidden, layout.n, model.ffn_hidden
    T = layout.micro_batch * model.seq_len
    qkv_width = h + 2 * model.kv_heads * model.head_dim
    gemms = {}
    if layout.attention == "sp":
        gemms["qkv"] = Gemm("qkv", T / n, qkv_width, h)
        gemms["out"] = Gemm("out", T / n, h, h)
    else:
        gemms["qkv"] = Gemm("qkv", T, qkv_width / n, h)
        gemms["out"] = Gemm("out", T, h, h / n)
    rows = T * model.topk / model.experts  # balanced routing: rows per expert
    if layout.ffn == "tp":
        gemms["fc13"] = Gemm("fc13", rows, 2 * f / n, h, model.experts)
        gemms["fc2"] = Gemm("fc2", rows, h, f / n, model.experts)
    else:
        local = model.experts // n
        gemms["fc13"] = Gemm("fc13", rows, 2 * f, h, local)
        gemms["fc2"] = Gemm("fc2", rows, h, f, local)
    if model.shared_experts:
        width = model.shared_experts * model.shared_hidden
        if layout.ffn == "tp":
            gemms["shared13"] = Gemm("shared13", T, 2 * width / n, h)
            gemms["shared2"] = Gemm("shared2", T, h, width / n)
        else:
            gemms["shared13"] = Gemm("shared13", T / n, 2 * width, h)
            gemms["shared2"] = Gemm("shared2", T / n, h, width)
    return gemms


def attention_seconds(model: ModelConfig, layout: Layout, hw: Hardware, dtype: str) -> float:
    """Forward of causal attention on this GPU's heads (backward is twice this)."""
    b, s = layout.micro_batch, model.seq_len
    flops = 2.0 * b * s * s * model.hidden / layout.n
    return flops / (hw.peak(dtype) * hw.efficiency.attention * hw.efficiency.framework)


def elementwise_seconds(
    model: ModelConfig, layout: Layout, hw: Hardware, dtype: str
) -> tuple[float, float, float]:
    """HBM time of element-wise work: (forward, backward, SAR recomputation).

    Passes over [tokens, h] tensors in the forward: 12 over the local shard
    (two norms, two residual adds, RoPE) and 2k + 2 for routing (scatter to
    k slots, gather back) over the tokens this rank routes: its own shard
    with all-to-all dispatch, the whole gathered micro-batch with AG/RS and
    TP experts. Backward is twice the forward; SAR recomputes the two norms
    (4 passes). Over the expert activations [rows, h_ffn]: SwiGLU forward 3,
    recomputed 3, backward 5.
    """
    T_l = layout.micro_batch * model.seq_len / layout.n
    k = model.topk
    routed = T_l if layout.ffn == "ep_a2a" else T_l * layout.n
    h_fwd = (12 * T_l + (2 * k + 2) * routed) * model.hidden
    f_elems = T_l * k * model.ffn_hidden + T_l * model.shared_experts * model.shared_hidden
    bw = hw.hbm_bw * hw.efficiency.hbm * hw.efficiency.framework / act_bytes(dtype)
    fwd = (h_fwd + 3 * f_elems) / bw
    bwd = (2 * h_fwd + 5 * f_elems) / bw
    sar = (4 * T_l * model.hidden + 3 * f_elems) / bw
    return fwd, bwd, sar


# ---------------------------------------------------------------- communication


def comm_bytes(dtype: str, fp8: bool) -> float:
    """Bytes per element on the wire (FP8 carries one scale per row: ignored, h >> 4)."""
    return 1.0 if fp8 else float(act_bytes(dtype))


def link_share(kind: str, eff: Efficiency) -> float:
    """The share of the per-direction link a collective of ``kind`` reaches."""
    if kind == "a2a":
        return eff.all_to_all
    if kind == "rs" and eff.reduce_scatter is not None:
        return eff.reduce_scatter
    return eff.gather_scatter


def collective_seconds(kind: str, nbytes: float, hw: Hardware) -> float:
    eff = hw.efficiency
    return eff.latency_s + nbytes / (hw.nvlink_bw * link_share(kind, eff))


# The collectives the trainer's ``comm.fp8`` encodes (trainer.parallel.attention / moe): the
# expert dispatch and combine in the forward, the forward reductions (sent as an FP8
# all-to-all, summed by the owner) and the backward all-gathers of gradients.
TRAINER_FP8 = frozenset(
    ("ep_dispatch", "ep_combine", "attn_rs", "ffn_rs", "attn_rs_grad", "ffn_rs_grad")
)
# The pairs the trainer's ``comm.chunks`` pipelines (trainer.parallel.pairs, moe): every
# SP-attention and FFN pair, forward and backward, and the FFN's re-sent inputs. Not
# chunked: the TP-attention baseline's collectives and the SP output's re-sent all-to-all.
TRAINER_CHUNKED = frozenset(
    (
        "attn_qkv", "attn_out", "attn_out_grad", "attn_qkv_grad",
        "ep_dispatch", "ep_combine", "ep_combine_grad", "ep_dispatch_grad", "ep_dispatch_again",
        "ffn_ag", "ffn_rs", "ffn_rs_grad", "ffn_ag_grad", "ffn_ag_again",
    )
)  # fmt: skip


def _fp8(name: str, layout: Layout) -> bool:
    if not layout.fp8:
        return False
    return layout.implementation == "ideal" or name in TRAINER_FP8


def _coll(
    name: str, kind: str, elems: float, partner: float, layout: Layout, dtype: str, hw: Hardware
):
    fp8 = _fp8(name, layout)
    if fp8 and kind == "rs" and layout.implementation == "trainer":
        kind = "a2a"  # reduce_scatter_fp8: an all-to-all of the partials, summed in FP32
    nbytes = elems * comm_bytes(dtype, fp8)
    return Collective(name, kind, nbytes, partner, collective_seconds(kind, nbytes, hw), fp8)


def layer_collectives(
    model: ModelConfig, layout: Layout, hw: Hardware, dtype: str, times: dict[str, GemmTimes]
) -> tuple[list[Collective], list[Collective]]:
    """Forward and backward collectives of one layer on one GPU."""
    n = layout.n
    if n == 1:
        return [], []
    b, s, h, m, k = layout.micro_batch, model.seq_len, model.hidden, model.gqa_ratio, model.topk
    T_l = b * s / n
    frac = (n - 1) / n
    t = times
    fwd: list[Collective] = []
    bwd: list[Collective] = []
    if layout.attention == "sp":
        # volumes.sp_attention split into its two all-to-alls: q, k, v and the output.
        qkv, out = T_l * h * (1 + 2 / m) * frac, T_l * h * frac
        fwd += [_coll("attn_qkv", "a2a", qkv, t["qkv"].fwd, layout, dtype, hw)]
        fwd += [_coll("attn_out", "a2a", out, t["out"].fwd, layout, dtype, hw)]
        bwd += [_coll("attn_out_grad", "a2a", out, t["out"].dgrad, layout, dtype, hw)]
        bwd += [_coll("attn_qkv_grad", "a2a", qkv, t["qkv"].dgrad, layout, dtype, hw)]
        recomm = [_coll("attn_out_again", "a2a", out, t["out"].wgrad, layout, dtype, hw)]
    else:
        half = volumes.tp_attention(b, s, h, n) / 2
        fwd += [_coll("attn_ag", "ag", half, t["qkv"].fwd, layout, dtype, hw)]
        fwd += [_coll("attn_rs", "rs", half, t["out"].fwd, layout, dtype, hw)]
        bwd += [_coll("attn_rs_grad", "ag", half, t["out"].dgrad, layout, dtype, hw)]
        bwd += [_coll("attn_ag_grad", "rs", half, t["qkv"].dgrad, layout, dtype, hw)]
        recomm = [_coll("attn_ag_again", "ag", half, t["qkv"].wgrad, layout, dtype, hw)]
    fwd += [_coll("router_stats", "ar", 0.0, 0.0, layout, dtype, hw)]
    if layout.ffn == "ep_a2a":
        one = volumes.ep_a2a(b, s, h, n, k) / 2
        fwd += [_coll("ep_counts", "a2a", 0.0, 0.0, layout, dtype, hw)]
        fwd += [_coll("ep_dispatch", "a2a", one, t["fc13"].fwd, layout, dtype, hw)]
        fwd += [_coll("ep_combine", "a2a", one, t["fc2"].fwd, layout, dtype, hw)]
        bwd += [_coll("ep_combine_grad", "a2a", one, t["fc2"].dgrad, layout, dtype, hw)]
        bwd += [_coll("ep_dispatch_grad", "a2a", one, t["fc13"].dgrad, layout, dtype, hw)]
        recomm += [_coll("ep_dispatch_again", "a2a", one, t["fc13"].wgrad, layout, dtype, hw)]
    else:
        half = volumes.ep_agrs(b, s, h, n) / 2
        fwd += [_coll("ffn_ag", "ag", half, t["fc13"].fwd, layout, dtype, hw)]
        fwd += [_coll("ffn_rs", "rs", half, t["fc2"].fwd, layout, dtype, hw)]
        bwd += [_coll("ffn_rs_grad", "ag", half, t["fc2"].dgrad, layout, dtype, hw)]
        bwd += [_coll("ffn_ag_grad", "rs", half, t["fc13"].dgrad, layout, dtype, hw)]
        recomm += [_coll("ffn_ag_again", "ag", half, t["fc13"].wgrad, layout, dtype, hw)]
    if layout.recompute == "sar":
        bwd += recomm
    elif layout.recompute == "full":
        # The recomputed forward's collectives, and sequence-parallel linears
        # gather their sharded input again for the weight gradient.
        bwd += fwd + [c for c in recomm if c.kind == "ag"]
    if layout.implementation == "trainer":
        fwd, bwd = _trainer_calls(model, layout, hw, fwd, bwd)
    return fwd, bwd


def _meta(name: str, kind: str, nbytes: float, hw: Hardware) -> Collective:
    return Collective(name, kind, nbytes, 0.0, collective_seconds(kind, nbytes, hw))


def _trainer_calls(
    model: ModelConfig, layout: Layout, hw: Hardware, fwd: list, bwd: list
) -> tuple[list[Collective], list[Collective]]:
    """The separate calls the trainer makes where fused kernels would carry the data along.

    * SP attention without chunks sends q and k, v as two all-to-alls (k, v projected
      while q travels); with chunks one per piece, as the ideal form counts them.
    * Expert all-to-all: each dispatched row's gate, score and global slot index
      (3 float64) travel beside it, the gate gradient (1 float64) back.
    * Gathered experts (AG/RS, TP): top-k ids (int64) and gates + scores (2 float32)
      are all-gathered, the gate gradients reduce-scattered.
    * Every FP8 collective ships its FP32 scales in a second call: one per row, or for
      all-gathers one per channel and group of 128 tokens.
    """
    n, h, k = layout.n, model.hidden, model.topk
    T_l = layout.micro_batch * model.seq_len / n
    frac = (n - 1) / n
    out_f: list[Collective] = []
    for c in fwd:
        if c.name == "attn_qkv" and layout.chunks == 1:
            q = c.bytes / (1 + 2 / model.gqa_ratio)
            out_f.append(
                Collective("attn_q", "a2a", q, c.partner, collective_seconds("a2a", q, hw))
            )
            kv = c.bytes - q
            out_f.append(
                replace(c, name="attn_kv", bytes=kv, seconds=collective_seconds("a2a", kv, hw))
            )
        else:
            out_f.append(c)
    out_b = list(bwd)
    if layout.ffn == "ep_a2a":
        out_f.append(_meta("ep_meta", "a2a", T_l * k * frac * 24, hw))
        out_b.append(_meta("ep_meta_grad", "a2a", T_l * k * frac * 8, hw))
    else:
        out_f.append(_meta("routing_ids", "ag", T_l * k * (n - 1) * 8, hw))
        out_f.append(_meta("routing_gates", "ag", T_l * k * (n - 1) * 8, hw))
        out_b.append(_meta("routing_grad", "rs", T_l * k * (n - 1) * 4, hw))
    for calls in (out_f, out_b):
        for c in [c for c in calls if c.fp8]:
            if c.kind == "ag":  # channel scales: [groups of 128 local rows, h] per rank
                groups = T_l // 128 if T_l % 128 == 0 else 1
                scales = groups * h * 4 * (n - 1)
            else:  # one scale per row of h one-byte elements
                scales = c.bytes / h * 4
            calls.append(_meta(f"{c.name}_scales", c.kind, scales, hw))
    return out_f, out_b


# ---------------------------------------------------------------- the layer


def fp8_codec_seconds(comm: list[Collective], n: int, hw: Hardware) -> float:
    """Compute-core time of encoding and decoding the FP8 collectives in ``comm``.

    Zero where the codec is fused into the communication kernels (``fp8_codec_rate``
    0). Otherwise each FP8 collective encodes its whole input and decodes its whole
    output: for an all-to-all (and the trainer's FP8 reduce-scatter, which is one) both
    are n/(n-1) of the booked elements, for an all-gather the input is 1/(n-1) and the
    output n/(n-1) of them. The probed rate is one encode + decode of the same tensor.
    """
    if hw.fp8_codec_rate <= 0 or n == 1:
        return 0.0
    elements = 0.0
    for c in comm:
        if c.fp8:  # one byte per element on the wire
            inputs = c.bytes / (n - 1) if c.kind == "ag" else c.bytes * n / (n - 1)
            elements += inputs + c.bytes * n / (n - 1)
    return elements / 2 / hw.fp8_codec_rate


def layer_cost(model: ModelConfig, layout: Layout, hw: Hardware, dtype: str) -> LayerCost:
    """Compute, communication and what the layout's overlap leaves exposed."""
    times = {name: gemm_times(g, hw, dtype) for name, g in layer_gemms(model, layout).items()}
    attn = attention_seconds(model, layout, hw, dtype)
    ew_fwd, ew_bwd, ew_sar = elementwise_seconds(model, layout, hw, dtype)
    fwd_comm, bwd_comm = layer_collectives(model, layout, hw, dtype, times)
    fwd = sum(t.fwd for t in times.values()) + attn + ew_fwd
    fwd += fp8_codec_seconds(fwd_comm, layout.n, hw)
    wgrad = sum(t.wgrad for t in times.values())
    bwd = sum(t.dgrad for t in times.values()) + wgrad + 2 * attn + ew_bwd
    bwd += fp8_codec_seconds(bwd_comm, layout.n, hw)
    recompute = {"sar": ew_sar, "full": fwd, "none": 0.0}[layout.recompute]
    cost = LayerCost(fwd, bwd, wgrad, recompute, fwd_comm, bwd_comm)
    _apply_overlap(cost, layout, hw)
    return cost


def _chunked(c: Collective, layout: Layout) -> bool:
    """Whether ``comm.chunks`` cuts this collective into pieces beside its GEMM."""
    if layout.chunks <= 1 or c.partner <= 0:  # metadata: nothing to pipeline with
        return False
    return layout.implementation == "ideal" or c.name in TRAINER_CHUNKED


def _apply_overlap(cost: LayerCost, layout: Layout, hw: Hardware) -> None:
    # The part of each collective that keeps the compute cores busy (CPU ranks with no
    # spare core) is on the critical path whatever the schedule; the rest can hide.
    pinned = hw.comm_cpu_share
    fwd_exposed = [c.seconds * (1 - pinned) for c in cost.fwd_comm]
    bwd_free = [c.seconds * (1 - pinned) for c in cost.bwd_comm]
    share = 1.0
    if layout.overlap and sum(bwd_free) > 0:
        hidden_by = cost.wgrad + cost.recompute
        share = max(0.0, sum(bwd_free) - hidden_by) / sum(bwd_free)
    bwd_exposed = [e * share for e in bwd_free]
    latency = hw.efficiency.chunk_latency_s

    def split(exposed: float, c: Collective) -> float:
        if not _chunked(c, layout):
            return exposed
        if exposed <= 0 and layout.implementation == "ideal":
            return exposed  # fused kernels: nothing left to hide, nothing is cut
        return _pipelined(exposed, c.partner, layout.chunks, latency)

    fwd_exposed = [split(e, c) for e, c in zip(fwd_exposed, cost.fwd_comm, strict=True)]
    bwd_exposed = [split(e, c) for e, c in zip(bwd_exposed, cost.bwd_comm, strict=True)]
    cost.exposed_fwd = sum(fwd_exposed) + pinned * sum(c.seconds for c in cost.fwd_comm)
    cost.exposed_bwd = sum(bwd_exposed) + pinned * sum(c.seconds for c in cost.bwd_comm)


def _pipelined(exposed: float, gemm: float, chunks: int, latency: float) -> float:
    """Exposed time of a collective cut into ``chunks`` pieces beside its GEMM."""
    return max(exposed - gemm, 0.0) + min(exposed, gemm) / chunks + (chunks - 1) * latency
