"""Probes of this machine: what the planner's CPU profiles (``trainer.plan.hardware``) use.

    python bench/probes.py [--no-write]

Measures this machine's one-thread rates (the GEMM rate at fp32 and bf16 through
``trainer.observe.mfu``'s cached probe, a large tensor copy, the FP8 codec) and a
2-rank loopback gloo all-to-all run in two threads of this process (bandwidth and
one call's latency), prints them and the ``--gpu cpu`` profile they give, and
records them where ``megamoe plan --gpu cpu`` reads them
(``trainer.plan.hardware.cpu_probes_path()``). Under a minute (seconds once
the GEMM probe is in its cache).

bench/calibrate.py also uses :func:`probe_cpu_rates` and :func:`probe_gloo`: loopback
gloo among N fresh one-thread processes (``trainer.parallel.spawn.run_local``), as
bench/ablation.py runs its ranks.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from trainer.atomic import write_json_atomic
from trainer.plan.hardware import (
    CpuRates,
    GlooRates,
    cpu_probes_path,
    cpu_probes_record,
    cpu_profile,
)

# The tensor forms of all-gather and reduce-scatter (the names differ across torch versions).
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def total_ram() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 16 * 2**30


def probe_loopback(megabytes: int = 16, repeats: int = 3) -> tuple[float, float]:
    """Per-direction bytes/s of a 2-rank gloo all-to-all over loopback, and one call's latency.

    Two threads in this process, each with its own gloo process group on an
    in-memory store: no subprocess, no port, well under a second.
    """
    store = dist.HashStore()
    timings: dict[int, tuple[float, float]] = {}

    def rank_main(rank: int) -> None:
        group = dist.ProcessGroupGloo(store, rank, 2, datetime.timedelta(seconds=30))
        x = torch.ones(megabytes * 2**20 // 4)
        out = torch.empty_like(x)
        group.alltoall_base(out, x, [], []).wait()
        start = time.perf_counter()
        for _ in range(repeats):
            group.alltoall_base(out, x, [], []).wait()
        bulk = (time.perf_counter() - start) / repeats
        tiny = torch.ones(1)
        start = time.perf_counter()
        for _ in range(10):
            group.allreduce([tiny]).wait()
        timings[rank] = (bulk, (time.perf_counter() - start) / 10)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if len(timings) != 2:
        raise RuntimeError("the loopback gloo probe did not finish within 60 s")
    bulk = max(t[0] for t in timings.values())
    latency = max(t[1] for t in timings.values())
    sent = megabytes * 2**20 / 2  # half of each rank's buffer leaves it
    return sent / max(bulk - latency, 1e-9), latency


def probe_memory_bandwidth(megabytes: int = 256) -> float:
    """Bytes/s of a large tensor copy (read + write) on one thread."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def probe_fp8_codec(rows: int = 2048, cols: int = 256, repeats: int = 5) -> float:
    """Elements/s of ``trainer.compress.fp8``'s per-row encode + decode on one thread."""
    from trainer.compress.fp8 import decode, encode_rows

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(rows, cols)
        decode(encode_rows(x))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            decode(encode_rows(x))
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return x.numel() / best


def probe_cpu_rates() -> CpuRates:
    """The one-thread probes of this machine (GEMM peaks cached by ``trainer.observe.mfu``)."""
    from trainer.observe.mfu import cpu_peak_flops

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fp32, bf16 = cpu_peak_flops("fp32"), cpu_peak_flops("bf16")
        memory = probe_memory_bandwidth()
    finally:
        torch.set_num_threads(threads)
    return CpuRates(
        cores=os.cpu_count() or 1,
        gemm_fp32=fp32,
        gemm_bf16=bf16,
        memory_bw=memory,
        fp8_codec_rate=probe_fp8_codec(),
        memory_bytes=total_ram(),
    )


def _gloo_worker(
    rank: int, world: int, megabytes: float, repeats: int, rounds: int
) -> dict[str, float]:
    """One rank of :func:`probe_gloo` (module level: spawned ranks import it).

    Per kind the median over ``rounds`` of the mean time of ``repeats`` calls, on the
    default process group ``run_local`` set up.
    """
    numel = int(megabytes * 2**20 / 4) // world * world
    x = torch.ones(numel)
    out = torch.empty_like(x)
    part = torch.empty(numel // world)
    tiny = torch.ones(1)
    ops = {
        "latency": lambda: dist.all_reduce(tiny),
        "all_to_all": lambda: dist.all_to_all_single(out, x),
        "all_gather": lambda: ALL_GATHER(out, x[: numel // world]),
        "reduce_scatter": lambda: REDUCE_SCATTER(part, x),
    }
    timings = {"booked_bytes": numel * 4 * (world - 1) / world}
    for name, op in ops.items():
        op()  # connections and buffers warm
        means = []
        for _ in range(rounds):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(repeats):
                op()
            means.append((time.perf_counter() - start) / repeats)
        timings[name] = statistics.median(means)
    return timings


def gloo_rates(per_rank: list[dict[str, float]]) -> GlooRates:
    """:func:`_gloo_worker`'s timings of every rank as rates: per kind the slowest rank's
    time less one latency (the slowest rank's one-float all-reduce) moves the booked bytes."""
    latency = max(r["latency"] for r in per_rank)
    booked = per_rank[0]["booked_bytes"]

    def rate(kind: str) -> float:
        return booked / max(max(r[kind] for r in per_rank) - latency, 1e-9)

    return GlooRates(
        len(per_rank), rate("all_to_all"), rate("all_gather"), rate("reduce_scatter"), latency
    )


def probe_gloo(ranks: int, megabytes: float = 1.5, repeats: int = 10, rounds: int = 3) -> GlooRates:
    """Loopback gloo among ``ranks`` fresh one-thread processes (as bench/ablation.py runs).

    Each kind moves a ``megabytes`` tensor (booked 1.1 MB at 4 ranks; the ablation's
    collectives book 0.4-1.6 MB); per kind the slowest rank's time counts. Latency: a
    one-float all-reduce. A few seconds, mostly process start-up. On a machine with
    fewer cores than ranks the rates move by +-30 % from one probe to the next.
    """
    from trainer.parallel.spawn import run_local

    return gloo_rates(run_local(ranks, _gloo_worker, megabytes, repeats, rounds, threads=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-write", action="store_true", help="print only, record nothing")
    a = p.parse_args()
    rates = probe_cpu_rates()
    link, latency = probe_loopback()
    hw = cpu_profile(rates, link, latency)
    print(
        f"{rates.cores} cores; one thread: GEMM fp32 {rates.gemm_fp32 / 1e9:.1f} GFLOP/s, "
        f"bf16 {rates.gemm_bf16 / 1e9:.1f}; copy {rates.memory_bw / 1e9:.1f} GB/s; FP8 codec "
        f"{rates.fp8_codec_rate / 1e6:.0f} M elements/s; loopback gloo 2 ranks "
        f"{link / 1e6:.0f} MB/s, latency {latency * 1e3:.2f} ms"
    )
    print(f"--gpu cpu: {hw.gpus_per_node} ranks of {hw.peak_flops_fp32 / 1e9:.1f} GFLOP/s fp32")
    if not a.no_write:
        path = cpu_probes_path()
        write_json_atomic(path, cpu_probes_record(rates, link, latency))
        print(f"recorded in {path}")


if __name__ == "__main__":
    main()
