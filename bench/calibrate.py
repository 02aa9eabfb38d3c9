"""The planner's model against bench/ablation.py's measured CPU step times.

    python bench/calibrate.py [--ablation bench/results/ablation.json] \\
        [--json bench/results/calibration.json]

Probes this machine (under a minute): the GEMM rate at one thread and at two
(``trainer.observe.mfu``'s cached probe), the one-thread copy bandwidth and FP8
codec rate, and loopback gloo among 2 and 4 one-thread ranks (bench/probes.py,
ranks started by ``trainer.parallel.spawn.run_local``: all-to-all, all-gather,
reduce-scatter and a one-float all-reduce). From these alone it builds the
planner's profile of the ablation's cluster - 4 one-thread ranks on this
machine's cores (``trainer.plan.hardware.cpu_ranks``), on loopback or with
every rank's link held to the fabric's Mbit/s (``over_fabric``) - and predicts
each row's step time with ``trainer.plan.predict`` on the layout the trainer
runs for that row's config (``trainer_layout``). Nothing is fitted to the
measured steps.

A second prediction divides the kernel time by one ``framework`` efficiency
measured on a different run: one rank, one thread, the same model at n = 1 (no
communication, no shared cores), model / measured step. It shows how much of
the error is per-operator overhead a single rank already has.

Prints a markdown table (row, network, measured step, predicted step, error)
and the mean and max absolute error, and writes all of it, the probes and each
row's predicted terms to the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ablation import LADDER
from bench.probes import probe_cpu_rates, probe_gloo
from trainer.atomic import write_json_atomic
from trainer.config import Config, apply_overrides
from trainer.plan.hardware import (
    CpuRates,
    GlooRates,
    Hardware,
    cpu_ranks,
    over_fabric,
)
from trainer.plan.layer import act_bytes
from trainer.plan.layout import Layout, trainer_layout
from trainer.plan.memory import stage_params
from trainer.plan.model import Prediction, predict

NETWORKS = ("loopback", "fabric")
# The 1-rank step that measures the framework efficiency: row 2's settings at n = 1.
ONE_RANK = ["parallel.n=1", "parallel.attention=sp", "parallel.ffn=ep_a2a"]
GLOO_PROBES = 3


# ---------------------------------------------------------------- probes


def probe_one_rank(steps: int = 7, warmup: int = 2) -> float:
    """Median step seconds of bench/ablation.py's model on one rank, one thread (n = 1)."""
    from bench.ablation import worker
    from trainer.parallel.spawn import run_local

    (rank0,) = run_local(1, worker, [ONE_RANK], steps, warmup, threads=1)
    return statistics.median(rank0[0]["times"])  # its one row


def probe(ranks: tuple[int, ...] = (2, 4)) -> dict[str, Any]:
    """This machine's rates, as plain numbers (what the JSON records and tests inject)."""
    import torch

    from trainer.observe.mfu import cpu_peak_flops

    rates = probe_cpu_rates()
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        gemm_2t = cpu_peak_flops("fp32")
    finally:
        torch.set_num_threads(threads)
    gloo = {}
    for r in ranks:
        # Ranks sharing cores make one probe move by +-30 %: the median of three
        # probes, each in fresh processes, per quantity.
        runs = [probe_gloo(r) for _ in range(GLOO_PROBES)]
        gloo[str(r)] = {
            key: statistics.median(getattr(g, key) for g in runs)
            for key in ("all_to_all", "all_gather", "reduce_scatter", "latency_s")
        }
    return {
        "cores": rates.cores,
        "gemm_fp32_1thread": rates.gemm_fp32,
        "gemm_fp32_2threads": gemm_2t,
        "gemm_bf16_1thread": rates.gemm_bf16,
        "memory_bw_1thread": rates.memory_bw,
        "fp8_codec_rate_1thread": rates.fp8_codec_rate,
        "memory_bytes": rates.memory_bytes,
        "gloo": gloo,
        "one_rank_step_s": probe_one_rank(),
    }


def cpu_rates(probes: dict[str, Any]) -> CpuRates:
    return CpuRates(
        cores=probes["cores"],
        gemm_fp32=probes["gemm_fp32_1thread"],
        gemm_bf16=probes["gemm_bf16_1thread"],
        memory_bw=probes["memory_bw_1thread"],
        fp8_codec_rate=probes["fp8_codec_rate_1thread"],
        memory_bytes=probes["memory_bytes"],
    )


