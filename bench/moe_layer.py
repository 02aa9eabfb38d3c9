"""Forward + backward of one expert-parallel MoE layer alone, against this machine's GEMM roofline.

    python bench/moe_layer.py --hidden 512 --ffn 1024 --experts 8 --topk 2 --tokens 4096 \\
        --ep 2 --dtype fp32 [--mode ep_a2a|ep_agrs] [--capacity-factor 0] [--warmup 3] \\
        [--steps 10] [--threads 1] [--expert-gemm auto|grouped|loop] [--overlap] \\
        [--chunks 1] [--fused] [--json FILE]

``--tokens`` is tokens per rank. Each of the ``--ep`` local gloo ranks routes
its tokens (top-k softmax router), dispatches them to the rank holding each
expert, runs the grouped SwiGLU GEMMs, combines, then runs the hand-written
backward of all of it (the macro module's MoE half, SAR recomputation
included). Reported: the median over steps of the slowest rank's step time,
and the roofline - the time this machine's GEMMs need for the same FLOPs at
the same shapes, measured by a probe on every rank at once in the same run
(after every step and at the end; its best sample) - as a ratio (roofline /
measured = the share of GEMM speed the layer reaches). Also reported: the paired
ratio, the median over steps of each step's share of the roofline the probe
measured right after it (``paired_ratio``; on a shared host the machine's speed
drifts within a run, and this ratio compares each step with the speed of its
moment).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from trainer.atomic import write_json_atomic
from trainer.parallel import moe, ops
from trainer.parallel.block import LayerCtx
from trainer.parallel.comm import Comm
from trainer.parallel.spawn import run_local


def _ctx(comm, rank, world, a):
    return LayerCtx(
        comm=comm,
        n=world,
        rank=rank,
        attention="sp",
        ffn_mode=a.mode,
        seq_len=a.tokens * world,
        heads=world,
        kv_heads=world,
        head_dim=1,
        experts=a.experts,
        topk=a.topk,
        norm_topk=False,
        capacity_factor=a.capacity_factor,
        balance_coef=0.01,
        rope_theta=1e4,
        eps=1e-5,
        expert_gemm={"auto": None, "grouped": True, "loop": False}[a.expert_gemm],
        overlap=a.overlap,
        chunks=a.chunks,
    )


def _layer_step(ctx, x, router_w, w1, w3, w2):
    """One forward + backward of the MoE half; returns the dropped row count."""
    saved = {}
    probs, scores, ids, gates = moe.router_fwd(ctx, x, router_w)
    _, coef = moe.balance_fwd(ctx, probs, ids)
    fwd = moe.a2a_forward if ctx.ffn_mode == "ep_a2a" else moe.gathered_forward
    bwd = moe.a2a_backward if ctx.ffn_mode == "ep_a2a" else moe.gathered_backward
    out = fwd(ctx, x, ids, gates, scores, w1, w3, w2, saved)[0].wait()
    _, d_gates, *_ = bwd(ctx, torch.ones_like(out), lambda: x, w1, w3, w2, saved)
    moe.router_bwd(ctx, d_gates, 1.0, probs, scores, ids, x, router_w, coef)
    return saved["dropped"]


class Probe:
    """Seconds per FLOP of this layer's GEMM shapes: [rows, h] x [h, f] and [rows, f] x [f, h],
    every rank at once; the best of every sample taken during the run.

    Sampled after each step as well as at the end: on a shared machine a burst of
    load can cover a few consecutive samples (once it made the roofline 1.8x too
    slow and the layer "138 %" of it), and the best sample of the whole run is the
    GEMM speed the machine really offered. More samples can only lower the ratio.
    The samples right after each step also give that step its own roofline (the
    paired ratio, see ``main``)."""

    def __init__(self, rows, h, f, dtype):
        self.a, self.b = torch.randn(rows, h, dtype=dtype), torch.randn(h, f, dtype=dtype)
        self.c, self.d = torch.randn(rows, f, dtype=dtype), torch.randn(f, h, dtype=dtype)
        self.flops = 4 * rows * h * f
        self.best = float("inf")
        self.samples = 0

    def sample(self, repeats: int = 1) -> float:
        """Take ``repeats`` samples; returns the best of them (seconds per FLOP)."""
        best = float("inf")
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            self.a @ self.b
            self.c @ self.d
            best = min(best, time.perf_counter() - start)
            self.samples += 1
        self.best = min(self.best, best)
        return best / self.flops

    def sec_per_flop(self) -> float:
        return self.best / self.flops


# Probe samples taken right after each timed step; their best is that step's roofline.
PAIRED_REPEATS = 3

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::_grouped_mm")


def _profile(fn) -> dict:
    """One step under torch.profiler: self CPU seconds of the expert GEMMs and of the rest,
    by operator (the rest's ten largest)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    by_op = {}
    for ev in prof.key_averages():
        by_op[ev.key] = by_op.get(ev.key, 0.0) + ev.self_cpu_time_total / 1e6
    gemm = sum(v for k, v in by_op.items() if k in GEMM_OPS)
    total = sum(by_op.values())
    rest = sorted(((v, k) for k, v in by_op.items() if k not in GEMM_OPS), reverse=True)
    return {
        "total_s": total,
        "gemm_s": gemm,
        "gemm_share": gemm / total if total else 0.0,
        "rest_top": {k: round(v, 5) for v, k in rest[:10]},
    }


def bf16_path() -> str:
    """How this CPU runs bf16 GEMMs: AMX tiles, AVX-512 BF16 dot products, or neither."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "unknown"
    if "amx_bf16" in flags:
        return "amx_bf16"
    return "avx512_bf16" if "avx512_bf16" in flags else "no bf16 instructions"


def _run(rank, world, a):
    ops.use_fused_kernels(getattr(a, "fused", False))
    torch.manual_seed(rank)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    comm = Comm(dist.group.WORLD, rank, world)
    ctx = _ctx(comm, rank, world, a)
    el = a.experts // world
    x = torch.randn(a.tokens, a.hidden, dtype=dtype)
    router_w = torch.randn(a.experts, a.hidden, dtype=dtype) * 0.02
    w1, w3 = (torch.randn(el, a.hidden, a.ffn, dtype=dtype) * 0.02 for _ in range(2))
    w2 = torch.randn(el, a.ffn, a.hidden, dtype=dtype) * 0.02
    # Balanced routing gives each local expert tokens * topk / experts_per_rank rows.
    probe = Probe(a.tokens * a.topk // el, a.hidden, a.ffn, dtype)
    times, beside, dropped = [], [], 0
    for step in range(a.warmup + a.steps):
        dist.barrier()
        start = time.perf_counter()
        dropped = _layer_step(ctx, x, router_w, w1, w3, w2)
        if step >= a.warmup:
            times.append(time.perf_counter() - start)
            beside.append(probe.sample(repeats=PAIRED_REPEATS))
    probe.sample(repeats=5)
    sec_per_flop = probe.sec_per_flop()
    dist.barrier()
    split = _profile(lambda: _layer_step(ctx, x, router_w, w1, w3, w2))
    return {
        "times": times,
        "sec_per_flop": sec_per_flop,
        "sec_per_flop_beside": beside,
        "probe_samples": probe.samples,
        "dropped": dropped,
        "profile": split,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sizes = {"--hidden": 512, "--ffn": 1024, "--experts": 8, "--topk": 2, "--tokens": 4096}
    for flag, default in {**sizes, "--ep": 2, "--warmup": 3, "--steps": 10, "--threads": 1}.items():
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--mode", choices=["ep_a2a", "ep_agrs"], default="ep_a2a")
    p.add_argument("--capacity-factor", type=float, default=0.0)
    p.add_argument(
        "--expert-gemm",
        choices=["auto", "grouped", "loop"],
        default="auto",
        help="expert GEMMs as torch._grouped_mm calls, a loop over experts, or what the "
        "trainer picks for the device and dtype (auto)",
    )
    p.add_argument(
        "--fused",
        action="store_true",
        help="compiled SwiGLU elementwise kernels (train.fused_kernels; compiles in warm-up)",
    )
    p.add_argument(
        "--overlap",
        action="store_true",
        help="comm.overlap: all-to-alls run beside independent work (backward's dW GEMMs)",
    )
    p.add_argument("--chunks", type=int, default=1, help="comm.chunks: pipelined pieces")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.experts % a.ep:
        p.error(f"--experts {a.experts} must be divisible by --ep {a.ep}")
    ranks = run_local(a.ep, _run, a, threads=a.threads)
    slowest = [max(r["times"][i] for r in ranks) for i in range(a.steps)]
    step_s = statistics.median(slowest)
    # Expert GEMMs: 3 per row forward (FC1, FC3, FC2), 6 backward, 2 h f FLOPs each.
    flops_per_rank = 18 * a.tokens * a.topk * a.hidden * a.ffn
    roofline_s = flops_per_rank * max(r["sec_per_flop"] for r in ranks)
    # Each step against the GEMM speed of the moment right after it (the slower rank's
    # probe): load that slows the host for seconds slows both alike, so this share moves
    # less with the machine's neighbours than the best-of-run one above.
    paired = [
        flops_per_rank * max(r["sec_per_flop_beside"][i] for r in ranks) / slowest[i]
        for i in range(a.steps)
    ]
    result = {
        "args": vars(a),
        "step_s": step_s,
        "roofline_s": roofline_s,
        "roofline_ratio": roofline_s / step_s,
        "roofline_samples": ranks[0]["probe_samples"],
        "paired_ratio": statistics.median(paired),
        "paired_ratios": paired,
        "tflops_per_rank": flops_per_rank / step_s / 1e12,
        "dropped_rows_last_step": sum(r["dropped"] for r in ranks),
        "step_times_s": slowest,
        "cpu_bf16_path": bf16_path(),
        "profile_rank0": ranks[0]["profile"],
    }
    print(
        f"{a.mode} ep={a.ep} {a.dtype} expert-gemm={a.expert_gemm}: "
        f"step {step_s * 1e3:.1f} ms (median, slowest rank), "
        f"GEMM roofline {roofline_s * 1e3:.1f} ms -> {100 * result['roofline_ratio']:.1f} % of "
        f"roofline ({100 * result['paired_ratio']:.1f} % paired with the probe after each "
        f"step), {result['tflops_per_rank'] * 1e3:.1f} GFLOP/s per rank; "
        f"bf16 path {result['cpu_bf16_path']}; profile (rank 0, one step): expert GEMMs "
        f"{100 * ranks[0]['profile']['gemm_share']:.0f} %, the rest "
        + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in ranks[0]["profile"]["rest_top"].items())
    )
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(a.json, result)


if __name__ == "__main__":
    main()
