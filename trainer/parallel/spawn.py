"""Fresh gloo ranks on this machine: a free loopback port and ``run_local``.

``run_local`` is how tests and benchmarks run a function on N ranks and collect
what each returns; ``megamoe train --nproc N`` (``trainer.launch``) uses the same
port helper and timeout.
"""

from __future__ import annotations

import socket
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer import hostmem

INIT_TIMEOUT = timedelta(seconds=120)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_local_entry(rank, world, port, out_dir, threads, fn, args):
    torch.set_num_threads(threads)
    hostmem.apply("keep")  # as training processes run (train.host_memory's default)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=INIT_TIMEOUT,
    )
    try:
        torch.save(fn(rank, world, *args), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_local(world: int, fn, *args, threads: int = 1) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` fresh gloo ranks; results by rank.

    ``fn`` must be importable (a module-level function) and return something
    ``torch.save`` can store.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _run_local_entry,
            args=(world, free_port(), out_dir, threads, fn, args),
            nprocs=world,
            start_method="spawn",
        )
        return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world)]
