"""Run a function on N gloo ranks in fresh processes and collect what each returns."""

from __future__ import annotations

import torch
import torch.distributed as dist

from trainer.parallel.spawn import run_local


def run_ranks(world: int, fn, *args) -> list:
    """fn(rank, world, *args) on each of ``world`` gloo ranks; returns the results by rank."""
    return run_local(world, fn, *args, threads=1)


SMALL = [
    *("model.vocab_size=64", "model.hidden=32", "model.heads=8", "model.kv_heads=4"),
    *("model.seq_len=16", "model.ffn_hidden=32", "model.experts=8", "model.layers=2"),
]


def sync_replicated_grads(model, comm) -> None:
    """Sum the gradients of replicated parameters over the n ranks: what ZeRO-1's
    synchronisation does in training, done directly for tests of the model alone."""
    params = [p for p in model.parameters() if p.megamoe_replicated and p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    comm.all_reduce(flat, "grad_sync")
    offset = 0
    for p in params:
        numel = p.grad.numel()
        p.grad.copy_(flat[offset : offset + numel].view_as(p.grad))
        offset += numel


def small_config(world: int, *overrides: str):
    from trainer.config import Config, apply_overrides

    return apply_overrides(Config(), [*SMALL, f"parallel.n={world}", *overrides])


def reference_and_parallel(cfg, rank: int, world: int, batch: int = 2, forced: bool = False):
    """The reference model (full batch, loss + backward done) and this rank's parallel copy."""
    from trainer.model import MoETransformer, lm_loss
    from trainer.parallel.comm import Comm
    from trainer.parallel.model import ParallelMoE

    torch.manual_seed(cfg.train.seed)
    ref = MoETransformer(cfg.model, groups=world)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, cfg.model.seq_len + 1), generator=g)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits, stats = ref(inputs)
    ref_loss = lm_loss(logits, targets)
    (ref_loss + stats.balance_loss).backward()
    comm = Comm(dist.group.WORLD, rank, world)
    model = ParallelMoE(cfg, comm, rank, ref, balanced_routing=forced)
    L = cfg.model.seq_len // world
    shard = slice(rank * L, (rank + 1) * L)
    return ref, ref_loss, stats, model, comm, inputs[:, shard], targets[:, shard]
