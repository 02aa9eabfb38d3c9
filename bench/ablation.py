"""The paper's ablation ladder at n = 4, on loopback and on the emulated fabric, in one run.

    python bench/ablation.py [--steps 5] [--warmup 2] [--intra-mbit auto] \\
        [--json bench/results/ablation.json] [--png docs/ablation.png] [--no-fabric] \\
        [--set KEY=VALUE ...]

Rows (each adds one thing to the previous, MegaScale-MoE (arXiv 2505.11432), evaluation):
  1. tp+tp: Megatron-style TP attention and TP experts, no overlap
  2. sp+ep: Ulysses SP attention and EP (all-to-all) experts
  3. + inter-operator overlap (comm.overlap)
  4. + intra-operator overlap (comm.chunks = 2)
  5. + bf16_a2a gradient sync (no effect at dp = 1: one node of 4 ranks)
  6. + FP8 communication (comm.fp8)

A 2-layer MoE (h 512, h_ffn 1024, 8 experts top-2, seq 512, 4 sequences) trains
on 4 ranks, one thread each. All rows live in the same 4 processes and run
interleaved, one step of each per round, so the machine's drifting load is
shared by every row. Per row: the median over steps of the slowest
rank's step time and its ratio to row 1, normalised throughput (the inverse,
the paper's measure), the slowest rank's exposed communication per step, the
overlap ratio (1 - exposed / collective time) and bytes sent per rank. The JSON
also says whether exposed communication fell at each overlap step
(``exposed_falls``).

``--intra-mbit auto`` sets the fabric's per-rank link so that the network is
about 40 % of row 1's step (the paper measured 43.6 % of forward time before
its optimisations): a first guess from row 1's bytes and loopback step, then
a short run of row 1 on the fabric and one rescaling by what the network
really added. The JSON records the share reached
(``fabric_row1_network_share``) and row 1's exposed share, which also counts
ranks waiting for each other on shared cores; and per row the idle core time
(core-seconds of the step no rank's thread ran: what the network and the
stalls really cost a machine with more ranks than cores).

``--png`` plots (needs matplotlib, a dependency of megamoe, checked
before the ladder starts); without it nothing is plotted. The fabric needs
root and iproute2, also checked first (``--no-fabric`` runs loopback only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._deps import require
from bench.fabric import unavailable as fabric_unavailable
from trainer.atomic import write_json_atomic

MODEL = (
    "model.vocab_size=512 model.hidden=512 model.heads=8 model.kv_heads=4 model.ffn_hidden=1024 "
    "model.experts=8 model.topk=2 model.seq_len=512 model.layers=2 train.global_batch=4 "
    "parallel.n=4"
).split()
LADDER = [
    ("tp+tp, no overlap", ["parallel.attention=tp", "parallel.ffn=tp"]),
    ("sp+ep", ["parallel.attention=sp", "parallel.ffn=ep_a2a"]),
    ("+ inter-op overlap", ["comm.overlap=true"]),
    ("+ intra-op chunks", ["comm.chunks=2"]),
    ("+ bf16_a2a grads", ["comm.grad_sync=bf16_a2a"]),
    ("+ FP8", ["comm.fp8=true"]),
]
PAPER = [1.00, 1.13, 1.22, 1.28, None, None]  # normalised throughput, 240 H800


def _build_row(rank: int, world: int, overrides: list[str]):
    """One ladder row's model, optimizer and schedule on this rank (its own groups and stats)."""
    import torch

    from trainer.config import Config, apply_overrides
    from trainer.model import MoETransformer
    from trainer.parallel.comm import Comms
    from trainer.parallel.dims import ParallelDims
    from trainer.parallel.model import ParallelMoE
    from trainer.parallel.pipeline import StageRunner
    from trainer.parallel.zero import ZeroOptimizer, chunk_arming

    cfg = apply_overrides(Config(), [*MODEL, *overrides])
    dims = ParallelDims.build(cfg, rank, world)
    comms = Comms.from_dims(dims)
    torch.manual_seed(cfg.train.seed)  # as build_parallel_model, plus balanced routing:
    reference = MoETransformer(cfg.model, groups=cfg.parallel.n)  # every row sees the same load
    model = ParallelMoE(cfg, comms.n, dims.n_index, reference, balanced_routing=True)
    optimizer = ZeroOptimizer(
        model, cfg.train, comms.n, comms.dp, cfg.comm.grad_sync, cfg.comm.overlap
    )
    runner = StageRunner(
        model,
        cfg,
        comms.pp,
        (None, None),
        chunk_arming(optimizer, model) if cfg.comm.overlap else None,
    )
    return cfg, comms, runner, optimizer


