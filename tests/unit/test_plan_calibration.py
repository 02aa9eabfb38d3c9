"""The planner's model of bench/ablation.py's CPU cluster, on recorded inputs; bench/probes.py's
probes of this machine, in-process and in well under a second."""

import ast
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch.distributed as dist

from bench import probes
from bench.ablation import LADDER, MODEL
from bench.calibrate import calibrate, profiles, row_configs, step_bytes, table
from trainer.plan import GPUS, hardware_profile
from trainer.plan.hardware import (
    TCP_PAYLOAD,
    CpuRates,
    GlooRates,
    cpu_profile,
    cpu_ranks,
    over_fabric,
)
from trainer.plan.layer import layer_cost
from trainer.plan.layout import trainer_layout
from trainer.plan.model import predict

ROOT = Path(__file__).resolve().parents[2]
ABLATION = json.loads((ROOT / "bench" / "results" / "ablation.json").read_text())

# Probe values of the kind bench/calibrate.py records (a 2-core machine), fixed here.
PROBES = {
    "cores": 2,
    "gemm_fp32_1thread": 97e9,
    "gemm_fp32_2threads": 200e9,
    "gemm_bf16_1thread": 214e9,
    "memory_bw_1thread": 30e9,
    "fp8_codec_rate_1thread": 130e6,
    "memory_bytes": 8 * 2**30,
    "gloo": {
        "2": {"all_to_all": 1.5e9, "all_gather": 0.7e9, "reduce_scatter": 0.4e9, "latency_s": 4e-4},
        "4": {"all_to_all": 7e8, "all_gather": 4e8, "reduce_scatter": 2e8, "latency_s": 1e-3},
    },
    "one_rank_step_s": 1.8,
}
RATES = CpuRates(2, 97e9, 214e9, 30e9, 130e6, 8 * 2**30)
GLOO4 = GlooRates(4, 7e8, 4e8, 2e8, 1e-3)


@pytest.fixture(scope="module")
def rows():
    return row_configs(ABLATION["model"])


@pytest.fixture(scope="module")
def hws():
    return profiles(PROBES, 4, ABLATION["fabric_intra_mbit"])


def test_a_ranks_rate_is_the_one_thread_probe_times_cores_over_ranks():
    four = cpu_ranks(RATES, GLOO4)
    assert four.peak_flops_fp32 == pytest.approx(97e9 / 2)
    assert four.hbm_bw == pytest.approx(30e9 / 2) and four.fp8_codec_rate == pytest.approx(65e6)
    eight = cpu_ranks(RATES, replace(GLOO4, ranks=8))
    assert eight.peak_flops_fp32 == pytest.approx(97e9 / 4)
    two = cpu_ranks(RATES, replace(GLOO4, ranks=2))
    assert two.peak_flops_fp32 == pytest.approx(97e9)  # a core each: no sharing
    one = cpu_ranks(RATES, replace(GLOO4, ranks=1))
    assert one.peak_flops_fp32 == pytest.approx(97e9)  # one thread never uses two cores
    # With no spare core the cores move the data themselves: nothing can hide it.
    assert four.comm_cpu_share == 1.0 and two.comm_cpu_share == 1.0
    assert one.comm_cpu_share == 0.0
    # Links are the gloo rates measured at that many ranks, not divided again.
    assert four.nvlink_bw == 7e8 and four.gpus_per_node == 4
    assert four.efficiency.gather_scatter == pytest.approx(4 / 7)
    assert four.efficiency.reduce_scatter == pytest.approx(2 / 7)
    assert four.efficiency.latency_s == four.efficiency.chunk_latency_s == 1e-3


def test_fabric_links_are_the_tc_rate_less_tcp_headers():
    loop = cpu_ranks(RATES, GLOO4)
    fab = over_fabric(loop, 800)
    wire = 800e6 / 8 * TCP_PAYLOAD
    assert fab.nvlink_bw == pytest.approx(wire)
    assert fab.efficiency.all_to_all == fab.efficiency.gather_scatter == 1.0
    assert fab.efficiency.reduce_scatter == 0.5  # gloo reduce-scatter = all-reduce: 2x bytes
    assert fab.comm_cpu_share == pytest.approx(wire / 7e8)  # the loopback part keeps cores busy
    fast = over_fabric(loop, 100_000)  # a link faster than loopback changes nothing
    assert fast.nvlink_bw * fast.efficiency.all_to_all == pytest.approx(7e8)
    assert fast.comm_cpu_share == pytest.approx(1.0)


