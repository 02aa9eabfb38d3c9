"""One optimizer step of the n-rank model.

Each rank runs its sequence shard of every micro-batch through the macro
layers, sums the replicated gradients over the n ranks, clips by the global
norm (sharded parts summed over ranks, replicated parts counted once) with
the same formula as ``torch.nn.utils.clip_grad_norm_``, and skips the step on
every rank when that norm is not finite. Loss and drop counts are summed over
the ranks so rank 0 reports the batch-wide values.
"""

from __future__ import annotations

import math

import torch

from trainer.config import Config
from trainer.parallel.comm import Comm
from trainer.parallel.model import ParallelMoE, global_grad_norm, sync_replicated_grads


def parallel_train_step(
    model: ParallelMoE,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    cfg: Config,
    comm: Comm,
):
    from trainer.train import StepResult

    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cfg.train.dtype == "bf16")
    n_micro = len(micro_batches)
    loss_sum = torch.zeros((), dtype=torch.float64)
    bal_sum, dropped, tokens = 0.0, 0, 0
    for inputs, targets in micro_batches:
        with autocast:
            logits, bal, stats = model(inputs)
            loss = model.local_loss(logits, targets)
        ((loss + bal) / n_micro).backward()
        loss_sum += loss.detach().double().cpu()
        bal_sum += bal.item()
        dropped += stats["dropped"]
        tokens += targets.numel() * cfg.parallel.n
    sync_replicated_grads(model, comm)
    grad_norm = float(global_grad_norm(model, comm))
    skipped = not math.isfinite(grad_norm)
    if not skipped:
        if cfg.train.grad_clip > 0:
            coef = min(cfg.train.grad_clip / (grad_norm + 1e-6), 1.0)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    totals = comm.all_reduce(
        torch.tensor([float(loss_sum), float(dropped)], dtype=torch.float64), "loss"
    )
    assignments = tokens * cfg.model.topk * cfg.model.layers
    return StepResult(
        float(totals[0]) / n_micro,
        bal_sum / n_micro,
        grad_norm,
        int(totals[1]),
        assignments,
        skipped,
    )
