"""One training iteration: pipeline slots, bubbles, DP synchronisation, the optimizer.

With P stages and M micro-batches per replica, 1F1B runs every stage through
M forward/backward slots plus P - 1 slots of fill and drain; the slowest
stage sets the slot (the last stage also runs the LM head and loss), so

    iteration = (M + P - 1) * slot + exposed DP sync + optimizer step
    bubble share = (P - 1) / (M + P - 1)

Interleaved 1F1B (v virtual stages: each rank holds v non-adjacent chunks of
L / (P v) layers) fills and drains the pipeline in chunk slots of slot / v,
so the bubble shrinks v-fold: (P - 1) slot / v, a share (P - 1) / (v M + P - 1).

A slot is the stage's layers (compute + what their overlap leaves exposed,
``trainer.plan.layer``) plus, when pipeline sends are synchronous, one send
of the boundary activation forward and one of its gradient backward per
chunk - 2v sends ([b, s/n, h] per GPU; NVLink when the pipeline group fits in
a node, else the NIC). Asynchronous sends hide behind the slot.

DP synchronisation (ZeRO-1): after the last backward, gradients are
reduce-scattered over dp (FP32, or BF16 all-to-all + local FP32 sum: half the
bytes) and the updated parameters all-gathered (BF16). Only the first stage
has no slack for it (the others finish their last backward earlier and start
their first forward later). With ``dp_overlap`` the reduce-scatter is issued
layer by layer beside the last micro-batch's backward and the all-gather is
prefetched layer by layer beside the first forward, so about one layer's
share stays exposed unless the sync outlasts that window; without it both
are on the critical path. Replicated parameters first reduce inside the node
over NVLink (hierarchical), which runs beside the inter-node part.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from trainer.config import Config, ModelConfig
from trainer.model.flops import flops_per_token
from trainer.parallel import volumes
from trainer.plan.hardware import Hardware
from trainer.plan.layer import (
    Gemm,
    LayerCost,
    act_bytes,
    collective_seconds,
    comm_bytes,
    gemm_times,
    layer_cost,
    link_share,
)
from trainer.plan.layout import Layout, micro_batches
from trainer.plan.memory import Memory, layers_of, memory_per_gpu, stage_params


@dataclass(frozen=True)
class Prediction:
    """What one iteration of one layout costs; seconds are wall-clock per iteration."""

    system: str
    hardware: str
    gpus: int
    global_batch: int
    layout: Layout
    micro_batches: int
    seconds_per_iteration: float
    tokens_per_s: float
    mfu: float
    compute_s: float
    exposed_comm_s: float
    bubble_s: float
    dp_sync_s: float  # the exposed part; included in exposed_comm_s
    optimizer_s: float
    memory: Memory
    memory_capacity: float
    layer: LayerCost

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.memory_capacity

    @property
    def bubble_fraction(self) -> float:
        return self.bubble_s / self.seconds_per_iteration

    def terms(self) -> dict[str, float]:
        """The additive terms of the iteration time."""
        return {
            "compute": self.compute_s,
            "exposed communication": self.exposed_comm_s,
            "pipeline bubble": self.bubble_s,
            "optimizer": self.optimizer_s,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "gpu": self.hardware,
            "gpus": self.gpus,
            "global_batch": self.global_batch,
            "micro_batches": self.micro_batches,
            "tokens_per_s": self.tokens_per_s,
            "seconds_per_iteration": self.seconds_per_iteration,
            "mfu": self.mfu,
            "compute_s": self.compute_s,
            "exposed_comm_s": self.exposed_comm_s,
            "dp_sync_exposed_s": self.dp_sync_s,
            "bubble_s": self.bubble_s,
            "bubble_fraction": self.bubble_fraction,
            "optimizer_s": self.optimizer_s,
            "memory_per_gpu_bytes": self.memory.total,
            "memory_breakdown_bytes": self.memory.to_dict(),
            "memory_capacity_bytes": self.memory_capacity,
            "fits": self.fits,
            "layer_ms": {
                "compute": self.layer.compute * 1e3,
                "communication": self.layer.comm * 1e3,
                "exposed": self.layer.exposed * 1e3,
            },
            "layout": self.layout.to_dict(),
        }


def _lm_head_seconds(model: ModelConfig, layout: Layout, hw: Hardware, dtype: str) -> float:
    T = layout.micro_batch * model.seq_len
    if layout.vocab_parallel:
        head = Gemm("lm_head", T, model.vocab_size / layout.n, model.hidden)
    else:
        head = Gemm("lm_head", T / layout.n, model.vocab_size, model.hidden)
    t = gemm_times(head, hw, dtype)
    # Softmax cross-entropy over FP32 logits: about four passes (write, max/sum, grad).
    logits = 4 * 4 * T / layout.n * model.vocab_size
    eff = hw.efficiency
    return t.fwd + t.dgrad + t.wgrad + logits / (hw.hbm_bw * eff.hbm * eff.framework)


def _vocab_comm_seconds(model: ModelConfig, layout: Layout, hw: Hardware, dtype: str) -> float:
    """A vocabulary-split embedding or LM head: one [b, s, h] gather (or reduce-scatter)
    forward and its dual backward, on the critical path."""
    if not layout.vocab_parallel or layout.n == 1:
        return 0.0
    half = volumes.tp_attention(layout.micro_batch, model.seq_len, model.hidden, layout.n) / 2
    nbytes = half * comm_bytes(dtype, layout.fp8)
    return 2 * collective_seconds("ag", nbytes, hw)


def _link(hw: Hardware, group_span: int) -> float:
    """Effective bytes/s of a group spanning ``group_span`` consecutive GPUs."""
    eff = hw.efficiency
    if group_span <= hw.gpus_per_node:
        return hw.nvlink_bw * eff.gather_scatter
    return hw.nic_bw * eff.nic


def pp_send_seconds(model: ModelConfig, layout: Layout, hw: Hardware, dtype: str) -> float:
    """One point-to-point send of a micro-batch's boundary activation (or its gradient)."""
    if layout.pp == 1:
        return 0.0
    nbytes = layout.micro_batch * model.seq_len / layout.n * model.hidden * act_bytes(dtype)
    return hw.efficiency.latency_s + nbytes / _link(hw, layout.n * layout.pp)


