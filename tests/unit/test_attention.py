"""Attention and RoPE against naive implementations."""

import math

import pytest
import torch

from trainer.config import ModelConfig
from trainer.model.layers import Attention, RMSNorm, apply_rope, rope_tables

pytestmark = pytest.mark.timeout(60)


def naive_rope(x_BSND, positions, theta):
    """Rotate each pair (i, i + D/2) by angle pos * theta^(-2i/D), one pair at a time."""
    out = x_BSND.clone()
    D = x_BSND.shape[-1]
    half = D // 2
    for s, pos in enumerate(positions.tolist()):
        for i in range(half):
            angle = pos * theta ** (-2 * i / D)
            c, si = math.cos(angle), math.sin(angle)
            a, b = x_BSND[:, s, :, i], x_BSND[:, s, :, i + half]
            out[:, s, :, i] = a * c - b * si
            out[:, s, :, i + half] = a * si + b * c
    return out


def naive_attention(attn: Attention, x_BSH):
    B, S, H = x_BSH.shape
    q, k, v = attn.split_qkv(x_BSH @ attn.wqkv.weight.T)
    pos = torch.arange(S)
    q, k = naive_rope(q, pos, attn.rope_theta), naive_rope(k, pos, attn.rope_theta)
    group = attn.n_heads // attn.n_kv
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(attn.head_dim)
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.einsum("bnqk,bknd->bqnd", scores.softmax(-1), v).reshape(B, S, H)
    return out @ attn.wo.weight.T


def test_rope_matches_pairwise_rotation():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8)
    positions = torch.arange(5) + 7  # a shard that starts at position 7
    cos, sin = rope_tables(positions, 8, 10000.0)
    torch.testing.assert_close(apply_rope(x, cos, sin), naive_rope(x, positions, 10000.0))


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = rope_tables(torch.tensor([pq]), 16, 10000.0)
        ck, sk = rope_tables(torch.tensor([pk]), 16, 10000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(10, 3), score(107, 100))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 1)])
def test_gqa_attention_matches_naive(heads, kv_heads):
    torch.manual_seed(0)
    cfg = ModelConfig(hidden=64, heads=heads, kv_heads=kv_heads)
    attn = Attention(cfg)
    x = torch.randn(2, 12, 64)
    torch.testing.assert_close(attn(x), naive_attention(attn, x), rtol=1e-5, atol=1e-5)


def test_attention_is_causal():
    torch.manual_seed(0)
    attn = Attention(ModelConfig(hidden=32, heads=4, kv_heads=2))
    x = torch.randn(1, 10, 32)
    y = x.clone()
    y[:, 6:] = torch.randn(1, 4, 32)  # change only the future of position 5
    torch.testing.assert_close(attn(x)[:, :6], attn(y)[:, :6])


def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(3, 16)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
