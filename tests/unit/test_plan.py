"""The performance model against the paper's numbers (MegaScale-MoE (arXiv 2505.11432), evaluation)
and its own physics."""

from dataclasses import replace
from pathlib import Path

import pytest

from trainer import config
from trainer.errors import ConfigError
from trainer.parallel import volumes
from trainer.plan import GPUS, ablation_ladder, megamoe, megatron, predict
from trainer.plan.command import check_cluster, compare
from trainer.plan.hardware import hardware_profile
from trainer.plan.layer import layer_cost
from trainer.plan.memory import activation_elements_per_layer

ROOT = Path(__file__).resolve().parents[2]
H800 = GPUS["H800"]
BATCH = 720

# GPUs: Megatron-LM tokens/s, MegaScale-MoE tokens/s, speed-up
# (MegaScale-MoE (arXiv 2505.11432), evaluation).
PAPER = {
    240: (151.1e3, 272.9e3, 1.81),
    480: (301.1e3, 498.6e3, 1.65),
    720: (430.5e3, 740.1e3, 1.72),
    960: (550.2e3, 963.8e3, 1.77),
    1440: (746.6e3, 1407.7e3, 1.88),
}
PAPER_MFU = {240: 0.3248, 1440: 0.2789}
PAPER_LADDER = (1.00, 1.13, 1.22, 1.28)


def load(name):
    return config.load(ROOT / "configs" / name)


@pytest.fixture(scope="module")
def cfg352():
    return load("internal-352b.toml")


@pytest.fixture(scope="module")
def table(cfg352):
    return {gpus: compare(cfg352, H800, gpus, BATCH) for gpus in PAPER}


