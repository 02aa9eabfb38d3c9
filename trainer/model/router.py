"""Top-k softmax routing with device-level balance loss and per-device capacity.

The recipe follows MegaScale-MoE (arXiv 2505.11432), EP section (DeepSeek-V2's
device-level balancing):
the experts are split into ``groups`` consecutive groups, one per EP rank
(E / n experts each). A run with ``parallel.n = n`` routes with n groups even
when it runs in one process, so the single-device reference makes exactly the
decisions of the n-rank run.

Shape legend: T tokens of one routing batch (a micro-batch, all sequence
shards together), E experts, k top-k, G device groups.

* Scores: softmax over E in fp32; the top-k scores are the gate weights
  (optionally renormalised to sum to 1).
* Balance loss: ``alpha * sum_g f'_g * P'_g`` with
  ``f_e = E / (k T) * (tokens choosing e)``, ``f'_g`` the mean of ``f_e`` over
  the group's experts and ``P'_g`` the sum over the group of the mean score.
  It equals alpha when routing is uniform. Selection counts are taken before
  dropping, as DeepSeek-V2 does.
* Capacity: each group accepts at most ``C = ceil(capacity_factor * T * k / G)``
  assignments; past that the lowest-affinity (lowest score) assignments are
  dropped. Ties keep the earlier (token, slot) in batch-major order, so the
  decision is a pure function of the scores and every layout reproduces it.
  ``capacity_factor = 0`` is dropless.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trainer.parallel.hostsync import counts_of


@dataclass
class Routing:
    expert_ids_Tk: torch.Tensor  # long, routed expert per (token, slot)
    gates_Tk: torch.Tensor  # gate weight per (token, slot); 0 where dropped
    keep_Tk: torch.Tensor  # bool, False where the capacity rule dropped the slot
    probs_TE: torch.Tensor  # fp32 softmax scores (for the balance loss)
    dropped: int  # dropped (token, slot) assignments

    @property
    def counts_E(self) -> torch.Tensor:
        """Assignments each expert actually processes (after dropping)."""
        num_experts = self.probs_TE.shape[-1]
        kept = self.expert_ids_Tk[self.keep_Tk]
        return torch.bincount(kept, minlength=num_experts)


def group_capacity(tokens: int, topk: int, groups: int, capacity_factor: float) -> int:
    """Assignments one device group accepts; 0 means unlimited (dropless)."""
    if capacity_factor <= 0:
        return 0
    return math.ceil(capacity_factor * tokens * topk / groups)


def capacity_keep(
    scores_Tk: torch.Tensor, expert_ids_Tk: torch.Tensor, experts: int, groups: int, capacity: int
) -> torch.Tensor:
    """Keep mask: the ``capacity`` highest-score assignments of each device group."""
    if capacity <= 0:
        return torch.ones_like(expert_ids_Tk, dtype=torch.bool)
    flat_scores = scores_Tk.reshape(-1)
    flat_group = expert_ids_Tk.reshape(-1) // (experts // groups)
    # Two stable sorts: by score (descending), then by group; within a group the
    # order is score-descending with ties in batch-major (token, slot) order.
    by_score = torch.sort(flat_scores, descending=True, stable=True).indices
    by_group = torch.sort(flat_group[by_score], stable=True).indices
    order = by_score[by_group]
    group_sizes = counts_of(flat_group, groups)  # no host read (bincount reads the max)
    group_start = torch.cumsum(group_sizes, 0) - group_sizes
    position = torch.arange(order.numel(), device=order.device)
    rank_in_group = position - group_start[flat_group[order]]
    keep = torch.empty_like(flat_group, dtype=torch.bool)
    keep[order] = rank_in_group < capacity
    return keep.view_as(expert_ids_Tk)


def route(
    logits_TE: torch.Tensor,
    topk: int,
    groups: int,
    capacity_factor: float = 0.0,
    norm_topk: bool = False,
) -> Routing:
    """Top-k routing with device-group capacity; see the module docstring."""
    T, E = logits_TE.shape
    probs = torch.softmax(logits_TE.float(), dim=-1)
    scores, expert_ids = torch.topk(probs, topk, dim=-1)
    gates = scores / scores.sum(-1, keepdim=True) if norm_topk else scores
    capacity = group_capacity(T, topk, groups, capacity_factor)
    with torch.no_grad():
        keep = capacity_keep(scores.detach(), expert_ids, E, groups, capacity)
    dropped = int((~keep).sum())
    gates = gates * keep
    return Routing(expert_ids, gates, keep, probs, dropped)


def balance_loss(probs_TE: torch.Tensor, expert_ids_Tk: torch.Tensor, groups: int) -> torch.Tensor:
    """Device-level balance loss without alpha: sum_g f'_g * P'_g (1.0 when uniform)."""
    T, E = probs_TE.shape
    k = expert_ids_Tk.shape[-1]
    counts = torch.bincount(expert_ids_Tk.reshape(-1), minlength=E).to(probs_TE.dtype)
    f_E = counts * (E / (k * T))
    f_group = f_E.view(groups, E // groups).mean(-1)
    p_group = probs_TE.mean(0).view(groups, E // groups).sum(-1)
    return (f_group * p_group).sum()
