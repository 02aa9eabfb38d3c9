"""FLOPs per token by the paper's MFU definition."""

import pytest

from trainer.config import ModelConfig, load
from trainer.model.flops import flops_per_token, total_params

pytestmark = pytest.mark.timeout(30)


def test_internal_352b_matches_paper():
    cfg = load("configs/internal-352b.toml")
    assert flops_per_token(cfg.model, 8192) == pytest.approx(282.46e9, rel=1e-3)
    assert total_params(cfg.model) == pytest.approx(352e9, rel=0.01)


def test_small_model_by_hand():
    # h=8, 2 heads of 4, 1 kv head: qkv 8*(2+2)*4=128, out 8*8=64 -> 192 per layer.
    # top-1 of 2 experts with h_ffn 16: 3*8*16 = 384 per layer; LM head 10*8 = 80.
    cfg = ModelConfig(
        vocab_size=10, hidden=8, layers=3, heads=2, kv_heads=1, ffn_hidden=16, experts=2, topk=1
    )
    gemm = 3 * (192 + 384) + 80
    attention = 6 * 5 * 8 * 3
    assert flops_per_token(cfg, seq_len=5) == 6 * gemm + attention


def test_shared_expert_counts_as_always_active():
    base = ModelConfig()
    shared = ModelConfig(shared_experts=1)
    delta = flops_per_token(shared) - flops_per_token(base)
    assert delta == 6 * base.layers * 3 * base.hidden * base.ffn_hidden
