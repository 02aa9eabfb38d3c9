"""Closed-form communication volumes and retained activations per layer (MegaScale-MoE,
arXiv 2505.11432: SP attention, EP experts, selective activation rematerialisation).

Elements one rank puts on its links in the forward pass of one layer, with
b sequences of length s, hidden h, n ranks, GQA ratio m, top-k k and
f = h_ffn / h; the convention is that of ``trainer.parallel.comm`` (an
all-to-all counts what leaves the rank, an all-gather / reduce-scatter
(n - 1) / n of the full tensor).

The SP attention form is half the paper's expression: docs/PARALLEL.md
("The SP attention volume: our derivation") counts what Ulysses sends.
"""

from __future__ import annotations


def tp_attention(b: int, s: int, h: int, n: int) -> float:
    """All-gather before QKV + reduce-scatter after W_o."""
    return 2 * b * s * h * (n - 1) / n


def sp_attention(b: int, s: int, h: int, n: int, m: int) -> float:
    """All-to-all of q, k, v plus all-to-all of the attention output."""
    return b * s * h * (n - 1) / n * (2 + 2 / m) / n


def ep_a2a(b: int, s: int, h: int, n: int, k: int) -> float:
    """Dispatch + combine all-to-alls with balanced routing."""
    return 2 * k / n * b * s * h * (n - 1) / n


def ep_agrs(b: int, s: int, h: int, n: int) -> float:
    """All-gather of tokens + reduce-scatter of outputs (also the TP FFN's volume)."""
    return 2 * b * s * h * (n - 1) / n


def sar_retained(b: int, s: int, h: int, n: int, m: int, k: int, f: float) -> float:
    """Elements SP + EP keeps per layer for backward: (2kf + 4 + 2/m) * bsh / n."""
    return (2 * k * f + 4 + 2 / m) * b * s * h / n


def full_retained(b: int, s: int, h: int, n: int, m: int, k: int, f: float) -> float:
    """What storing every intermediate would cost (the paper's comparison)."""
    return (2 * n + 2 * k + 3 * k * f + 12 + 5 / m) * b * s * h / n
