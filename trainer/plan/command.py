"""``megamoe plan``: predictions for both systems and for the config as written, or a layout
search, as a table or JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

from trainer import config
from trainer.config import Config
from trainer.errors import ConfigError
from trainer.plan import layout as layouts
from trainer.plan.hardware import GiB, Hardware, hardware_profile
from trainer.plan.model import Prediction, predict
from trainer.plan.search import SearchResult, explain, search


def check_cluster(hw: Hardware, gpus: int) -> None:
    """GPUs must be a whole number of nodes (or one partial node)."""
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus} must be >= 1")
    per_node = hw.gpus_per_node
    if gpus > per_node and gpus % per_node:
        raise ConfigError(
            f"--gpus {gpus} is not divisible by the {per_node} GPUs per {hw.name} node"
        )


def check_group(cfg: Config, hw: Hardware) -> None:
    if cfg.parallel.n > hw.gpus_per_node:
        raise ConfigError(
            f"parallel.n = {cfg.parallel.n} exceeds the {hw.gpus_per_node} GPUs of one "
            f"{hw.name} node (the n-group must stay inside a node)"
        )


def compare(cfg: Config, hw: Hardware, gpus: int, global_batch: int) -> dict[str, Prediction]:
    """Both systems at the config's n and pp, dp filling the cluster."""
    check_group(cfg, hw)
    return {
        "megamoe": predict(
            cfg, hw, layouts.megamoe(cfg, gpus, global_batch), global_batch, "megamoe"
        ),
        "megatron": predict(
            cfg, hw, layouts.megatron(cfg, gpus, global_batch), global_batch, "megatron"
        ),
    }


def as_written(cfg: Config, hw: Hardware, gpus: int, global_batch: int) -> Prediction:
    """The config exactly as written (``layout.from_config``) on ``gpus`` GPUs."""
    check_group(cfg, hw)
    return predict(cfg, hw, layouts.from_config(cfg, gpus, global_batch), global_batch, "config")


def run_plan(args: argparse.Namespace) -> int:
    cfg = config.load(args.config, args.overrides)
    hw = hardware_profile(args.gpu)
    check_cluster(hw, args.gpus)
    batch = args.global_batch or cfg.train.global_batch
    if batch < 1:
        raise ConfigError(f"--global-batch {batch} must be >= 1")
    if args.search:
        result = search(cfg, hw, args.gpus, batch)
        baseline = predict(cfg, hw, layouts.baseline_like(result.best.layout), batch, "megatron")
        if args.json:
            print(json.dumps(_search_json(result, baseline, batch), indent=1))
        else:
            print(_search_text(cfg, args.config, hw, args.gpus, batch, result, baseline))
        return 0
    preds = {**compare(cfg, hw, args.gpus, batch), "config": as_written(cfg, hw, args.gpus, batch)}
    if args.json:
        print(json.dumps({name: p.to_dict() for name, p in preds.items()}, indent=1))
    else:
        print(_compare_text(cfg, args.config, hw, args.gpus, batch, preds))
    return 0


# ---------------------------------------------------------------- text


def _tokens(x: float) -> str:
    return f"{x / 1e6:.3f}M" if x >= 1e6 else f"{x / 1e3:.1f}k"


def _gib(x: float) -> str:
    return f"{x / GiB:.1f} GiB"