def test_trainer_layouts_are_the_ablation_rows(rows):
    assert [name for name, _ in rows] == [name for name, _ in LADDER]
    layouts = [trainer_layout(cfg) for _, cfg in rows]
    for lay in layouts:
        assert (lay.n, lay.pp, lay.dp, lay.micro_batch) == (4, 1, 1, 4)
        assert lay.recompute == "sar" and not lay.dp_overlap and not lay.vocab_parallel
        assert lay.implementation == "trainer"
    one, two, three, four, five, six = layouts
    assert (one.attention, one.ffn, one.overlap, one.chunks) == ("tp", "tp", False, 1)
    assert (two.attention, two.ffn, two.overlap) == ("sp", "ep_a2a", False)
    assert three.overlap and three.chunks == 1
    assert four.chunks == 2 and four.grad_sync == "fp32_rs"
    assert five.grad_sync == "bf16_a2a" and not five.fp8
    assert six.fp8


def test_the_model_books_the_bytes_the_run_booked(rows, hws):
    """The collective inventory: within 0.1 % of the recorded bytes per rank (the rest is
    routing metadata, FP8 scales and the counts exchange, which the model leaves out)."""
    for (_, cfg), measured in zip(rows, ABLATION["results"]["loopback"], strict=True):
        lay = trainer_layout(cfg)
        pred = predict(cfg, hws["loopback"], lay)
        assert step_bytes(cfg, lay, pred) == pytest.approx(measured["bytes_per_rank"], rel=1e-3)


def test_the_model_orders_the_rows_as_physics_says(rows, hws):
    loop, fab = hws["loopback"], hws["fabric"]

    def pred(i, hw):
        cfg = rows[i][1]
        return predict(cfg, hw, trainer_layout(cfg))

    tp, sp = rows[0][1], rows[1][1]
    assert step_bytes(sp, trainer_layout(sp), pred(1, loop)) < 0.6 * step_bytes(
        tp, trainer_layout(tp), pred(0, loop)
    )
    for hw in (loop, fab):
        assert pred(1, hw).seconds_per_iteration < pred(0, hw).seconds_per_iteration
    assert pred(0, fab).seconds_per_iteration > pred(0, loop).seconds_per_iteration
    assert pred(1, fab).seconds_per_iteration > pred(1, loop).seconds_per_iteration
    # SP + EP gains more where bytes cost more.
    gain = [
        pred(0, hw).seconds_per_iteration / pred(1, hw).seconds_per_iteration for hw in hws.values()
    ]
    assert gain[1] > gain[0]
    # Overlap hides wire time on the fabric; on loopback the cores are the wire.
    assert pred(2, fab).exposed_comm_s < pred(1, fab).exposed_comm_s
    assert pred(2, loop).exposed_comm_s == pytest.approx(pred(1, loop).exposed_comm_s)
    # bf16_a2a at dp = 1: the node's reduce-scatter stays FP32, nothing changes.
    assert pred(4, loop).seconds_per_iteration == pytest.approx(pred(3, loop).seconds_per_iteration)

    # FP8: fewer bytes (worth it where bytes cost time), but the codec runs on the cores.
    def layer_bytes(i):
        cost = pred(i, loop).layer
        return sum(c.bytes for c in cost.fwd_comm + cost.bwd_comm)

    assert layer_bytes(5) < layer_bytes(4)
    assert pred(5, fab).layer.comm < pred(4, fab).layer.comm
    assert pred(5, loop).compute_s > pred(4, loop).compute_s


def test_the_trainers_fp8_covers_dispatch_and_combine_the_ideal_every_collective(rows, hws):
    cfg = rows[5][1]
    lay = trainer_layout(cfg)
    trainer = layer_cost(cfg.model, lay, hws["loopback"], "fp32")
    assert {c.name for c in trainer.fwd_comm + trainer.bwd_comm if c.fp8} == {
        "ep_dispatch",
        "ep_combine",
    }
    ideal = layer_cost(cfg.model, replace(lay, implementation="ideal"), hws["loopback"], "fp32")
    assert all(c.fp8 for c in ideal.fwd_comm + ideal.bwd_comm)
    # On GPUs the codec is fused into the communication: no compute added.
    h800 = GPUS["H800"]
    with_fp8 = layer_cost(cfg.model, lay, h800, "bf16")
    without = layer_cost(cfg.model, replace(lay, fp8=False), h800, "bf16")
    assert with_fp8.compute == without.compute


