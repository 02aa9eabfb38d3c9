"""Step time, bytes and exposed communication of the five attention x FFN layouts at n = 4.

    python bench/layout.py [--steps 6] [--warmup 2] [--json bench/results/layout.json]

Each layout trains a small MoE (synthetic tokens, fp32, one thread per rank)
on 4 local gloo ranks, one layout after another in this one run. Reported per
layout: the median over steps of the slowest rank's step time (forward,
backward, gradient sync, optimizer), forward + backward bytes per step sent by
one rank, exposed communication seconds per step (the slowest rank's), and
all three as ratios to tp+tp. On one machine the ranks share cores and
loopback: "exposed" also includes waiting for slower ranks.
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
from trainer.config import Config, apply_overrides
from trainer.parallel.comm import Comms
from trainer.parallel.dims import ParallelDims
from trainer.parallel.model import build_parallel_model
from trainer.parallel.pipeline import StageRunner
from trainer.parallel.spawn import run_local
from trainer.parallel.step import parallel_train_step
from trainer.parallel.zero import ZeroOptimizer

LAYOUTS = [("tp", "tp"), ("sp", "tp"), ("tp", "ep_a2a"), ("sp", "ep_a2a"), ("sp", "ep_agrs")]
MODEL = (
    "model.vocab_size=512 model.hidden=256 model.heads=8 model.kv_heads=4 model.ffn_hidden=512 "
    "model.experts=8 model.topk=2 model.seq_len=512 model.layers=2 train.global_batch=4 "
    "parallel.n=4"
).split()


def _bench(rank, world, attention, ffn, steps, warmup):
    cfg = apply_overrides(
        Config(), [*MODEL, f"parallel.attention={attention}", f"parallel.ffn={ffn}"]
    )
    comms = Comms.from_dims(ParallelDims.build(cfg, rank, world))
    comm = comms.n
    model = build_parallel_model(cfg, comm, rank, torch.device("cpu"))
    optimizer = ZeroOptimizer(model, cfg.train, comms.n, comms.dp, cfg.comm.grad_sync)
    runner = StageRunner(model, cfg, comms.pp, (None, None))
    L = cfg.model.seq_len // world
    g = torch.Generator().manual_seed(0)
    times, exposed, sent = [], [], []
    for step in range(warmup + steps):
        tokens = torch.randint(0, cfg.model.vocab_size, (4, cfg.model.seq_len + 1), generator=g)
        batch = [
            (tokens[:, rank * L : (rank + 1) * L], tokens[:, rank * L + 1 : (rank + 1) * L + 1])
        ]
        dist.barrier()
        before_exposed = sum(s.exposed_seconds for s in comm.stats.kinds.values())
        before_bytes = sum(s.bytes for s in comm.stats.kinds.values())
        start = time.perf_counter()
        parallel_train_step(runner, optimizer, batch, cfg, comms)
        if step >= warmup:
            times.append(time.perf_counter() - start)
            exposed.append(
                sum(s.exposed_seconds for s in comm.stats.kinds.values()) - before_exposed
            )
            sent.append(sum(s.bytes for s in comm.stats.kinds.values()) - before_bytes)
    return {"times": times, "exposed": exposed, "bytes": sent[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default="bench/results/layout.json")
    args = parser.parse_args()
    rows = []
    for attention, ffn in LAYOUTS:
        ranks = run_local(4, _bench, attention, ffn, args.steps, args.warmup)
        slowest = [max(r["times"][i] for r in ranks) for i in range(args.steps)]
        worst_exposed = [max(r["exposed"][i] for r in ranks) for i in range(args.steps)]
        row = {
            "layout": f"{attention}+{ffn}",
            "step_s": statistics.median(slowest),
            "exposed_s": statistics.median(worst_exposed),
            "bytes_per_rank": ranks[0]["bytes"],
        }
        rows.append(row)
        print(f"{row['layout']:>12}: step {row['step_s'] * 1e3:7.1f} ms", flush=True)
    base = rows[0]
    for row in rows:
        row["step_ratio"] = row["step_s"] / base["step_s"]
        row["bytes_ratio"] = row["bytes_per_rank"] / base["bytes_per_rank"]
        row["exposed_ratio"] = row["exposed_s"] / base["exposed_s"]
    result = {"model": MODEL, "ranks": 4, "threads_per_rank": 1, "steps": args.steps, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.json, result)
    print("\n| layout | step time | ratio | bytes/rank/step | ratio | exposed comm | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['layout']} | {r['step_s'] * 1e3:.1f} ms | {r['step_ratio']:.2f} "
            f"| {r['bytes_per_rank'] / 2**20:.2f} MiB | {r['bytes_ratio']:.2f} "
            f"| {r['exposed_s'] * 1e3:.1f} ms | {r['exposed_ratio']:.2f} |"
        )


if __name__ == "__main__":
    main()
