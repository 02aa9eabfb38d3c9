"""The n-rank model: reference weights sharded onto one intra-node group.

``ParallelMoE`` holds this rank's share of every parameter: replicated ones
(embedding, norms, router, LM head, SP attention, shared experts) carry
``megamoe_replicated = True`` and have their gradients summed over the n ranks
after backward; sharded ones (TP attention heads, EP experts, TP expert
slices) are this rank's alone. ``shard_from_reference`` copies a reference
model's weights in, so both start identical and every gradient can be
compared slice by slice (``reference_slice``).

The residual stream is sequence-sharded in every mode: rank r holds tokens
[r L, (r + 1) L) of every sequence, L = S / n.

Under a pipeline, one ``ParallelMoE`` holds one pipeline rank's layers: one
contiguous stage, or with interleaving (``parallel.virtual_stages`` = v) v
non-adjacent chunks of them, run one chunk per forward call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import Config
from trainer.model.init import base_seed, init_placed
from trainer.model.layers import Embedding, Linear, RMSNorm
from trainer.model.transformer import MoETransformer
from trainer.parallel.block import LayerCtx, LayerResult, MacroLayer
from trainer.parallel.comm import Comm

PARAM_NAMES = ("ln1_w", "wqkv", "wo", "ln2_w", "router_w", "w1", "w3", "w2")
REF_NAMES = {
    "ln1_w": "attn_norm.weight",
    "wqkv": "attn.wqkv.weight",
    "wo": "attn.wo.weight",
    "ln2_w": "ffn_norm.weight",
    "router_w": "ffn.router.weight",
    "w1": "ffn.experts.w1",
    "w3": "ffn.experts.w3",
    "w2": "ffn.experts.w2",
    "sw1": "ffn.shared.w1",
    "sw3": "ffn.shared.w3",
    "sw2": "ffn.shared.w2",
}


def layer_ctx(cfg: Config, comm: Comm, rank: int, balanced_routing: bool = False) -> LayerCtx:
    m = cfg.model
    return LayerCtx(
        comm=comm,
        n=cfg.parallel.n,
        rank=rank,
        attention=cfg.parallel.attention,
        ffn_mode=cfg.ffn_mode,
        seq_len=m.seq_len,
        heads=m.heads,
        kv_heads=m.kv_heads,
        head_dim=m.head_dim,
        experts=m.experts,
        topk=m.topk,
        norm_topk=m.norm_topk,
        capacity_factor=m.capacity_factor,
        balance_coef=m.balance_coef,
        rope_theta=m.rope_theta,
        eps=m.norm_eps,
        overlap=cfg.comm.overlap,
        fp8=cfg.comm.fp8,
        chunks=cfg.comm.chunks,
        balanced_routing=balanced_routing,
    )


Piece = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def _box(offsets, sizes) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))


@dataclass(frozen=True)
class Placement:
    """Where a local parameter sits in the reference model's tensor ``name`` (full
    ``shape``): ``pieces`` are (local offsets, reference offsets, sizes) boxes that
    together make up the local tensor. Checkpoints use it to save and load every
    parameter under its reference name, whatever the layout."""

    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @classmethod
    def whole(cls, name: str, shape) -> Placement:
        shape = tuple(shape)
        zeros = (0,) * len(shape)
        return cls(name, shape, ((zeros, zeros, shape),))

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's local tensor, cut from the full reference tensor."""
        local = [
            max(lo[d] + size[d] for lo, _, size in self.pieces) for d in range(len(self.shape))
        ]
        out = full.new_empty(local)
        for local_off, ref_off, sizes in self.pieces:
            out[_box(local_off, sizes)] = full[_box(ref_off, sizes)]
        return out


