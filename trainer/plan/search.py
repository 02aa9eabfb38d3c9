"""Layout search: enumerate the method's layouts for a cluster, keep the ones that run, rank.

Candidates vary what the trainer lets a user choose - n (a divisor of the
GPUs per node), pp (a divisor of the layers), dp (the rest), the micro-batch,
attention (sp | tp), FFN (ep_a2a | ep_agrs | tp) and the intra-operator
chunks - with the method's fixed parts (inter-operator overlap, SAR, BF16
gradient sync, DP/PP overlap). A candidate is dropped when the trainer's own
checks refuse it (``trainer.config.apply_overrides`` and
``trainer.parallel.dims.check_layout`` on the config it would train with) or
when its predicted memory exceeds the GPU. The survivors are ranked by
predicted tokens/s; the explanation compares the winner's iteration terms
with the runner-up's and names the term that decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from itertools import product

from trainer.config import Config, apply_overrides
from trainer.errors import ConfigError
from trainer.parallel.dims import check_layout
from trainer.plan.hardware import Hardware
from trainer.plan.layout import Layout
from trainer.plan.model import Prediction, predict

MICRO_BATCHES = (1, 2, 4, 8)
CHUNKS = (1, 2, 4, 8)
ATTENTION = ("sp", "tp")
FFN = ("ep_a2a", "ep_agrs", "tp")


@dataclass
class SearchResult:
    ranked: list[Prediction]
    rejected_layout: int = 0
    rejected_memory: int = 0
    examples: dict[str, str] = field(default_factory=dict)  # one reason per kind

    @property
    def best(self) -> Prediction:
        return self.ranked[0]


def _divisors(x: int) -> list[int]:
    return [d for d in range(1, x + 1) if x % d == 0]


def candidates(cfg: Config, hw: Hardware, gpus: int, global_batch: int) -> list[Layout]:
    """Every layout shape for ``gpus`` before any check (the checks decide later)."""
    per_node = min(hw.gpus_per_node, gpus)
    layouts = []
    for n, pp in product(_divisors(per_node), _divisors(cfg.model.layers)):
        if gpus % (n * pp):
            continue
        dp = gpus // (n * pp)
        if global_batch % dp:
            continue
        per_replica = global_batch // dp
        for b, attn, ffn, chunks in product(MICRO_BATCHES, ATTENTION, FFN, CHUNKS):
            if per_replica % b or (n == 1 and (attn, ffn, chunks) != ("sp", "ep_a2a", 1)):
                continue  # n = 1 has nothing to shard or overlap: one candidate stands for all
            layouts.append(Layout(n, pp, dp, b, attn, ffn, True, chunks, "bf16_a2a", cfg.comm.fp8))
    return layouts


def trainer_refusal(cfg: Config, layout: Layout, global_batch: int, gpus: int) -> str | None:
    """Why the trainer would refuse this layout, or None when it accepts it."""
    try:
        check_layout(apply_overrides(cfg, layout.overrides(global_batch)), nproc=gpus)
    except ConfigError as exc:
        return str(exc)
    return None


def search(cfg: Config, hw: Hardware, gpus: int, global_batch: int, keep: int = 10) -> SearchResult:
    """Rank the layouts that pass the trainer's checks and fit in memory."""
    result = SearchResult(ranked=[])
    predictions = []
    for layout in candidates(cfg, hw, gpus, global_batch):
        refusal = trainer_refusal(cfg, layout, global_batch, gpus)
        if refusal:
            result.rejected_layout += 1
            result.examples.setdefault("layout", f"{layout.describe()}: {refusal}")
            continue
        pred = predict(cfg, hw, layout, global_batch, "megamoe")
        if not pred.fits:
            result.rejected_memory += 1
            result.examples.setdefault(
                "memory",
                f"{layout.describe()}: needs {pred.memory.total / 2**30:.1f} GiB "
                f"of {hw.memory_bytes / 2**30:.0f} GiB",
            )
            continue
        predictions.append(pred)
    if not predictions:
        reasons = "; ".join(result.examples.values()) or "no candidate layouts"
        raise ConfigError(f"no layout of {gpus} x {hw.name} runs this config ({reasons})")
    predictions.sort(key=_rank_key)
    result.ranked = predictions[:keep]
    return result


TIE = 1.002  # throughputs within 0.2 % are a tie, won by the simpler layout


def _rank_key(p: Prediction) -> tuple:
    lay = p.layout
    bucket = round(math.log(p.tokens_per_s) / math.log(TIE))
    return (-bucket, lay.chunks, lay.micro_batch, lay.pp, lay.attention != "sp", lay.ffn)


def explain(result: SearchResult) -> str:
    """Why the best layout wins: its largest term, and the term that beats the runner-up."""
    best = result.best
    terms = best.terms()
    top = max(terms, key=terms.get)
    text = (
        f"{top} is {terms[top] / best.seconds_per_iteration:.0%} of the winner's "
        f"{best.seconds_per_iteration:.3g} s iteration"
    )
    rival = _runner_up(result)
    if rival is None:
        return text + "; no other layout fits."
    gaps = {k: rival.terms()[k] - terms[k] for k in terms}
    decisive = max(gaps, key=gaps.get)
    margin = best.tokens_per_s / rival.tokens_per_s - 1
    return (
        f"{text}. It beats the next different layout ({rival.layout.describe()}) by "
        f"{margin:.1%}, mostly on {decisive}: {terms[decisive]:.4g} s vs "
        f"{rival.terms()[decisive]:.4g} s per iteration."
    )


def _runner_up(result: SearchResult) -> Prediction | None:
    """The best layout that differs from the winner in more than its chunk count."""
    first = replace(result.best.layout, chunks=1)
    for p in result.ranked[1:]:
        if replace(p.layout, chunks=1) != first:
            return p
    return result.ranked[1] if len(result.ranked) > 1 else None