def worker(rank: int, world: int, ladder: list[list[str]], steps: int, warmup: int) -> list:
    """Time every ladder row on this rank, the rows interleaved step by step.

    Each round runs one step of every row (starting at a different row each round), so
    drift in the machine's load falls on all rows alike instead of on whichever row
    happened to run during it.
    """
    import torch
    import torch.distributed as dist

    from trainer.parallel.step import parallel_train_step

    rows = [_build_row(rank, world, overrides) for overrides in ladder]
    cfg = rows[0][0]
    L = cfg.model.seq_len // world
    g = torch.Generator().manual_seed(0)
    out = [
        {"times": [], "exposed": [], "comm": [], "by_tag": [], "cpu": [], "bytes": 0} for _ in rows
    ]
    for step in range(warmup + steps):
        tokens = torch.randint(0, cfg.model.vocab_size, (4, cfg.model.seq_len + 1), generator=g)
        batch = [
            (tokens[:, rank * L : (rank + 1) * L], tokens[:, rank * L + 1 : (rank + 1) * L + 1])
        ]
        for i in [(step + j) % len(rows) for j in range(len(rows))]:
            row_cfg, comms, runner, optimizer = rows[i]
            stats = comms.world.stats
            dist.barrier()
            total0, exposed0 = stats.totals()
            bytes0 = sum(k.bytes for k in stats.kinds.values())
            tags0 = dict(stats.tag_exposed)
            cpu0, start = time.process_time(), time.perf_counter()
            parallel_train_step(runner, optimizer, batch, row_cfg, comms)
            if step >= warmup:
                out[i]["times"].append(time.perf_counter() - start)
                out[i]["cpu"].append(time.process_time() - cpu0)  # every thread of the rank
                total1, exposed1 = stats.totals()
                out[i]["exposed"].append(exposed1 - exposed0)
                out[i]["comm"].append(total1 - total0)
                out[i]["by_tag"].append(
                    {t: v - tags0.get(t, 0.0) for t, v in stats.tag_exposed.items()}
                )
                out[i]["bytes"] = sum(k.bytes for k in stats.kinds.values()) - bytes0
    for _, _, _, optimizer in rows:
        optimizer.wait_params()  # the last step's prefetched gathers, before exiting
    return out


def summarise(name: str, ranks: list[dict], steps: int, cores: int) -> dict:
    slowest = [max(r["times"][i] for r in ranks) for i in range(steps)]
    # What the machine left unused: core-seconds of the step no rank's thread ran on.
    # With more ranks than cores a rank's wait is often another rank's compute; idle
    # cores are what the network (or a stall) really cost.
    idle = [max(0.0, cores * slowest[i] - sum(r["cpu"][i] for r in ranks)) for i in range(steps)]
    worst = max(range(len(ranks)), key=lambda r: statistics.median(ranks[r]["times"]))
    exposed = statistics.median(max(r["exposed"][i] for r in ranks) for i in range(steps))
    comm = statistics.median(ranks[worst]["comm"])
    return {
        "row": name,
        "step_s": statistics.median(slowest),
        "exposed_s": exposed,
        "idle_core_s": statistics.median(idle),
        "overlap_ratio": 1.0 - statistics.median(ranks[worst]["exposed"]) / comm if comm else 0.0,
        "bytes_per_rank": ranks[0]["bytes"],
        "exposed_by_tag_s": {  # the slowest rank's, median per step
            tag: statistics.median(step.get(tag, 0.0) for step in ranks[worst]["by_tag"])
            for tag in sorted(ranks[worst]["by_tag"][0])
        },
    }