def _header(cfg: Config, path: str, hw: Hardware, gpus: int, batch: int) -> str:
    nodes = max(1, gpus // hw.gpus_per_node)
    return (
        f"{path} on {gpus} x {hw.name} ({nodes} node{'s' * (nodes > 1)}), "
        f"global batch {batch} x {cfg.model.seq_len} tokens"
    )


def _rows(p: Prediction) -> dict[str, str]:
    lay = p.layout
    v = f" v{lay.virtual_stages}" if lay.virtual_stages > 1 else ""
    return {
        "layout": f"n{lay.n} pp{lay.pp}{v} dp{lay.dp} b{lay.micro_batch}",
        "attention / ffn": f"{lay.attention} / {lay.ffn}",
        "overlap": ("inter-op" if lay.overlap else "none")
        + (f" + {lay.chunks} chunks" if lay.chunks > 1 else ""),
        "grad sync / recompute": f"{lay.grad_sync} / {lay.recompute}",
        "seconds / iteration": f"{p.seconds_per_iteration:.2f}",
        "tokens / s": _tokens(p.tokens_per_s),
        "MFU": f"{p.mfu:.1%}",
        "compute": f"{p.compute_s:.2f} s",
        "exposed comm": f"{p.exposed_comm_s:.2f} s (DP sync {p.dp_sync_s:.2f} s)",
        "pipeline bubble": f"{p.bubble_s:.2f} s ({p.bubble_fraction:.1%})",
        "memory / GPU": f"{_gib(p.memory.total)} of {_gib(p.memory_capacity)}"
        + ("" if p.fits else "  DOES NOT FIT"),
    }


def _compare_text(
    cfg: Config, path: str, hw: Hardware, gpus: int, batch: int, preds: dict[str, Prediction]
) -> str:
    rows = {name: _rows(p) for name, p in preds.items()}
    names = list(rows)
    keys = rows[names[0]]
    width = max(len(k) for k in keys) + 2
    cols = [max(len(name), *(len(v) for v in rows[name].values())) + 2 for name in names]

    def line(label: str, cells: list[str]) -> str:
        return (
            f"{label:{width}}"
            + "".join(f"{c:<{w}}" for c, w in zip(cells, cols, strict=True)).rstrip()
        )

    lines = [_header(cfg, path, hw, gpus, batch), "", line("", names)]
    lines += [line(k, [rows[name][k] for name in names]) for k in keys]
    tps = {name: p.tokens_per_s for name, p in preds.items()}
    lines += ["", f"speed-up megamoe / megatron: {tps['megamoe'] / tps['megatron']:.2f}x"]
    lines.append(
        f"config as written: {tps['config'] / tps['megamoe']:.2f}x megamoe, "
        f"{tps['config'] / tps['megatron']:.2f}x megatron"
    )
    planned_dp = preds["config"].layout.dp
    if planned_dp != cfg.parallel.dp:
        lines.append(
            f"note: the config's parallel.dp = {cfg.parallel.dp} makes "
            f"{cfg.parallel.world} GPUs; on {gpus} the config column runs dp = {planned_dp}"
        )
    if not cfg.train.micro_batch:
        lines.append(
            f"note: train.micro_batch = 0 runs global batch / dp = "
            f"{preds['config'].layout.micro_batch} sequences per micro-batch "
            "(the presets run 1; --set train.micro_batch=1 to compare)"
        )
    return "\n".join(lines)


def _search_text(
    cfg: Config,
    path: str,
    hw: Hardware,
    gpus: int,
    batch: int,
    result: SearchResult,
    baseline: Prediction,
) -> str:
    lines = [_header(cfg, path, hw, gpus, batch), ""]
    lines.append(f"{'#':>2}  {'tokens/s':>9}  {'MFU':>6}  {'memory':>9}  layout")
    for i, p in enumerate(result.ranked, 1):
        lines.append(
            f"{i:>2}  {_tokens(p.tokens_per_s):>9}  {p.mfu:>6.1%}  "
            f"{_gib(p.memory.total):>9}  {p.layout.describe()}"
        )
    lines.append("")
    lines.append(
        f"rejected: {result.rejected_layout} by the trainer's layout checks, "
        f"{result.rejected_memory} over memory"
    )
    for kind, example in result.examples.items():
        lines.append(f"  e.g. ({kind}) {example}")
    best = result.best
    lines += [
        "",
        f"best: {best.layout.describe()}",
        f"why: {explain(result)}",
        f"megatron at the same n/pp/dp: {_tokens(baseline.tokens_per_s)} tokens/s "
        f"(the best layout is {best.tokens_per_s / baseline.tokens_per_s:.2f}x faster)"
        + ("" if baseline.fits else ", and it does not fit in memory"),
        "train it with: " + " ".join(f"--set {o}" for o in best.layout.overrides(batch)),
    ]
    return "\n".join(lines)


def _search_json(result: SearchResult, baseline: Prediction, batch: int) -> dict[str, Any]:
    best = result.best
    return {
        "megamoe": best.to_dict(),
        "megatron": baseline.to_dict(),
        "search": {
            "overrides": best.layout.overrides(batch),
            "why": explain(result),
            "ranked": [
                {
                    "layout": p.layout.to_dict(),
                    "tokens_per_s": p.tokens_per_s,
                    "mfu": p.mfu,
                    "memory_per_gpu_bytes": p.memory.total,
                    "terms_s": p.terms(),
                }
                for p in result.ranked
            ],
            "rejected_by_layout_checks": result.rejected_layout,
            "rejected_by_memory": result.rejected_memory,
            "examples": result.examples,
        },
    }