def _stage_slot(
    model: ModelConfig, layout: Layout, hw: Hardware, dtype: str, layer: LayerCost, stage: int
) -> tuple[float, float]:
    """(compute, exposed communication) of one forward + backward slot of ``stage``."""
    layers = layers_of(model, layout, stage)
    compute = layers * layer.compute
    if stage == layout.pp - 1:
        compute += _lm_head_seconds(model, layout, hw, dtype)
    comm = layers * layer.exposed
    comm += ((stage == 0) + (stage == layout.pp - 1)) * _vocab_comm_seconds(
        model, layout, hw, dtype
    )
    # Every chunk of an interleaved rank receives its input and sends its output.
    sends = 2 * layout.virtual_stages * pp_send_seconds(model, layout, hw, dtype)
    comm += max(0.0, sends - compute) if layout.pp_async else sends
    return compute, comm


def _dp_sync_exposed(
    model: ModelConfig, layout: Layout, hw: Hardware, dtype: str, layer: LayerCost
) -> float:
    """Seconds of the first stage's gradient + parameter sync left on the critical path."""
    params = stage_params(model, layout, 0)
    eff, n, dp = hw.efficiency, layout.n, layout.dp
    grad_bytes = 4 if layout.grad_sync == "fp32_rs" else 2
    param_bytes = act_bytes(dtype)
    inter_bw = _link(hw, n * layout.pp * dp)
    ag_bw = hw.nvlink_bw * link_share("ag", eff)
    rs_bw = hw.nvlink_bw * link_share("rs", eff)
    across = params.synced_across_nodes(layout) * (dp - 1) / dp
    inside = params.replicated * (n - 1) / n

    def seconds(inter_bytes: int, intra_bytes: int, intra_bw: float) -> float:
        inter = across * inter_bytes / inter_bw if dp > 1 else 0.0
        intra = inside * intra_bytes / intra_bw if n > 1 else 0.0
        return (eff.latency_s if inter or intra else 0.0) + max(inter, intra)

    # The node's reduce-scatter sums the FP32 gradient buffer (trainer.parallel.zero);
    # only the step across the DP group is compressed.
    rs, ag = seconds(grad_bytes, 4, rs_bw), seconds(param_bytes, param_bytes, ag_bw)
    if not layout.dp_overlap:
        return rs + ag
    # Issued per layer: all but the last layer's (first layer's) share can run
    # beside the backward (forward) of the other layers of the stage.
    # What keeps the compute cores busy (CPU ranks, ``comm_cpu_share``) stays exposed.
    layers = layers_of(model, layout, 0)
    rs_window = (layers - 1) * (layer.bwd_compute + layer.recompute)
    ag_window = (layers - 1) * layer.fwd_compute
    pinned = hw.comm_cpu_share
    rs, ag, busy = rs * (1 - pinned), ag * (1 - pinned), (rs + ag) * pinned
    return busy + max(rs / layers, rs - rs_window) + max(ag / layers, ag - ag_window)