def run_ladder(
    runner,
    steps: int,
    warmup: int,
    extra_model: list[str] = (),
    rows: int | None = None,
    quiet: bool = False,
    ffn: str = "ep_a2a",
) -> list[dict]:
    """Run the first ``rows`` rows of the ladder (all by default) interleaved; one dict each.

    ``ffn``: the expert mode of the sp+ep rows (the paper's ladder runs AG/RS experts).
    """
    ladder, overrides = [], list(extra_model)
    for _, extra in LADDER[:rows]:
        extra = [f"parallel.ffn={ffn}" if o == "parallel.ffn=ep_a2a" else o for o in extra]
        overrides = overrides + extra
        ladder.append(list(overrides))
    by_rank = runner(ladder, steps, warmup)  # [rank][row]
    out = []
    for i, (name, _) in enumerate(LADDER[: len(ladder)]):
        out.append(summarise(name, [r[i] for r in by_rank], steps, os.cpu_count() or 1))
        r = out[-1]
        if quiet:
            continue
        print(
            f"  {name:<22} step {r['step_s'] * 1e3:7.1f} ms, "
            f"exposed {r['exposed_s'] * 1e3:6.1f} ms, overlap {100 * r['overlap_ratio']:4.1f} %, "
            f"idle cores {r['idle_core_s'] * 1e3:6.1f} ms",
            flush=True,
        )
    base = out[0]["step_s"]
    for r in out:
        r["step_ratio"] = r["step_s"] / base
        r["throughput"] = base / r["step_s"]
    return out


OVERLAP_STEPS = (2, 3)  # rows that add overlap: inter-op (index 2), intra-op chunks (3)


def exposed_falls(rows: list[dict]) -> dict[str, bool]:
    """Whether exposed communication fell at each overlap step of the ladder."""
    return {rows[i]["row"]: rows[i]["exposed_s"] < rows[i - 1]["exposed_s"] for i in OVERLAP_STEPS}