def profiles(
    probes: dict[str, Any], ranks: int, mbit: float | None, framework: float = 1.0
) -> dict[str, Hardware]:
    """The planner's hardware for the ablation's ranks: loopback, and the fabric if any."""
    g = probes["gloo"][str(ranks)]
    gloo = GlooRates(ranks, g["all_to_all"], g["all_gather"], g["reduce_scatter"], g["latency_s"])
    loopback = cpu_ranks(cpu_rates(probes), gloo)
    loopback = replace(loopback, efficiency=replace(loopback.efficiency, framework=framework))
    out = {"loopback": loopback}
    if mbit:
        out["fabric"] = over_fabric(loopback, mbit)
    return out


# ---------------------------------------------------------------- prediction


def row_configs(model: list[str], ladder=LADDER) -> list[tuple[str, Config]]:
    """Each row's config: the model overrides plus the ladder's overrides up to that row."""
    rows, overrides = [], []
    for name, extra in ladder:
        overrides = overrides + extra
        rows.append((name, apply_overrides(Config(), [*model, *overrides])))
    return rows


def step_bytes(cfg: Config, layout: Layout, pred: Prediction) -> float:
    """Bytes one rank books per step in the model: the layers' collectives, the node's
    gradient reduce-scatter (FP32) and parameter all-gather, and the DP step."""
    layer = sum(c.bytes for c in pred.layer.fwd_comm + pred.layer.bwd_comm)
    params = stage_params(cfg.model, layout, 0)
    n, dp = layout.n, layout.dp
    param_bytes = act_bytes(cfg.train.dtype)
    grad_bytes = 4 if layout.grad_sync == "fp32_rs" else 2
    node = params.replicated * (n - 1) / n * (4 + param_bytes)
    across = params.synced_across_nodes(layout) * (dp - 1) / dp * (grad_bytes + param_bytes)
    return cfg.model.layers * layer + node + across


def one_rank_framework(model: list[str], probes: dict[str, Any]) -> tuple[float, float]:
    """(model's 1-rank step with framework 1, its ratio to the measured 1-rank step)."""
    cfg = apply_overrides(Config(), [*model, *ONE_RANK])
    hw = cpu_ranks(cpu_rates(probes), GlooRates(1, 1.0, 1.0, 1.0, 0.0))  # no collectives
    predicted = predict(cfg, hw, trainer_layout(cfg)).seconds_per_iteration
    return predicted, predicted / probes["one_rank_step_s"]


def _row(
    name: str, network: str, measured: dict, cfg: Config, hw: Hardware, hw_f: Hardware
) -> dict[str, Any]:
    layout = trainer_layout(cfg)
    pred = predict(cfg, hw, layout)
    step = pred.seconds_per_iteration
    step_f = predict(cfg, hw_f, layout).seconds_per_iteration
    return {
        "row": name,
        "network": network,
        "measured_step_s": measured["step_s"],
        "predicted_step_s": step,
        "error_pct": 100.0 * (step / measured["step_s"] - 1.0),
        "predicted_step_framework_s": step_f,
        "error_framework_pct": 100.0 * (step_f / measured["step_s"] - 1.0),
        "measured_exposed_s": measured["exposed_s"],
        "predicted_compute_s": pred.compute_s + pred.optimizer_s,
        "predicted_exposed_s": pred.exposed_comm_s,
        "measured_bytes_per_rank": measured["bytes_per_rank"],
        "predicted_bytes_per_rank": step_bytes(cfg, layout, pred),
        "layout": layout.describe(),
    }


def _summary(rows: list[dict], key: str = "error_pct") -> dict[str, float]:
    signed = [r[key] for r in rows]
    errors = [abs(e) for e in signed]
    return {
        "rows": len(rows),
        "mean_abs_error_pct": statistics.fmean(errors),
        "max_abs_error_pct": max(errors),
        "mean_error_pct": statistics.fmean(signed),
    }


def calibrate(ablation: dict[str, Any], probes: dict[str, Any]) -> dict[str, Any]:
    """Predicted vs measured for every row of a recorded ablation, from recorded probes."""
    ranks, mbit = ablation["ranks"], ablation.get("fabric_intra_mbit")
    hws = profiles(probes, ranks, mbit)
    one_rank_model, framework = one_rank_framework(ablation["model"], probes)
    hws_f = profiles(probes, ranks, mbit, framework)
    configs = row_configs(ablation["model"])
    rows = []
    for network, hw in hws.items():
        measured = ablation["results"].get(network, [])
        if not measured:
            continue
        names = [m["row"] for m in measured]
        if names != [name for name, _ in configs]:
            raise ValueError(f"{network} rows {names} are not bench/ablation.py's LADDER")
        rows += [
            _row(name, network, m, cfg, hw, hws_f[network])
            for (name, cfg), m in zip(configs, measured, strict=True)
        ]
    summary, summary_f = {"all": _summary(rows)}, {"all": _summary(rows, "error_framework_pct")}
    for network in NETWORKS:
        mine = [r for r in rows if r["network"] == network]
        if mine:
            summary[network] = _summary(mine)
            summary_f[network] = _summary(mine, "error_framework_pct")
    return {
        "ablation_model": ablation["model"],
        "ranks": ranks,
        "fabric_intra_mbit": mbit,
        "probes": probes,
        "one_rank": {
            "measured_step_s": probes["one_rank_step_s"],
            "model_step_s": one_rank_model,
            "framework": framework,
        },
        "profiles": {net: _profile_dict(hw) for net, hw in hws.items()},
        "rows": rows,
        "summary": summary,
        "summary_framework": summary_f,
    }


