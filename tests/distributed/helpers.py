"""Run a function on N gloo ranks in fresh processes and collect what each returns."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn, *args) -> list:
    """fn(rank, world, *args) on each rank; returns the list of results by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _entry, args=(world, free_port(), out_dir, fn, args), nprocs=world, start_method="spawn"
        )
        return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world)]


SMALL = [
    "model.vocab_size=64", "model.hidden=32", "model.heads=8", "model.kv_heads=4",
    "model.seq_len=16", "model.ffn_hidden=32", "model.experts=8", "model.layers=2",
]  # fmt: skip


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
    model = ParallelMoE(cfg, comm, rank, ref)
    model.ctx.forced_routing = forced
    L = cfg.model.seq_len // world
    shard = slice(rank * L, (rank + 1) * L)
    return ref, ref_loss, stats, model, comm, inputs[:, shard], targets[:, shard]
