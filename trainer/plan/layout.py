"""A layout to plan: how one iteration is spread over the cluster and what it overlaps.

The fields mirror the trainer's config (``parallel.*``, ``train.micro_batch``,
``comm.*``) plus the three things the trainer fixes by design but the
baseline does differently: how activations are kept for backward
(``recompute``), whether the DP/PP synchronisation is overlapped, and whether
pipeline sends are asynchronous. Two presets name the systems compared:

* ``megamoe`` (the method): SP attention, EP experts (``auto``: all-to-all
  when k < n), inter-operator overlap, intra-operator pipelining in
  ``comm.chunks`` pieces (4 when the config says 1), selective activation
  rematerialisation (SAR), BF16 all-to-all gradient sync, DP/PP
  synchronisation overlapped.
* ``megatron`` (the baseline, Megatron-LM style): TP attention and TP experts
  inside the node with sequence parallelism, nothing overlapped inside the
  layer, FP32 gradient reduce-scatter after backward, synchronous pipeline
  sends, embedding and LM head split over the vocabulary (their inputs
  gathered and outputs reduce-scattered over the n-group, unoverlapped),
  and full activation recomputation (Megatron-LM has no SAR; storing every
  intermediate of a large MoE layer leaves no headroom beside its optimizer
  state - 74.8 of 80 GiB for Internal-352B at 240 GPUs - so its recipes for
  large MoE models recompute whole layers).

``from_config`` is the config as written (the ``config`` column of ``megamoe
plan``): its n, pp, dp, virtual stages, micro-batch, attention and FFN modes,
overlap, chunks, gradient sync and FP8, with the method's fixed parts (the
paper's kernels, SAR, asynchronous pipeline sends, replicated embedding and LM
head) and DP/PP synchronisation overlapped exactly when ``comm.overlap`` is on.
A config that sets everything as the ``megamoe`` preset does predicts the same.

``trainer_layout`` is what ``megamoe train`` runs for a config
(``implementation="trainer"``), which bench/calibrate.py predicts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from trainer.config import Config, apply_overrides, resolve_ffn
from trainer.errors import ConfigError

RECOMPUTE = ("sar", "full", "none")


@dataclass(frozen=True)
class Layout:
    n: int
    pp: int
    dp: int
    micro_batch: int = 1  # sequences per forward call
    attention: str = "sp"  # sp | tp
    ffn: str = "ep_a2a"  # ep_a2a | ep_agrs | tp (auto is resolved before planning)
    overlap: bool = True  # inter-operator overlap
    chunks: int = 4  # intra-operator pipelining pieces; 1 = none
    grad_sync: str = "bf16_a2a"  # fp32_rs | bf16_a2a
    fp8: bool = False  # FP8 communication inside the layer
    recompute: str = "sar"  # sar | full | none
    dp_overlap: bool = True  # gradient RS / parameter AG beside the first / last micro-batch
    pp_async: bool = True  # pipeline sends beside compute
    vocab_parallel: bool = False  # embedding / LM head split over n (else replicated, local shard)
    # ideal: the paper's kernels (every collective chunked beside its GEMM, FP8 on all of
    # them); trainer: what trainer.parallel does (chunks on the SP-attention and FFN pairs,
    # forward and backward; FP8 on dispatch/combine, forward reductions and gradient
    # all-gathers)
    implementation: str = "ideal"
    virtual_stages: int = 1  # interleaved 1F1B: layer chunks per pipeline rank

    @property
    def gpus(self) -> int:
        return self.n * self.pp * self.dp

    def describe(self) -> str:
        over = "overlap" if self.overlap else "no overlap"
        if self.chunks > 1:
            over += f", {self.chunks} chunks"
        v = f" v={self.virtual_stages}" if self.virtual_stages > 1 else ""
        return (
            f"n={self.n} pp={self.pp}{v} dp={self.dp} b={self.micro_batch} "
            f"{self.attention}+{self.ffn}, {over}, {self.grad_sync}, recompute={self.recompute}"
            + (", fp8" if self.fp8 else "")
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def overrides(self, global_batch: int) -> list[str]:
        """``--set`` strings that make a config train this layout (what the trainer knows)."""
        return [
            f"parallel.n={self.n}",
            f"parallel.pp={self.pp}",
            f"parallel.virtual_stages={self.virtual_stages}",
            f"parallel.dp={self.dp}",
            f"parallel.attention={self.attention}",
            f"parallel.ffn={self.ffn}",
            f"train.global_batch={global_batch}",
            f"train.micro_batch={self.micro_batch}",
            f"comm.overlap={str(self.overlap).lower()}",
            f"comm.chunks={self.chunks}",
            f"comm.grad_sync={self.grad_sync}",
            f"comm.fp8={str(self.fp8).lower()}",
        ]


def dp_for(cfg: Config, gpus: int, n: int, pp: int) -> int:
    """Data-parallel size that fills ``gpus`` with groups of n x pp, or a ConfigError."""
    group = n * pp
    if gpus % group:
        raise ConfigError(
            f"--gpus {gpus} is not divisible by parallel.n * parallel.pp = {n} * {pp} = {group} "
            "(try --search for a layout that fits)"
        )
    return gpus // group


def planned_config(cfg: Config, gpus: int, global_batch: int) -> Config:
    """``cfg`` on ``gpus`` GPUs with ``global_batch`` sequences, validated again.

    Every key is taken as written except parallel.dp when n * pp * dp does not make
    ``gpus``: then dp = GPUs / (n * pp), as the presets do (the table says so), and a
    cluster that is not a whole number of n x pp groups is a ConfigError."""
    p = cfg.parallel
    overrides = []
    if global_batch != cfg.train.global_batch:
        overrides.append(f"train.global_batch={global_batch}")
    if p.world != gpus:
        overrides.append(f"parallel.dp={dp_for(cfg, gpus, p.n, p.pp)}")
    return apply_overrides(cfg, overrides) if overrides else cfg


def from_config(cfg: Config, gpus: int, global_batch: int) -> Layout:
    """The config as written on ``gpus`` GPUs (``planned_config``), with the method's
    fixed parts: the layout the trainer runs, on the paper's kernels, its DP/PP
    synchronisation overlapping when ``comm.overlap`` is on."""
    cfg = planned_config(cfg, gpus, global_batch)
    return replace(trainer_layout(cfg), dp_overlap=cfg.comm.overlap, implementation="ideal")


def megamoe(cfg: Config, gpus: int, global_batch: int) -> Layout:
    """The method at the config's n and pp."""
    p = cfg.parallel
    chunks = cfg.comm.chunks if cfg.comm.chunks > 1 else 4
    return _with_batch(
        Layout(
            n=p.n,
            pp=p.pp,
            dp=dp_for(cfg, gpus, p.n, p.pp),
            attention="sp",
            ffn=resolve_ffn("auto", cfg.model.topk, p.n),
            overlap=True,
            chunks=chunks,
            grad_sync="bf16_a2a",
            fp8=cfg.comm.fp8,
            recompute="sar",
        ),
        cfg,
        global_batch,
    )


