"""Parameters and memory per GPU for a layout.

Parameters come in two sync classes, as in ``trainer.parallel.zero``:
*sharded* over the n-group (EP experts, every TP slice, a vocabulary-split
embedding and LM head) and *replicated* on the n ranks (SP attention, norms,
router, shared experts under EP, an embedding and LM head that run on the
local sequence shard). Gradients of sharded parameters are summed over dp;
replicated ones over n x dp (hierarchically: what crosses the NIC is 1/n of
them).

Memory on the busiest GPU of a pipeline stage:

* weights (BF16, 2 B; 4 B in fp32 runs), FP32 gradient buffer (4 B), and
  ZeRO-1 optimizer shards: FP32 master + Adam m and v (12 B) over dp for
  sharded parameters and over n x dp for replicated ones.
* activations kept for backward, per layer and in-flight micro-batch
  (1F1B: stage s holds min(P - s, M) micro-batches; interleaved with v
  virtual stages, the first stage P + (P - 1)/v, see ``in_flight``): SAR keeps
  ``(2kf + 4 + 2/m) bsh/n`` (+ 2 f_shared bsh/n per shared expert); storing
  everything costs ``(2n + 2k + 3kf + 12 + 5/m) bsh/n`` (+ (2 + 3 f_shared)
  bsh/n per shared expert); full recomputation keeps the layer input bsh/n.
* one layer's full intermediates as the working set of the layer running
  backward, the FP32 logits and their gradient on the last stage, and a
  fixed reserve for the runtime, communicator buffers and allocator slack.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config import ModelConfig
from trainer.model.flops import attention_params
from trainer.parallel import volumes
from trainer.plan.hardware import Hardware
from trainer.plan.layer import act_bytes
from trainer.plan.layout import Layout


@dataclass(frozen=True)
class StageParams:
    """Parameters held by one GPU of a stage: sharded (1/n each) and replicated."""

    sharded: float
    replicated: float

    @property
    def held(self) -> float:
        return self.sharded + self.replicated

    def optimizer_shard(self, layout: Layout) -> float:
        """Parameters whose optimizer state this GPU owns under ZeRO-1."""
        return self.sharded / layout.dp + self.replicated / (layout.n * layout.dp)

    def synced_across_nodes(self, layout: Layout) -> float:
        """Parameters per GPU whose gradient / value crosses the DP group."""
        return self.sharded + self.replicated / layout.n


def stage_params(model: ModelConfig, layout: Layout, stage: int) -> StageParams:
    n, h = layout.n, model.hidden
    layers = layers_of(model, layout, stage)
    sharded = replicated = 0.0
    attention = float(attention_params(model))
    if layout.attention == "sp":
        replicated += layers * attention
    else:
        sharded += layers * attention / n
    sharded += layers * model.experts * 3 * h * model.ffn_hidden / n
    shared = model.shared_experts * 3 * h * model.shared_hidden
    # TP slices the shared experts too - in the paper's layouts; the trainer's macro layer
    # runs them whole on every rank of the group in every FFN mode.
    if layout.ffn == "tp" and layout.implementation != "trainer":
        sharded += layers * shared / n
    else:
        replicated += layers * shared
    replicated += layers * (2 * h + h * model.experts)  # norms, router
    replicated += h * (stage == layout.pp - 1)  # the final norm
    vocab = model.vocab_size * h
    ends = (stage == 0) + (stage == layout.pp - 1)  # embedding first, LM head last
    if not layout.vocab_parallel:
        replicated += ends * vocab
    else:
        sharded += ends * vocab / n
    return StageParams(sharded, replicated)


def layers_of(model: ModelConfig, layout: Layout, stage: int) -> int:
    base, extra = divmod(model.layers, layout.pp)
    return base + (stage < extra)


@dataclass(frozen=True)
class Memory:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    workspace: float
    reserved: float

    @property
    def total(self) -> float:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.workspace
            + self.reserved
        )

    def to_dict(self) -> dict[str, float]:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "workspace": self.workspace,
            "reserved": self.reserved,
            "total": self.total,
        }


def activation_elements_per_layer(model: ModelConfig, layout: Layout) -> float:
    """Elements kept per layer and micro-batch on one GPU, by activation policy."""
    b, s, h, n = layout.micro_batch, model.seq_len, model.hidden, layout.n
    m, k, f = model.gqa_ratio, model.topk, model.ffn_hidden / model.hidden
    f_shared = model.shared_hidden / model.hidden
    unit = b * s * h / n
    if layout.recompute == "sar":
        return (
            volumes.sar_retained(b, s, h, n, m, k, f) + model.shared_experts * 2 * f_shared * unit
        )
    full = volumes.full_retained(b, s, h, n, m, k, f)
    full += model.shared_experts * (2 + 3 * f_shared) * unit
    return full if layout.recompute == "none" else unit


def in_flight(layout: Layout, micro_batches: int, stage: int) -> float:
    """Micro-batches whose activations stage ``stage`` holds at its peak.

    1F1B: P - s. Interleaved (v > 1, Megatron-LM's schedule): rank s runs
    (v - 1) P + 2 (P - 1 - s) chunk forwards before its first backward and one more
    in the steady state, each chunk 1/v of its layers - for the first stage
    P + (P - 1)/v micro-batches' worth."""
    P, v = layout.pp, layout.virtual_stages
    if v == 1:
        return min(P - stage, micro_batches)
    chunks = (v - 1) * P + 2 * (P - 1 - stage) + 1
    return min(chunks, v * micro_batches) / v


def memory_per_gpu(
    model: ModelConfig, layout: Layout, hw: Hardware, dtype: str, micro_batches: int
) -> Memory:
    """The busiest stage's memory (each term maximised over stages)."""
    return max(
        (_stage_memory(model, layout, hw, dtype, micro_batches, s) for s in range(layout.pp)),
        key=lambda mem: mem.total,
    )


def _stage_memory(
    model: ModelConfig, layout: Layout, hw: Hardware, dtype: str, micro_batches: int, stage: int
) -> Memory:
    params = stage_params(model, layout, stage)
    unit = act_bytes(dtype)
    weight_bytes, state_bytes = (2, 12) if dtype == "bf16" else (4, 8)
    per_layer = activation_elements_per_layer(model, layout) * unit
    held = in_flight(layout, micro_batches, stage)
    activations = layers_of(model, layout, stage) * held * per_layer
    b, s, h, n = layout.micro_batch, model.seq_len, model.hidden, layout.n
    m, k, f = model.gqa_ratio, model.topk, model.ffn_hidden / model.hidden
    workspace = volumes.full_retained(b, s, h, n, m, k, f) * unit
    if stage == layout.pp - 1:
        workspace += 2 * 4 * b * s / n * model.vocab_size  # FP32 logits and their gradient
    return Memory(
        weights=params.held * weight_bytes,
        gradients=params.held * 4,
        optimizer=params.optimizer_shard(layout) * state_bytes,
        activations=activations,
        workspace=workspace,
        reserved=hw.efficiency.reserved_bytes,
    )