@pytest.mark.parametrize("gpus", PAPER)
def test_layout_is_the_papers(table, gpus):
    for pred in table[gpus].values():
        lay = pred.layout
        assert (lay.n, lay.pp, lay.dp) == (8, 15, gpus // 120)
        assert pred.micro_batches == BATCH // lay.dp  # one 8192-token sequence per micro-batch


@pytest.mark.parametrize("gpus", PAPER)
def test_throughput_of_both_systems_within_10_percent_of_the_paper(table, gpus):
    megatron_tps, megamoe_tps, _ = PAPER[gpus]
    got = table[gpus]
    assert got["megamoe"].tokens_per_s == pytest.approx(megamoe_tps, rel=0.10)
    assert got["megatron"].tokens_per_s == pytest.approx(megatron_tps, rel=0.10)
    tokens = BATCH * 8192
    for pred in got.values():
        assert pred.seconds_per_iteration == pytest.approx(tokens / pred.tokens_per_s)


@pytest.mark.parametrize("gpus", PAPER)
def test_speedup_within_0_15_of_the_paper(table, gpus):
    speedup = table[gpus]["megamoe"].tokens_per_s / table[gpus]["megatron"].tokens_per_s
    assert speedup == pytest.approx(PAPER[gpus][2], abs=0.15)


@pytest.mark.parametrize("gpus", PAPER_MFU)
def test_megamoe_mfu_within_2_points_of_the_paper(table, gpus):
    assert table[gpus]["megamoe"].mfu == pytest.approx(PAPER_MFU[gpus], abs=0.02)


def test_ablation_ladder_at_240_gpus_within_0_05(cfg352):
    ladder = ablation_ladder(cfg352, H800, megamoe(cfg352, 240, BATCH), BATCH)
    got = [relative for _, _, relative in ladder]
    assert got == pytest.approx(PAPER_LADDER, abs=0.05)
    assert got == sorted(got)  # every rung helps
    # The last rung is the method itself.
    assert ladder[-1][1].tokens_per_s == pytest.approx(
        compare(cfg352, H800, 240, BATCH)["megamoe"].tokens_per_s
    )


def test_mfu_falls_with_gpus_at_fixed_batch_because_bubbles_grow(table):
    mfus = [table[g]["megamoe"].mfu for g in PAPER]
    assert mfus == sorted(mfus, reverse=True)
    for both in table.values():
        pred = both["megamoe"]
        P, M = pred.layout.pp, pred.micro_batches
        pipeline = pred.seconds_per_iteration - pred.dp_sync_s - pred.optimizer_s
        assert pred.bubble_s / pipeline == pytest.approx((P - 1) / (M + P - 1))


def test_iteration_time_is_the_sum_of_its_terms(table):
    for both in table.values():
        for pred in both.values():
            assert sum(pred.terms().values()) == pytest.approx(pred.seconds_per_iteration)


def test_megamoe_exposes_less_communication_than_the_baseline(table):
    for both in table.values():
        assert both["megamoe"].exposed_comm_s < 0.25 * both["megatron"].exposed_comm_s


def test_forward_collectives_move_the_closed_form_volumes(cfg352):
    m = cfg352.model
    lay = megamoe(cfg352, 240, BATCH)
    cost = layer_cost(m, lay, H800, "bf16")
    b, s, h, n = lay.micro_batch, m.seq_len, m.hidden, lay.n
    expected = volumes.sp_attention(b, s, h, n, m.gqa_ratio) + volumes.ep_a2a(b, s, h, n, m.topk)
    assert sum(c.bytes for c in cost.fwd_comm) == pytest.approx(2 * expected)  # bf16
    fp8 = layer_cost(m, replace(lay, fp8=True), H800, "bf16")
    assert sum(c.bytes for c in fp8.fwd_comm) == pytest.approx(expected)
    tp = layer_cost(m, replace(lay, attention="tp", ffn="tp"), H800, "bf16")
    tp_expected = volumes.tp_attention(b, s, h, n) + volumes.ep_agrs(b, s, h, n)
    assert sum(c.bytes for c in tp.fwd_comm) == pytest.approx(2 * tp_expected)


def test_tp_split_experts_compute_slower_than_whole_experts(cfg352):
    lay = megamoe(cfg352, 240, BATCH)
    whole = layer_cost(cfg352.model, lay, H800, "bf16")
    split = layer_cost(cfg352.model, replace(lay, ffn="tp"), H800, "bf16")
    assert split.compute > 1.02 * whole.compute


def test_overlap_hides_ep_traffic_only_when_the_gemm_outlasts_it(cfg352):
    """The paper's criterion R = 1.5 h_ffn bw / peak: ~8.8 over H800 NVLink, ~1.1 over a NIC."""
    m = cfg352.model
    lay = megamoe(cfg352, 240, BATCH)

    def dispatch_exposed(hw):
        cost = layer_cost(m, lay, hw, "bf16")
        dispatch = next(c for c in cost.fwd_comm if c.name == "ep_dispatch")
        return dispatch, cost

    fast, _ = dispatch_exposed(H800)
    assert fast.seconds < fast.partner  # R > 1: the dispatch is shorter than FC1/FC3
    slow_link = replace(H800, nvlink_bw=H800.nvlink_bw / 40)
    slow, cost = dispatch_exposed(slow_link)
    assert slow.seconds > slow.partner  # the link is too slow: overlap cannot hide it all
    assert cost.exposed_fwd > slow.seconds - slow.partner


def test_sar_keeps_the_papers_activation_formula(cfg352):
    m = cfg352.model
    lay = megamoe(cfg352, 240, BATCH)
    b, s, h, n = lay.micro_batch, m.seq_len, m.hidden, lay.n
    f = m.ffn_hidden / h
    shared = 2 * f * b * s * h / n  # FC1 and FC3 outputs of the one shared expert
    sar = volumes.sar_retained(b, s, h, n, m.gqa_ratio, m.topk, f) + shared
    assert activation_elements_per_layer(m, lay) == pytest.approx(sar)
    stored = activation_elements_per_layer(m, replace(lay, recompute="none"))
    assert stored > 2 * sar


def test_memory_fits_for_the_paper_layouts_and_not_for_one_gpu(table):
    for both in table.values():
        assert all(p.fits for p in both.values())
        assert both["megamoe"].memory.total < 80 * 2**30
    cfg = load("mixtral-8x22b.toml")
    one_node = predict(cfg, H800, megamoe(config.apply_overrides(cfg, ["parallel.pp=1"]), 8, 64))
    assert not one_node.fits  # 141B parameters do not fit on 8 GPUs


def test_optimizer_state_shrinks_with_dp(table):
    opt = [table[g]["megamoe"].memory.optimizer for g in (240, 480)]
    assert opt[1] == pytest.approx(opt[0] / 2, rel=0.01)


def test_bf16_gradient_sync_halves_the_dp_traffic(cfg352):
    lay = replace(megamoe(cfg352, 1440, BATCH), dp_overlap=False)
    fp32 = predict(cfg352, H800, replace(lay, grad_sync="fp32_rs"), BATCH)
    bf16 = predict(cfg352, H800, lay, BATCH)
    # reduce-scatter (4 -> 2 bytes) + parameter all-gather (2 bytes): 6 -> 4
    assert bf16.dp_sync_s == pytest.approx(fp32.dp_sync_s * 4 / 6, rel=0.02)


def test_faster_gpus_predict_more_tokens(cfg352):
    tps = {name: compare(cfg352, GPUS[name], 240, BATCH)["megamoe"].tokens_per_s for name in GPUS}
    assert tps["B200"] > tps["H200"] >= tps["H100"] > tps["H800"] > tps["A100"] > tps["H20"]


def test_more_gpus_more_tokens_for_both_systems(table):
    for system in ("megamoe", "megatron"):
        tps = [table[g][system].tokens_per_s for g in PAPER]
        assert tps == sorted(tps)


def test_bad_cluster_and_layout_errors_name_the_values(cfg352):
    with pytest.raises(ConfigError, match="V100"):
        hardware_profile("V100")
    with pytest.raises(ConfigError, match=r"--gpus 100 .*8 GPUs per H800 node"):
        check_cluster(H800, 100)
    with pytest.raises(ConfigError, match=r"--gpus 64 .* 8 \* 15 = 120"):
        megatron(cfg352, 64, BATCH)
    with pytest.raises(ConfigError, match=r"global batch 720 .* dp = 7"):
        megamoe(config.apply_overrides(cfg352, ["parallel.pp=1"]), 56, BATCH)