def megatron(cfg: Config, gpus: int, global_batch: int) -> Layout:
    """The Megatron-LM-style baseline at the config's n and pp."""
    return baseline_like(megamoe(cfg, gpus, global_batch))


def trainer_layout(cfg: Config) -> Layout:
    """The layout ``megamoe train`` runs for ``cfg``, as ``trainer.parallel`` implements it.

    The config's n, pp, dp, micro-batch, attention and FFN modes, overlap, chunks, gradient
    sync and FP8; plus what the trainer fixes: SAR in every mode (the macro layer),
    asynchronous pipeline sends, embedding and LM head replicated on the local shard,
    and the trainer's chunk and FP8 scopes (``implementation="trainer"``). Routing is
    balanced, as everywhere in the model (the benchmarks force it).

    DP synchronisation after the last backward, as the recorded ablation ran.
    ``trainer.parallel.zero`` has since started issuing the gradient reduce-scatter
    beside backward under ``comm.overlap`` (the parameter all-gather still follows
    the optimizer step); ``dp_overlap=True`` would also hide the all-gather, so it
    is left off until the model has that half-overlapped form.
    """
    p = cfg.parallel
    return Layout(
        n=p.n,
        pp=p.pp,
        dp=p.dp,
        micro_batch=cfg.micro_batch_size,
        attention=p.attention,
        ffn=resolve_ffn(p.ffn, cfg.model.topk, p.n),
        overlap=cfg.comm.overlap,
        chunks=cfg.comm.chunks,
        grad_sync=cfg.comm.grad_sync,
        fp8=cfg.comm.fp8,
        recompute="sar",
        dp_overlap=False,
        pp_async=True,
        vocab_parallel=False,
        implementation="trainer",
        virtual_stages=p.virtual_stages,
    )


def baseline_like(layout: Layout) -> Layout:
    """The baseline at another layout's n, pp, dp and micro-batch."""
    return replace(
        layout,
        attention="tp",
        ffn="tp",
        overlap=False,
        chunks=1,
        grad_sync="fp32_rs",
        fp8=False,
        recompute="full",
        dp_overlap=False,
        pp_async=False,
        vocab_parallel=True,
    )


def _with_batch(layout: Layout, cfg: Config, global_batch: int) -> Layout:
    """The config's micro-batch when it sets one, else one sequence (the paper's setting)."""
    per_replica = global_batch // layout.dp
    if global_batch % layout.dp:
        raise ConfigError(
            f"global batch {global_batch} sequences is not divisible by dp = {layout.dp} "
            f"(GPUs / (parallel.n * parallel.pp))"
        )
    b = cfg.train.micro_batch or 1
    if per_replica % b:
        raise ConfigError(
            f"train.micro_batch = {b} does not divide the {per_replica} sequences per replica"
        )
    return replace(layout, micro_batch=b)


def micro_batches(layout: Layout, global_batch: int) -> int:
    return global_batch // (layout.dp * layout.micro_batch)