def _profile_dict(hw: Hardware) -> dict[str, Any]:
    e = hw.efficiency
    return {
        "name": hw.name,
        "gemm_flops_per_rank": hw.peak_flops_fp32,
        "memory_bw_per_rank": hw.hbm_bw,
        "link_bw": hw.nvlink_bw,
        "all_to_all": e.all_to_all,
        "gather_scatter": e.gather_scatter,
        "reduce_scatter": e.reduce_scatter,
        "latency_s": e.latency_s,
        "comm_cpu_share": hw.comm_cpu_share,
        "fp8_codec_rate_per_rank": hw.fp8_codec_rate,
        "source": hw.source,
    }


# ---------------------------------------------------------------- output


def table(result: dict[str, Any]) -> str:
    f = result["one_rank"]["framework"]
    lines = [
        "| row | network | measured step | predicted step | error | "
        f"predicted, framework {f:.2f} | error | model compute / exposed comm "
        "| bytes/rank measured / model |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['row']} | {r['network']} | {r['measured_step_s'] * 1e3:.1f} ms "
            f"| {r['predicted_step_s'] * 1e3:.1f} ms | {r['error_pct']:+.1f} % "
            f"| {r['predicted_step_framework_s'] * 1e3:.1f} ms "
            f"| {r['error_framework_pct']:+.1f} % "
            f"| {r['predicted_compute_s'] * 1e3:.0f} / {r['predicted_exposed_s'] * 1e3:.0f} ms "
            f"| {r['measured_bytes_per_rank'] / 2**20:.2f} / "
            f"{r['predicted_bytes_per_rank'] / 2**20:.2f} MiB |"
        )
    lines.append("")
    for label, key in (("probes only", "summary"), (f"framework {f:.2f}", "summary_framework")):
        for name, s in result[key].items():
            lines.append(
                f"{label}, {name}: mean |error| {s['mean_abs_error_pct']:.1f} %, "
                f"max |error| {s['max_abs_error_pct']:.1f} %, "
                f"mean signed error {s['mean_error_pct']:+.1f} % over {s['rows']} rows"
            )
    return "\n".join(lines)


def probe_lines(probes: dict[str, Any]) -> str:
    lines = [
        f"cores {probes['cores']}; GEMM fp32 {probes['gemm_fp32_1thread'] / 1e9:.1f} GFLOP/s "
        f"at 1 thread, {probes['gemm_fp32_2threads'] / 1e9:.1f} at 2; copy "
        f"{probes['memory_bw_1thread'] / 1e9:.1f} GB/s; FP8 codec "
        f"{probes['fp8_codec_rate_1thread'] / 1e6:.0f} M elements/s",
    ]
    lines.append(
        f"one rank, one thread, n = 1: step {probes['one_rank_step_s'] * 1e3:.0f} ms measured"
    )
    for ranks, g in probes["gloo"].items():
        lines.append(
            f"loopback gloo, {ranks} ranks: all-to-all {g['all_to_all'] / 1e6:.0f} MB/s, "
            f"all-gather {g['all_gather'] / 1e6:.0f}, reduce-scatter "
            f"{g['reduce_scatter'] / 1e6:.0f}, latency {g['latency_s'] * 1e3:.2f} ms"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ablation", default="bench/results/ablation.json")
    p.add_argument("--json", default="bench/results/calibration.json")
    a = p.parse_args()
    try:
        ablation = json.loads(Path(a.ablation).read_text())
    except (OSError, ValueError) as exc:
        p.error(f"--ablation {a.ablation}: {exc} (run bench/ablation.py --json {a.ablation} first)")
    probes = probe(tuple(sorted({2, ablation["ranks"]})))
    print(probe_lines(probes), flush=True)
    result = calibrate(ablation, probes)
    result["ablation"] = a.ablation
    one = result["one_rank"]
    print(f"model of it {one['model_step_s'] * 1e3:.0f} ms: framework {one['framework']:.3f}")
    print()
    print(table(result))
    if a.json:
        write_json_atomic(a.json, result)


if __name__ == "__main__":
    main()
