"""Training FLOPs per token by the paper's MFU definition (GEMMs + attention).

``6 * activated GEMM parameters + 6 * s * h per layer (causal attention)``:

* GEMM parameters: QKV and output projections, the k routed experts and the
  shared experts (3 * h * h_ffn each), and the LM head. The embedding is a
  lookup, not a GEMM. The router (h * E per layer) is left out: it is below
  0.05 % of the total and the paper's 282.46 GFLOP for Internal-352B is
  reproduced exactly without it.
* Attention: QK^T and AV cost 4 * s * h FLOPs per token forward over the full
  square; causal masking halves that, and backward doubles forward: 6 * s * h.
* Element-wise work (norms, SiLU, softmax, RoPE) does not count.

Imports no torch, so the planner and the control plane can use it.
"""

from __future__ import annotations

from trainer.config import ModelConfig


def attention_params(cfg: ModelConfig) -> int:
    qkv = cfg.hidden * (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim
    out = cfg.heads * cfg.head_dim * cfg.hidden
    return qkv + out


def activated_ffn_params(cfg: ModelConfig) -> int:
    routed = cfg.topk * 3 * cfg.hidden * cfg.ffn_hidden
    shared = cfg.shared_experts * 3 * cfg.hidden * cfg.shared_hidden
    return routed + shared


def activated_gemm_params(cfg: ModelConfig) -> int:
    per_layer = attention_params(cfg) + activated_ffn_params(cfg)
    return cfg.layers * per_layer + cfg.vocab_size * cfg.hidden


def total_params(cfg: ModelConfig) -> int:
    """Every parameter of the model (embedding, router and norms included)."""
    experts = cfg.experts * 3 * cfg.hidden * cfg.ffn_hidden
    shared = cfg.shared_experts * 3 * cfg.hidden * cfg.shared_hidden
    router = cfg.hidden * cfg.experts
    norms = 2 * cfg.hidden
    per_layer = attention_params(cfg) + experts + shared + router + norms
    return cfg.layers * per_layer + 2 * cfg.vocab_size * cfg.hidden + cfg.hidden


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training (forward + backward) FLOPs per token at the given sequence length."""
    s = seq_len or cfg.seq_len
    gemm = 6 * activated_gemm_params(cfg)
    attention = 6 * s * cfg.hidden * cfg.layers
    return float(gemm + attention)
