"""One optimizer step of the parallel model (n-rank groups x pp stages x dp replicas).

Each rank runs its sequence shard of its replica's micro-batches through its
stage's macro layers on the (interleaved) 1F1B schedule (loss scaled by
1 / (micro-batches x dp), so the gradient sum over replicas is the global-batch
gradient), then ZeRO-1 sums the gradients over their sync class and leaves each
rank a disjoint shard. The global gradient norm is one all-reduce of the shards'
squares over the whole world;
clipping uses ``torch.nn.utils.clip_grad_norm_``'s formula, and a non-finite
norm skips the step on every rank alike (they all see the same norm). Loss,
balance loss and drop counts are summed over the world so rank 0 reports the
batch-wide values.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from trainer.config import Config
from trainer.parallel.comm import Comms
from trainer.parallel.pipeline import StageRunner
from trainer.parallel.zero import ZeroOptimizer
from trainer.runtime import StepResult


def step_totals(res, bubble: float, cfg: Config, device: torch.device) -> torch.Tensor:
    """What the world sums after a step, on ``device``: loss, balance loss, drops, bubble,
    expert counts. The balance loss and the expert counts are identical on a group's n
    ranks: they count once per group (the world sum covers every stage's layers and every
    replica)."""
    E = cfg.model.experts
    counts = res.expert_counts if res.expert_counts is not None else torch.zeros(E)
    scalars = [res.loss, res.balance / cfg.parallel.n, float(res.dropped), bubble]
    return torch.cat(
        [
            torch.stack([torch.as_tensor(x, dtype=torch.float64, device=device) for x in scalars]),
            counts.to(device=device, dtype=torch.float64) / cfg.parallel.n,
        ]
    )


def parallel_train_step(
    runner: StageRunner,
    optimizer: ZeroOptimizer,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    cfg: Config,
    comms: Comms,
) -> StepResult:
    scale = 1.0 / (len(micro_batches) * cfg.parallel.dp)
    comm_before, exposed_before = comms.world.stats.totals()
    res = runner.run(micro_batches, scale)
    optimizer.reduce_gradients()
    sq = comms.world.all_reduce(optimizer.shard_sq_norm(), "grad_norm")
    grad_norm = math.sqrt(float(sq)) if math.isfinite(float(sq)) else math.inf
    skipped = not math.isfinite(grad_norm)
    if not skipped:
        clip = cfg.train.grad_clip
        optimizer.step(min(clip / (grad_norm + 1e-6), 1.0) if clip > 0 else 1.0)
    optimizer.zero_grad()
    # Bubble against the pipeline's makespan (the slowest rank's schedule time), as
    # the (P - 1) / (v M + P - 1) theory counts it: every stage waits for the flush.
    device = comms.world.device  # what the backend serves (CUDA for NCCL)
    makespan = torch.tensor([res.times.total_s], dtype=torch.float64, device=device)
    comms.world.all_reduce(makespan, "pp_timing", op=dist.ReduceOp.MAX)
    bubble = 1.0 - res.times.compute_s / float(makespan[0])
    totals = step_totals(res, bubble, cfg, device)
    totals = comms.world.all_reduce(totals, "loss")
    comm_after, exposed_after = comms.world.stats.totals()
    tokens = cfg.train.global_batch * cfg.model.seq_len
    assignments = tokens * cfg.model.topk * cfg.model.layers
    return StepResult(
        float(totals[0]),
        float(totals[1]),
        grad_norm,
        int(totals[2]),
        assignments,
        skipped,
        bubble=float(totals[3]) / comms.world.size,
        comm_s=comm_after - comm_before,
        exposed_s=exposed_after - exposed_before,
        expert_tokens=[round(float(c)) for c in totals[4:].tolist()],
    )
