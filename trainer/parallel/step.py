"""One optimizer step of the parallel model (n-rank groups x dp replicas).

Each rank runs its sequence shard of its replica's micro-batches through the
macro layers (loss scaled by 1 / (micro-batches x dp), so the gradient sum
over replicas is the global-batch gradient), then ZeRO-1 sums the gradients
over their sync class and leaves each rank a disjoint shard. The global
gradient norm is one all-reduce of the shards' squares over the whole world;
clipping uses ``torch.nn.utils.clip_grad_norm_``'s formula, and a non-finite
norm skips the step on every rank alike (they all see the same norm). Loss,
balance loss and drop counts are summed over the world so rank 0 reports the
batch-wide values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trainer.config import Config
from trainer.parallel.comm import Comm
from trainer.parallel.model import ParallelMoE
from trainer.parallel.zero import ZeroOptimizer


@dataclass
class Comms:
    """A rank's Comms over its groups; they share one CommStats."""

    n: Comm
    dp: Comm
    world: Comm


def parallel_train_step(
    model: ParallelMoE,
    optimizer: ZeroOptimizer,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    cfg: Config,
    comms: Comms,
):
    from trainer.train import StepResult

    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cfg.train.dtype == "bf16")
    scale = 1.0 / (len(micro_batches) * cfg.parallel.dp)
    loss_sum, bal_sum, dropped = 0.0, 0.0, 0
    for inputs, targets in micro_batches:
        with autocast:
            logits, bal, stats = model(inputs)
            loss = model.local_loss(logits, targets)
        ((loss + bal) * scale).backward()
        loss_sum += loss.item() * scale
        bal_sum += bal.item() * scale / cfg.parallel.n  # identical on the n ranks
        dropped += stats["dropped"]
    optimizer.reduce_gradients()
    sq = comms.world.all_reduce(optimizer.shard_sq_norm(), "grad_norm")
    grad_norm = math.sqrt(float(sq)) if math.isfinite(float(sq)) else math.inf
    skipped = not math.isfinite(grad_norm)
    if not skipped:
        clip = cfg.train.grad_clip
        optimizer.step(min(clip / (grad_norm + 1e-6), 1.0) if clip > 0 else 1.0)
    optimizer.zero_grad()
    totals = torch.tensor([loss_sum, bal_sum, float(dropped)], dtype=torch.float64)
    totals = comms.world.all_reduce(totals, "loss")
    tokens = cfg.train.global_batch * cfg.model.seq_len
    assignments = tokens * cfg.model.topk * cfg.model.layers
    return StepResult(
        float(totals[0]), float(totals[1]), grad_norm, int(totals[2]), assignments, skipped
    )
