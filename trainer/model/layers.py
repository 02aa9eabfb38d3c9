"""Dense building blocks: RMSNorm, rotary position embedding, GQA attention.

Shape legend: B batch, S sequence, H hidden, N query heads, G kv heads,
D head dim (H / N).

Attention keeps one fused QKV weight laid out as [q heads | k heads | v heads]
along its output dimension, so a parallel layout can slice whole heads out of
each part, and calls torch's scaled_dot_product_attention (flash / memory-
efficient kernels where the device has them, a math kernel on CPU). RoPE takes
explicit positions so a sequence shard can be rotated with its global offsets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig


class Linear(nn.Linear):
    """``nn.Linear`` without a bias, whose default initialisation is skipped on the meta
    device, where there are no values to draw: there the draw runs a Python
    decomposition that loads torch.compile's machinery, about 1.1 s of CPU at every
    start of every rank (a rank lays its reference out on the meta device and draws
    only its own share, ``trainer.parallel.model``). Anywhere else it is nn.Linear's."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class Embedding(nn.Embedding):
    """``nn.Embedding`` whose default initialisation is skipped on the meta device,
    like ``Linear``'s."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def rope_tables(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [S, D] for the given absolute positions (rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x_BSND: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + D/2]) by the position's angle."""
    half = x_BSND.shape[-1] // 2
    x1, x2 = x_BSND[..., :half], x_BSND[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    cos = cos_SD[None, :, None, :].to(x_BSND.dtype)
    sin = sin_SD[None, :, None, :].to(x_BSND.dtype)
    return x_BSND * cos + rotated * sin


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.rope_theta = cfg.rope_theta
        qkv_out = (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim
        self.wqkv = Linear(cfg.hidden, qkv_out)
        self.wo = Linear(cfg.heads * cfg.head_dim, cfg.hidden)

    def split_qkv(self, qkv_BSX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, S, _ = qkv_BSX.shape
        nq, nk = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        q, k, v = qkv_BSX.split([nq, nk, nk], dim=-1)
        shape = (B, S, -1, self.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def forward(self, x_BSH: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        B, S, _ = x_BSH.shape
        if positions is None:
            positions = torch.arange(S, device=x_BSH.device)
        q, k, v = self.split_qkv(self.wqkv(x_BSH))
        cos, sin = rope_tables(positions, self.head_dim, self.rope_theta)
        cos, sin = cos.to(x_BSH.device), sin.to(x_BSH.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out_BNSD = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            enable_gqa=self.n_kv != self.n_heads,
        )
        return self.wo(out_BNSD.transpose(1, 2).reshape(B, S, -1))


def init_weights(module: nn.Module, cfg: ModelConfig, seed: int | None = None) -> None:
    """Normal(0, init_std) everywhere, residual-branch outputs scaled by 1/sqrt(2 * layers),
    norms at one; each tensor from its own stream (``trainer.model.init``)."""
    from trainer.model.init import init_reference

    init_reference(module, cfg, seed)
