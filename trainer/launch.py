"""Start N local ranks for ``megamoe train --nproc N``.

The layout and the data are checked in the parent before any process or
process group exists, so a bad layout fails with its numbers at once. Ranks
are spawned processes (gloo on CPU, NCCL on GPUs, one GPU per rank) that
rendezvous over a TCP store on a free loopback port. Rank 0 prints the
progress display and writes the summary; a failing rank's error comes back
as one line naming the rank.

On CPU all ranks share the machine: each rank gets cores / N threads and MFU
is measured against the whole machine's GEMM peak (probed with every core).
"""

from __future__ import annotations

import io
import os
import socket
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.config import Config
from trainer.errors import MegamoeError
from trainer.observe.mfu import peak_flops
from trainer.parallel.comm import Comm, CommStats
from trainer.parallel.dims import ParallelDims, check_layout

INIT_TIMEOUT = timedelta(seconds=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, cfg: Config, world: int, port: int, summary_path, peak: float) -> None:
    from trainer.train import Worker, pick_device, run

    device = pick_device(cfg.train.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=INIT_TIMEOUT,
    )
    try:
        dims = ParallelDims.build(cfg, rank, world)
        comms = build_comms(dims, device)
        out = sys.stdout if rank == 0 else io.StringIO()
        worker = Worker(rank, world, device, peak, dims, comms)
        run(cfg, worker, summary_path if rank == 0 else None, out)
    finally:
        dist.destroy_process_group()


def build_comms(dims: ParallelDims, device: torch.device | None = None):
    """Comms over the rank's n, dp and world groups, recording into one CommStats."""
    from trainer.parallel.step import Comms

    stats = CommStats()
    return Comms(
        n=Comm(dims.n_group, dims.n_index, dims.n, stats, device),
        dp=Comm(dims.dp_group, dims.dp_index, dims.dp, stats, device),
        pp=Comm(dims.pp_group, dims.pp_index, dims.pp, stats, device),
        world=Comm(dist.group.WORLD, dims.rank, dims.world, stats, device),
    )


def machine_peak(cfg: Config, world: int) -> float:
    """Total peak FLOP/s of the run: per GPU x world, or the whole CPU once."""
    from trainer.train import pick_device

    device = pick_device(cfg.train.device)
    if device.type == "cuda":
        return world * peak_flops(torch.device("cuda", 0), cfg.train.dtype, cfg.observe.peak_tflops)
    if cfg.observe.peak_tflops:
        return cfg.observe.peak_tflops * 1e12
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        return peak_flops(device, cfg.train.dtype)
    finally:
        torch.set_num_threads(threads)


def launch(cfg: Config, nproc: int, summary_path: str | None) -> None:
    from trainer.train import open_data

    check_layout(cfg, nproc)
    open_data(cfg)  # a missing or mismatched corpus fails here, once, not on every rank
    peak = machine_peak(cfg, nproc)
    try:
        mp.start_processes(
            _worker,
            args=(cfg, nproc, _free_port(), summary_path, peak),
            nprocs=nproc,
            start_method="spawn",
        )
    except mp.ProcessRaisedException as exc:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        raise MegamoeError(f"rank {exc.error_index} failed: {lines[-1].strip()}") from None
    except mp.ProcessExitedException as exc:
        raise MegamoeError(
            f"rank {exc.error_index} exited with code {exc.exit_code}"
            + (f" (signal {exc.signal_name})" if exc.signal_name else "")
        ) from None


def _run_local_entry(rank, world, port, out_dir, threads, fn, args):
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=INIT_TIMEOUT,
    )  # fmt: skip
    try:
        torch.save(fn(rank, world, *args), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_local(world: int, fn, *args, threads: int = 1) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` fresh gloo ranks; results by rank.

    For tests and benchmarks: ``fn`` must be importable (a module-level function)
    and return something ``torch.save`` can store.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _run_local_entry,
            args=(world, _free_port(), out_dir, threads, fn, args),
            nprocs=world,
            start_method="spawn",
        )
        return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world)]
