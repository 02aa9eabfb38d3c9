"""Start the ranks of ``megamoe train``: N local ones (``--nproc N``), or this process as
one rank of a world that torchrun (or Slurm, or a person) started.

The layout and the data are checked in the parent before any process or
process group exists, so a bad layout fails with its numbers at once. Ranks
are spawned processes (gloo on CPU, NCCL on GPUs, one GPU per rank) that
rendezvous over a TCP store this process hosts (``spawn.launcher_store``). Rank 0 prints the
progress display and writes the summary; a failing rank's error comes back
as one line naming the rank.

On CPU all ranks share the machine: each rank gets cores / N threads and MFU
is measured against the whole machine's GEMM peak (probed with every core).

Under torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` in the
environment) ``megamoe train`` runs as that rank: the process group comes from
the environment, rank 0 picks the checkpoint to resume from (``--resume``) and
tells the others, and only rank 0 prints progress and writes the summary.
Started by the control plane (``MEGAMOE_JOB_ID`` and ``MEGAMOE_ETCD`` set), each
rank also reports its progress to etcd (``trainer.elastic.report``).
"""

from __future__ import annotations

import io
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.config import Config
from trainer.elastic.report import ENV_RANKS_PER_HOST, Reporter
from trainer.errors import MegamoeError
from trainer.observe.mfu import peak_flops
from trainer.parallel.comm import Comms
from trainer.parallel.dims import ParallelDims, check_layout
from trainer.parallel.spawn import INIT_TIMEOUT, join, launcher_store
from trainer.quickexit import freeze_at_exit
from trainer.runtime import Worker, pick_device
from trainer.train import open_data, run


def backend_for(device: torch.device) -> str:
    """gloo on the CPU; NCCL on a GPU, with its per-collective timing on (CUDA events
    around each collective's kernel: the wall times trainer.parallel.comm reports)."""
    if device.type != "cuda":
        return "gloo"
    os.environ.setdefault("TORCH_NCCL_ENABLE_TIMING", "1")
    return "nccl"


def _worker(
    rank: int, cfg: Config, world: int, port: int, summary_path, peak: float, resume_from
) -> None:
    freeze_at_exit()
    device = pick_device(cfg.train.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    join(backend_for(device), port, rank, world)
    try:
        dims = ParallelDims.build(cfg, rank, world)
        comms = Comms.from_dims(dims, device)
        out = sys.stdout if rank == 0 else io.StringIO()
        worker = Worker(rank, world, device, peak, dims, comms, resume_from)
        run(cfg, worker, summary_path if rank == 0 else None, out)
    finally:
        dist.destroy_process_group()


def machine_peak(cfg: Config, world: int) -> float:
    """Total peak FLOP/s of the run: per GPU x world, or the whole CPU once."""
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


def launch(
    cfg: Config, nproc: int, summary_path: str | None, resume_from: str | None = None
) -> None:
    """Run ``nproc`` ranks; ``resume_from`` is a checkpoint already checked by the caller."""
    check_layout(cfg, nproc)
    open_data(cfg)  # a missing or mismatched corpus fails here, once, not on every rank
    peak = machine_peak(cfg, nproc)
    store = launcher_store()
    try:
        mp.start_processes(
            _worker,
            args=(cfg, nproc, store.port, summary_path, peak, resume_from),
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


TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """True when this process is one rank of a world started by torchrun (or the like)."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def run_rank(
    cfg: Config,
    summary_path: str | None,
    resume: bool,
    resume_from: str | None,
    skip: list[str] | None = None,
) -> None:
    """Train as rank $RANK of $WORLD_SIZE (the process group from the environment).
    ``skip``: checkpoint commits ``--resume`` passes over (``store.commit_id``)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if world == 1:  # a 1 x 1 job: the single-process path, no process group
        _run_alone(cfg, summary_path, resume, resume_from, skip or [])
        return
    check_layout(cfg, world, "torchrun's WORLD_SIZE")
    device = pick_device(cfg.train.device)
    if device.type == "cuda":
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    # Ranks on this machine: the local executor runs all nodes on one host and says so.
    sharing = int(os.environ.get(ENV_RANKS_PER_HOST, local_world))
    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // sharing))
    dist.init_process_group(backend_for(device), init_method="env://", timeout=INIT_TIMEOUT)
    reporter = Reporter.from_env(rank)  # set when the control plane started this world
    try:
        path = _agree_on_checkpoint(cfg, rank, resume, resume_from, skip or [], reporter)
        dims = ParallelDims.build(cfg, rank, world)
        comms = Comms.from_dims(dims, device)
        out = sys.stdout if rank == 0 else io.StringIO()
        worker = Worker(rank, world, device, machine_peak(cfg, world), dims, comms, path, reporter)
        run(cfg, worker, summary_path if rank == 0 else None, out)
    finally:
        if reporter is not None:
            reporter.close()
        dist.destroy_process_group()


def _run_alone(cfg: Config, summary_path, resume: bool, resume_from, skip: list[str]) -> None:
    from trainer.train import train

    reporter = Reporter.from_env(0)
    try:
        found = None
        if resume or resume_from:
            open_data(cfg)
            found = _resolve_and_announce(cfg, resume, resume_from, skip, reporter)
        train(cfg, summary_path, resume_from=str(found) if found else None, reporter=reporter)
    finally:
        if reporter is not None:
            reporter.close()


def _resolve_and_announce(cfg: Config, resume, resume_from, skip: list[str], reporter):
    """The checkpoint to start from; told to the control plane before it is loaded, so a
    restore that kills the process can be ruled out next time."""
    from trainer.checkpoint import store
    from trainer.checkpoint.manager import resolve

    found = resolve(cfg, resume, resume_from, lambda m: print(m, flush=True), skip)
    if found is not None and reporter is not None:
        reporter.restoring(str(found), store.commit_id(found, store.read_manifest(found)))
    return found


def _agree_on_checkpoint(
    cfg: Config, rank: int, resume: bool, resume_from: str | None, skip: list[str], reporter
):
    """Rank 0 resolves the checkpoint (warnings included) and broadcasts it, or its error
    (a missing corpus, a damaged checkpoint): every rank then fails with the same line."""
    choice: list = [None]
    if rank == 0 and (resume or resume_from):
        try:
            open_data(cfg)
            found = _resolve_and_announce(cfg, resume, resume_from, skip, reporter)
            choice[0] = ("ok", str(found) if found else None)
        except MegamoeError as exc:
            choice[0] = ("error", str(exc))
    dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return None
    status, value = choice[0]
    if status == "error":
        raise MegamoeError(value)
    return value