class Slicer:
    """Which part of a reference tensor a local parameter holds."""

    def __init__(self, cfg: Config, ctx: LayerCtx) -> None:
        self.cfg, self.ctx = cfg, ctx

    def place(self, name: str, ref_name: str, shape) -> Placement:
        """The Placement of local parameter ``name`` in reference tensor ``ref_name``."""
        c, m = self.ctx, self.cfg.model
        r, n, D = c.rank, c.n, m.head_dim
        shape = tuple(shape)
        zeros = (0,) * len(shape)
        if name == "wqkv" and c.attention == "tp":
            nl, gl = m.heads // n, m.kv_heads // n
            starts = (r * nl * D, m.heads * D + r * gl * D, (m.heads + m.kv_heads) * D + r * gl * D)
            rows = (nl * D, gl * D, gl * D)
            local = (0, nl * D, (nl + gl) * D)
            pieces = tuple(
                ((lo, 0), (g, 0), (rr, shape[1]))
                for lo, g, rr in zip(local, starts, rows, strict=True)
            )
            return Placement(ref_name, shape, pieces)
        if name == "wo" and c.attention == "tp":
            nl = m.heads // n
            return Placement(ref_name, shape, ((zeros, (0, r * nl * D), (shape[0], nl * D)),))
        if name in ("w1", "w3", "w2"):
            if c.ffn_mode == "tp":  # h_ffn is the last dim of w1 / w3, the middle one of w2
                dim, width = (2 if name != "w2" else 1), m.ffn_hidden // n
            else:
                dim, width = 0, m.experts // n
            offsets = tuple(r * width if d == dim else 0 for d in range(len(shape)))
            sizes = tuple(width if d == dim else s for d, s in enumerate(shape))
            return Placement(ref_name, shape, ((zeros, offsets, sizes),))
        return Placement.whole(ref_name, shape)

    def __call__(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return self.place(name, name, full.shape).take(full)

    def replicated(self, name: str) -> bool:
        c = self.ctx
        if name in ("wqkv", "wo"):
            return c.attention == "sp"
        return name not in ("w1", "w3", "w2")


class ParallelBlock(nn.Module):
    """This rank's share of reference block ``layer`` (its index in the whole model)."""

    def __init__(self, cfg: Config, ctx: LayerCtx, ref_block: nn.Module, layer: int) -> None:
        super().__init__()
        self.ctx = ctx
        slicer = Slicer(cfg, ctx)
        ref = dict(ref_block.named_parameters())
        self.names = [p for p in (*PARAM_NAMES, "sw1", "sw3", "sw2") if REF_NAMES[p] in ref]
        for name in self.names:
            full = ref[REF_NAMES[name]].detach()
            place = slicer.place(name, f"blocks.{layer}.{REF_NAMES[name]}", full.shape)
            local = nn.Parameter(place.take(full))
            local.megamoe_replicated = slicer.replicated(name)
            local.megamoe_ref = REF_NAMES[name]
            local.megamoe_place = place
            self.register_parameter(name, local)

    def forward(self, x_BLH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, LayerResult]:
        result = LayerResult()
        out, bal = MacroLayer.apply(
            self.ctx, result, x_BLH, *(getattr(self, n) for n in self.names)
        )
        return out, bal, result


class ParallelMoE(nn.Module):
    """This rank's share of one pipeline rank's layers; forward takes this rank's sequence
    shard through one of its chunks.

    The L layers are cut into P * v model chunks of L / (P * v) layers (P =
    ``stages``, v = ``virtual_stages``); pipeline rank ``stage`` = s holds chunks
    s, P + s, ..., (v - 1) P + s, its local chunk j being model chunk j P + s. With
    v = 1 that is the contiguous stage [s l, (s + 1) l). Rank 0 also holds the
    embedding (its chunk 0 takes tokens), rank P - 1 the final norm and LM head (its
    last chunk gives logits); every other chunk takes and returns the residual
    stream [B, L, H]. ``blocks`` lists the rank's layers in chunk order.
    """

    def __init__(
        self,
        cfg: Config,
        comm: Comm,
        rank: int,
        reference: MoETransformer,
        stage: int = 0,
        stages: int = 1,
        balanced_routing: bool = False,
        virtual_stages: int = 1,
    ) -> None:
        super().__init__()
        self.cfg, self.comm = cfg, comm
        self.first, self.last = stage == 0, stage == stages - 1  # embedding / LM head here
        self.chunks = virtual_stages
        m = cfg.model
        self.ctx = layer_ctx(cfg, comm, rank, balanced_routing)
        self.per_chunk = m.layers // (stages * virtual_stages)
        self.layers = [
            (j * stages + stage) * self.per_chunk + k
            for j in range(virtual_stages)
            for k in range(self.per_chunk)
        ]
        self.blocks = nn.ModuleList(
            ParallelBlock(cfg, self.ctx, reference.blocks[layer], layer) for layer in self.layers
        )
        if self.first:
            self.embed = Embedding(m.vocab_size, m.hidden)
            self.embed.load_state_dict(reference.embed.state_dict())
        if self.last:
            self.final_norm = RMSNorm(m.hidden, m.norm_eps)
            self.head = Linear(m.hidden, m.vocab_size)
            self.final_norm.load_state_dict(reference.final_norm.state_dict())
            self.head.load_state_dict(reference.head.state_dict())
        for name, p in self.named_parameters():
            if not hasattr(p, "megamoe_replicated"):
                p.megamoe_replicated = True
                p.megamoe_ref = name
                p.megamoe_place = Placement.whole(name, p.shape)

    def takes_tokens(self, chunk: int) -> bool:
        """Whether local chunk ``chunk`` is the model's first (its input is tokens)."""
        return self.first and chunk == 0

    def gives_logits(self, chunk: int) -> bool:
        """Whether local chunk ``chunk`` is the model's last (its output is logits)."""
        return self.last and chunk == self.chunks - 1

    def chunk_parameters(self, chunk: int) -> list[nn.Parameter]:
        """The parameters local chunk ``chunk`` computes: its blocks', and the embedding or
        the final norm and head where the chunk is the model's first or last."""
        mods = list(self.blocks[chunk * self.per_chunk : (chunk + 1) * self.per_chunk])
        if self.takes_tokens(chunk):
            mods.append(self.embed)
        if self.gives_logits(chunk):
            mods += [self.final_norm, self.head]
        return [p for m in mods for p in m.parameters()]

    def forward(self, x: torch.Tensor, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Tokens or residual stream in; logits (the model's last chunk) or residual out."""
        if self.takes_tokens(chunk):
            x = self.embed(x)
        bal_total = x.new_zeros((), dtype=torch.float32)
        dropped = retained = 0
        counts = None
        for block in self.blocks[chunk * self.per_chunk : (chunk + 1) * self.per_chunk]:
            x, bal, result = block(x)
            bal_total = bal_total + bal
            dropped += result.dropped
            retained += result.retained_bytes
            if result.expert_counts is not None:
                c = result.expert_counts.detach().double()
                counts = c if counts is None else counts + c
        if self.gives_logits(chunk):
            x = self.head(self.final_norm(x))
        stats = {"dropped": dropped, "retained_bytes": retained, "expert_counts": counts}
        return x, bal_total, stats

    def local_loss(self, logits_BLV: torch.Tensor, targets_BL: torch.Tensor) -> torch.Tensor:
        """This rank's share of the batch-mean cross entropy (sums to it over the n ranks)."""
        total_tokens = targets_BL.numel() * self.cfg.parallel.n
        ce = F.cross_entropy(
            logits_BLV.float().flatten(0, 1), targets_BL.flatten(), reduction="sum"
        )
        return ce / total_tokens


def build_parallel_model(
    cfg: Config, comm: Comm, rank: int, device: torch.device, stage: int = 0
) -> ParallelMoE:
    """This rank's share of the reference of train.seed, and nothing else: the reference
    and the share are laid out on the meta device, then each local parameter is drawn
    alone (``trainer.model.init``) with exactly the values the reference holds."""
    torch.manual_seed(cfg.train.seed)
    seed = base_seed()  # what MoETransformer draws first after the same manual_seed
    with torch.device("meta"):
        reference = MoETransformer(cfg.model, groups=cfg.parallel.n, seed=seed)
        model = ParallelMoE(
            cfg,
            comm,
            rank,
            reference,
            stage,
            cfg.parallel.pp,
            virtual_stages=cfg.parallel.virtual_stages,
        )
    materialize(model, cfg.model, seed, device)
    return model


def materialize(model: nn.Module, mcfg, seed: int, device: torch.device) -> None:
    """Replace every meta parameter of ``model`` by its values, drawn from its Placement."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            place = p.megamoe_place
            values = init_placed(place.name, place.shape, place.pieces, mcfg, seed, p.dtype, device)
            new = nn.Parameter(values, requires_grad=p.requires_grad)
            for attr in ("megamoe_replicated", "megamoe_ref", "megamoe_place"):
                setattr(new, attr, getattr(p, attr))
            module._parameters[name] = new
