"""The single-device reference MoE transformer.

Every parallel layout is checked against this model: same weights, same
batch, same loss and gradients. It is architecture only (no process groups):
pre-norm blocks of GQA attention and a top-k MoE FFN (plus optional shared
experts), untied embedding and LM head.

``groups`` is the number of device groups the router balances and caps over
(``parallel.n``); a one-process run with ``groups = n`` is the reference of
an n-rank run.

Shape legend: B batch, S sequence, H hidden, V vocab, T = B * S tokens,
E experts, k top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig
from trainer.model.experts import DenseSwiGLU, RoutedExperts
from trainer.model.init import base_seed
from trainer.model.layers import Attention, Embedding, Linear, RMSNorm, init_weights
from trainer.model.router import balance_loss, route


@dataclass
class MoEStats:
    """What the MoE layers of one forward pass report besides activations."""

    balance_loss: torch.Tensor  # alpha * sum over layers (differentiable)
    dropped: int  # dropped (token, slot) assignments, all layers
    assignments: int  # (token, slot) assignments routed, all layers
    expert_counts_LE: torch.Tensor  # processed assignments per layer and expert


class MoEFFN(nn.Module):
    def __init__(self, cfg: ModelConfig, groups: int) -> None:
        super().__init__()
        self.cfg, self.groups = cfg, groups
        self.router = Linear(cfg.hidden, cfg.experts)
        self.experts = RoutedExperts(cfg.experts, cfg.hidden, cfg.ffn_hidden)
        self.shared = (
            DenseSwiGLU(cfg.hidden, cfg.shared_experts * cfg.shared_hidden)
            if cfg.shared_experts
            else None
        )

    def forward(self, x_BSH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        B, S, H = x_BSH.shape
        x_TH = x_BSH.reshape(B * S, H)
        routing = route(
            self.router(x_TH),
            self.cfg.topk,
            self.groups,
            self.cfg.capacity_factor,
            self.cfg.norm_topk,
        )
        out = self.experts(x_TH, routing.expert_ids_Tk, routing.gates_Tk, routing.keep_Tk)
        if self.shared is not None:
            out = out + self.shared(x_TH)
        aux = balance_loss(routing.probs_TE, routing.expert_ids_Tk, self.groups)
        return out.view(B, S, H), aux, routing.counts_E, routing.dropped


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, groups: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.ffn = MoEFFN(cfg, groups)

    def forward(self, x_BSH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        h = x_BSH + self.attn(self.attn_norm(x_BSH))
        ffn_out, aux, counts, dropped = self.ffn(self.ffn_norm(h))
        return h + ffn_out, aux, counts, dropped


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, groups: int = 1, seed: int | None = None) -> None:
        super().__init__()
        if cfg.experts % groups:
            raise ValueError(f"experts = {cfg.experts} not divisible by groups = {groups}")
        # Drawn first, before the layers' own default initialisation uses the global
        # generator, so build_parallel_model draws the same after the same manual_seed.
        seed = base_seed(seed)
        self.cfg, self.groups = cfg, groups
        self.embed = Embedding(cfg.vocab_size, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg, groups) for _ in range(cfg.layers))
        self.final_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.head = Linear(cfg.hidden, cfg.vocab_size)
        init_weights(self, cfg, seed)

    def forward(self, tokens_BS: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        x = self.embed(tokens_BS)
        aux_total = x.new_zeros((), dtype=torch.float32)
        counts, dropped = [], 0
        for block in self.blocks:
            x, aux, layer_counts, layer_dropped = block(x)
            aux_total = aux_total + aux
            counts.append(layer_counts)
            dropped += layer_dropped
        logits = self.head(self.final_norm(x))
        assignments = tokens_BS.numel() * self.cfg.topk * self.cfg.layers
        stats = MoEStats(
            self.cfg.balance_coef * aux_total, dropped, assignments, torch.stack(counts)
        )
        return logits, stats


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy, computed in fp32."""
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())