def _step_all_reduces(layout: Layout, hw: Hardware) -> float:
    """The trainer's per-step scalars over the world (``trainer.parallel.step``): global
    gradient norm, pipeline timing and loss, one latency each (ignored for the ideal)."""
    if layout.implementation != "trainer" or layout.gpus == 1:
        return 0.0
    return 3 * hw.efficiency.latency_s


def _optimizer_seconds(model: ModelConfig, layout: Layout, hw: Hardware) -> float:
    """AdamW over this GPU's ZeRO-1 shard: about 36 bytes of HBM traffic per parameter."""
    owned = max(stage_params(model, layout, s).optimizer_shard(layout) for s in range(layout.pp))
    eff = hw.efficiency
    return owned * 36 / (hw.hbm_bw * eff.hbm * eff.framework)


def predict(
    cfg: Config,
    hw: Hardware,
    layout: Layout,
    global_batch: int | None = None,
    system: str = "custom",
) -> Prediction:
    """Seconds per iteration, throughput, MFU and memory of ``layout`` on ``hw``."""
    model, dtype = cfg.model, cfg.train.dtype
    batch = global_batch or cfg.train.global_batch
    M = micro_batches(layout, batch)
    layer = layer_cost(model, layout, hw, dtype)
    slots = [_stage_slot(model, layout, hw, dtype, layer, s) for s in range(layout.pp)]
    compute, comm = max(slots, key=sum)
    slot = compute + comm
    dp_exposed = _dp_sync_exposed(model, layout, hw, dtype, layer)
    dp_exposed += _step_all_reduces(layout, hw)
    optimizer = _optimizer_seconds(model, layout, hw)
    bubble = (layout.pp - 1) * slot / layout.virtual_stages
    iteration = M * slot + bubble + dp_exposed + optimizer
    tokens = batch * model.seq_len
    tokens_per_s = tokens / iteration
    mfu = tokens_per_s * flops_per_token(model) / (layout.gpus * hw.peak(dtype))
    return Prediction(
        system=system,
        hardware=hw.name,
        gpus=layout.gpus,
        global_batch=batch,
        layout=layout,
        micro_batches=M,
        seconds_per_iteration=iteration,
        tokens_per_s=tokens_per_s,
        mfu=mfu,
        compute_s=M * compute,
        exposed_comm_s=M * comm + dp_exposed,
        bubble_s=bubble,
        dp_sync_s=dp_exposed,
        optimizer_s=optimizer,
        memory=memory_per_gpu(model, layout, hw, dtype, M),
        memory_capacity=hw.memory_bytes,
        layer=layer,
    )


ABLATION_RUNGS = (
    "TP attention + TP FFN, no overlap",
    "SP + EP",
    "+ inter-op overlap",
    "+ intra-op overlap",
)


def ablation_ladder(cfg: Config, hw: Hardware, method: Layout, global_batch: int | None = None):
    """The paper's ablation: (label, prediction, throughput relative to the first rung)."""
    rungs = [
        replace(method, attention="tp", ffn="tp", overlap=False, chunks=1),
        replace(method, overlap=False, chunks=1),
        replace(method, chunks=1),
        method,
    ]
    preds = [predict(cfg, hw, r, global_batch, "megamoe") for r in rungs]
    base = preds[0].tokens_per_s
    return [
        (label, p, p.tokens_per_s / base) for label, p in zip(ABLATION_RUNGS, preds, strict=True)
    ]