def test_calibrate_builds_the_table_and_json_from_the_committed_ablation():
    result = calibrate(ABLATION, PROBES)
    assert len(result["rows"]) == 2 * len(LADDER)
    assert {r["network"] for r in result["rows"]} == {"loopback", "fabric"}
    for r in result["rows"]:
        assert r["predicted_step_s"] > 0
        assert r["error_pct"] == pytest.approx(
            100 * (r["predicted_step_s"] / r["measured_step_s"] - 1)
        )
    for key in ("summary", "summary_framework"):
        summary = result[key]["all"]
        assert summary["rows"] == 12
        assert summary["max_abs_error_pct"] >= summary["mean_abs_error_pct"] >= 0
    # The framework efficiency comes from the 1-rank step, not from the rows.
    one = result["one_rank"]
    assert one["framework"] == pytest.approx(one["model_step_s"] / 1.8)
    for r in result["rows"]:
        assert r["predicted_step_framework_s"] > r["predicted_step_s"]  # framework < 1 here
    text = table(result)
    lines = text.splitlines()
    assert sum(line.startswith("| ") for line in lines) == 1 + 2 * len(LADDER)  # header + rows
    assert "mean |error|" in text
    json.loads(json.dumps(result))  # what --json writes


def test_calibrate_refuses_rows_that_are_not_the_ladder():
    broken = json.loads(json.dumps(ABLATION))
    broken["results"]["loopback"][0]["row"] = "something else"
    with pytest.raises(ValueError, match="LADDER"):
        calibrate(broken, PROBES)


def test_model_list_is_the_benchmarks():
    assert ABLATION["model"] == MODEL


# ---------------------------------------------------------------- the probes (bench/probes.py)


@pytest.mark.timeout(60)
def test_loopback_probe_measures_a_bandwidth_and_a_latency():
    bandwidth, latency = probes.probe_loopback(megabytes=4, repeats=2)
    assert bandwidth > 1e7  # well above 10 MB/s on any machine
    assert 0 < latency < 1.0


def test_gloo_rates_take_the_slowest_rank_less_one_latency():
    per_rank = [
        {
            "booked_bytes": 3e6,
            "latency": 1e-3,
            "all_to_all": 4e-3,
            "all_gather": 3e-3,
            "reduce_scatter": 6e-3,
        },
        {
            "booked_bytes": 3e6,
            "latency": 2e-3,
            "all_to_all": 5e-3,
            "all_gather": 8e-3,
            "reduce_scatter": 5e-3,
        },
        {
            "booked_bytes": 3e6,
            "latency": 1e-3,
            "all_to_all": 2e-3,
            "all_gather": 3e-3,
            "reduce_scatter": 4e-3,
        },
    ]
    rates = probes.gloo_rates(per_rank)
    assert rates == GlooRates(3, 3e6 / 3e-3, 3e6 / 6e-3, 3e6 / 4e-3, 2e-3)


@pytest.mark.timeout(60)
def test_a_gloo_probe_rank_runs_every_collective_without_private_helpers():
    """One rank of probe_gloo on a 1-rank group in this process (the spawned probe takes
    seconds): every kind timed through public torch.distributed calls."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        timings = probes._gloo_worker(0, 1, megabytes=0.01, repeats=2, rounds=1)
    finally:
        dist.destroy_process_group()
    assert timings["booked_bytes"] == 0  # nothing leaves a lone rank
    for kind in ("latency", "all_to_all", "all_gather", "reduce_scatter"):
        assert 0 < timings[kind] < 10, kind
    source = Path(probes.__file__).read_text()
    assert "_ALL_GATHER" not in source and "_REDUCE_SCATTER" not in source


def test_probes_main_records_what_plan_gpu_cpu_reads(tmp_path, monkeypatch, capsys):
    """bench/probes.py writes the record trainer.plan.hardware reads (probes stubbed: no timing)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(probes, "probe_cpu_rates", lambda: RATES)
    monkeypatch.setattr(probes, "probe_loopback", lambda: (1.5e9, 4e-4))
    monkeypatch.setattr("sys.argv", ["probes.py"])
    probes.main()
    assert "recorded in" in capsys.readouterr().out
    assert hardware_profile("cpu") == cpu_profile(RATES, 1.5e9, 4e-4)


def test_the_planner_measures_nothing():
    """trainer/plan holds the physical model only: it imports no probe, launcher or bench."""
    banned = ("bench", "threading", "time", "subprocess", "multiprocessing", "torch.distributed")
    banned += ("trainer.launch", "trainer.parallel.launch", "trainer.parallel.spawn")
    banned += ("trainer.parallel.comm",)
    for path in (ROOT / "trainer" / "plan").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert not name.startswith(banned), (path.name, name)