def plot(results: dict, path: str) -> None:
    """Throughput against the paper (left) and exposed communication per row (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, _ in LADDER]
    x = range(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.8))
    width = 0.27
    for i, (label, rows) in enumerate(results.items()):
        at = [v + (i - 1) * width for v in x]
        left.bar(at, [r["throughput"] for r in rows], width, label=label)
        right.bar(
            [v + (i - 0.5) * width for v in x],
            [r["exposed_s"] * 1e3 for r in rows],
            width,
            label=label,
        )
    left.bar([v + width for v in x], [p or 0 for p in PAPER], width, label="paper (240 H800)")
    left.set_ylabel("normalised throughput (row 1 = 1)")
    left.axhline(1.0, color="grey", linewidth=0.5)
    right.set_ylabel("exposed communication per step (ms, slowest rank)")
    for ax, where in ((left, "lower right"), (right, "upper right")):
        ax.set_xticks(list(x), names, rotation=20, ha="right")
        ax.legend(loc=where)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


NETWORK_SHARE = 0.4  # of row 1's step, as the paper's 43.6 % of forward time


def _on_fabric(fab):
    def run(ladder, steps, warmup):
        return fab.run(
            "bench.ablation:worker", 4, {"ladder": ladder, "steps": steps, "warmup": warmup}
        )

    return run


def auto_rate(loopback_row1: dict, extra_model: list[str]) -> float:
    """The per-rank link rate (Mbit/s) at which the network is ~40 % of row 1's step.

    First guess: move row 1's bytes in 2/3 of its loopback step. gloo does not move
    exactly its booked bytes (a reduce-scatter runs as an all-reduce) and TCP adds its
    own costs, so row 1 is then timed on the fabric for a few steps and the rate scaled
    by what the network actually added, once.
    """
    from bench.fabric import Fabric

    loop_s = loopback_row1["step_s"]
    target_s = loop_s * NETWORK_SHARE / (1 - NETWORK_SHARE)  # network time to add
    mbit = loopback_row1["bytes_per_rank"] * 8 / 1e6 / target_s
    with Fabric(nodes=1, ranks_per_node=4, intra_mbit=mbit, inter_mbit=mbit) as fab:
        probe = run_ladder(_on_fabric(fab), 3, 1, extra_model, rows=1, quiet=True)[0]
    added_s = max(probe["step_s"] - loop_s, 1e-3)
    share = added_s / probe["step_s"]
    tuned = mbit * added_s / target_s
    print(
        f"fabric: at {mbit:.0f} Mbit/s the network was {100 * share:.0f} % of row 1's step;"
        f" rescaled",
        flush=True,
    )
    return tuned


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--intra-mbit", default="auto")
    p.add_argument("--no-fabric", action="store_true")
    p.add_argument("--json", default="bench/results/ablation.json")
    p.add_argument("--png", default=None, help="plot to this file (e.g. docs/ablation.png)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change the model for every row (e.g. toy shapes for a smoke run)",
    )
    p.add_argument(
        "--ffn",
        default="ep_a2a",
        choices=["ep_a2a", "ep_agrs"],
        help="expert mode of the sp+ep rows (default: all-to-all, what auto picks here)",
    )
    p.add_argument(
        "--replot", action="store_true", help="only redraw --png from the results already in --json"
    )
    a = p.parse_args()
    # Everything that could stop the run is checked before the ladder's minutes start.
    if a.replot and not a.png:
        p.error("--replot needs --png")
    if a.png:
        require("matplotlib", why="--png")
    if not a.no_fabric and (problem := fabric_unavailable()):
        p.error(f"{problem}; run with --no-fabric for loopback only")
    if a.replot:
        plot(json.loads(Path(a.json).read_text())["results"], a.png)
        return
    from bench.fabric import Fabric
    from trainer.parallel.spawn import run_local

    results = {}
    print("loopback:", flush=True)
    results["loopback"] = run_ladder(
        lambda ladder, s, w: run_local(4, worker, ladder, s, w, threads=1),
        a.steps,
        a.warmup,
        a.set,
        ffn=a.ffn,
    )
    out = {
        "model": MODEL + a.set,
        "ffn": a.ffn,
        "ranks": 4,
        "steps": a.steps,
        "paper_throughput": PAPER,
    }
    if not a.no_fabric:
        first = results["loopback"][0]
        mbit = float(a.intra_mbit) if a.intra_mbit != "auto" else auto_rate(first, a.set)
        print(f"fabric: {mbit:.0f} Mbit/s per rank link", flush=True)
        with Fabric(nodes=1, ranks_per_node=4, intra_mbit=mbit, inter_mbit=mbit) as fab:
            on_fabric = _on_fabric(fab)
            results["fabric"] = run_ladder(on_fabric, a.steps, a.warmup, a.set, ffn=a.ffn)
        out["fabric_intra_mbit"] = mbit
        row1 = results["fabric"][0]
        out["fabric_row1_comm_share"] = row1["exposed_s"] / row1["step_s"]
        # What the network itself adds to row 1: the auto rate aims this at ~40 %.
        out["fabric_row1_network_share"] = 1 - results["loopback"][0]["step_s"] / row1["step_s"]
    out["results"] = results
    out["exposed_falls"] = {net: exposed_falls(rows) for net, rows in results.items()}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(a.json, out)
    if a.png:
        plot(results, a.png)
    header = (
        "row | network | step | vs row 1 | throughput | paper | exposed comm | overlap "
        "| idle cores | bytes"
    )
    print(f"\n| {header} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for net, rows in results.items():
        for r, paper in zip(rows, PAPER, strict=True):
            print(
                f"| {r['row']} | {net} | {r['step_s'] * 1e3:.1f} ms | {r['step_ratio']:.2f} "
                f"| {r['throughput']:.2f} | {paper if paper else '-'} "
                f"| {r['exposed_s'] * 1e3:.1f} ms | {100 * r['overlap_ratio']:.0f} % "
                f"| {r['idle_core_s'] * 1e3:.0f} ms "
                f"| {r['bytes_per_rank'] / 2**20:.2f} MiB |"
            )


if __name__ == "__main__":
    main()
