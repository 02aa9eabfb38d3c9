"""Closed-form communication volumes and retained activations per layer (PAPER.md 2-4).

Elements one rank puts on its links in the forward pass of one layer, with
b sequences of length s, hidden h, n ranks, GQA ratio m, top-k k and
f = h_ffn / h; the convention is that of ``trainer.parallel.comm`` (an
all-to-all counts what leaves the rank, an all-gather / reduce-scatter
(n - 1) / n of the full tensor).

One correction to PAPER.md: it writes V_SP = 2bsh(n-1)/n * (2 + 2/m)/n and a
ratio (2 + 2/m)/n to TP. Counting what Ulysses actually sends - q, k, v
([b, s/n, h(1 + 2/m)]) and the output ([b, s/n, h]), each (n - 1)/n of it
leaving the rank - gives half of that: bsh(n-1)/n * (2 + 2/m)/n, a ratio of
(1 + 1/m)/n (0.156 at n = 8, m = 4). The measured bytes agree with this form;
``paper_sp_attention`` keeps the paper's expression for reference.
"""

from __future__ import annotations


def tp_attention(b: int, s: int, h: int, n: int) -> float:
    """All-gather before QKV + reduce-scatter after W_o."""
    return 2 * b * s * h * (n - 1) / n


def sp_attention(b: int, s: int, h: int, n: int, m: int) -> float:
    """All-to-all of q, k, v plus all-to-all of the attention output."""
    return b * s * h * (n - 1) / n * (2 + 2 / m) / n


def paper_sp_attention(b: int, s: int, h: int, n: int, m: int) -> float:
    return 2 * b * s * h * (n - 1) / n * (2 + 2 / m) / n


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
