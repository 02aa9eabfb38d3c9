"""The `config` prediction of `megamoe plan`: the config as written, every key moving the
prediction the way the model says, and the two presets untouched by it."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from service.cli import main
from trainer import config
from trainer.errors import ConfigError
from trainer.plan import GPUS, megamoe, predict
from trainer.plan.command import as_written, compare
from trainer.plan.layout import from_config
from trainer.plan.model import pp_send_seconds

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "internal-352b.toml"
H800 = GPUS["H800"]
BATCH = 720


@pytest.fixture(scope="module")
def cfg352():
    """Internal-352B at the paper's layout (n8 pp15 dp2), one sequence per micro-batch:
    everything as the megamoe preset sets it."""
    return config.load(CONFIG, ["train.micro_batch=1"])


def plan(cfg, *overrides, gpus=240, batch=BATCH):
    return as_written(config.apply_overrides(cfg, list(overrides)), H800, gpus, batch)


def test_a_config_set_as_the_megamoe_preset_predicts_the_preset(cfg352):
    assert from_config(cfg352, 240, BATCH) == megamoe(cfg352, 240, BATCH)
    mine, preset = plan(cfg352).to_dict(), compare(cfg352, H800, 240, BATCH)["megamoe"].to_dict()
    assert mine.pop("system") == "config" and preset.pop("system") == "megamoe"
    assert mine == preset


def test_the_presets_ignore_the_keys_they_fix(cfg352):
    changed = config.apply_overrides(
        cfg352,
        [
            "parallel.attention=tp",
            "parallel.ffn=tp",
            "comm.overlap=false",
            "comm.grad_sync=fp32_rs",
            "parallel.virtual_stages=2",
        ],
    )
    before, after = compare(cfg352, H800, 240, BATCH), compare(changed, H800, 240, BATCH)
    for system in ("megamoe", "megatron"):
        assert after[system].to_dict() == before[system].to_dict()
    assert plan(changed).seconds_per_iteration > 1.05 * plan(cfg352).seconds_per_iteration


def test_every_layout_key_reaches_the_config_layout(cfg352):
    lay = from_config(
        config.apply_overrides(
            cfg352,
            [
                "parallel.attention=tp",
                "parallel.ffn=ep_agrs",
                "comm.overlap=false",
                "comm.chunks=2",
                "comm.fp8=true",
                "comm.grad_sync=fp32_rs",
                "parallel.virtual_stages=4",
                "train.micro_batch=2",
            ],
        ),
        240,
        BATCH,
    )
    assert (lay.n, lay.pp, lay.dp, lay.virtual_stages, lay.micro_batch) == (8, 15, 2, 4, 2)
    assert (lay.attention, lay.ffn, lay.overlap, lay.chunks) == ("tp", "ep_agrs", False, 2)
    assert (lay.fp8, lay.grad_sync, lay.dp_overlap) == (True, "fp32_rs", False)


def test_ffn_auto_resolves_as_the_trainer_does(cfg352):
    assert from_config(cfg352, 240, BATCH).ffn == "ep_a2a"  # k = 3 < n = 8
    wide = config.apply_overrides(cfg352, ["model.topk=8"])
    assert from_config(wide, 240, BATCH).ffn == "ep_agrs"


def test_overlap_on_shortens_the_step_and_hides_the_dp_sync(cfg352):
    on, off = plan(cfg352), plan(cfg352, "comm.overlap=false")
    assert on.seconds_per_iteration < off.seconds_per_iteration
    assert on.layer.exposed_bwd < off.layer.exposed_bwd
    assert on.dp_sync_s < off.dp_sync_s


def test_fp8_halves_the_layer_traffic_and_its_time(cfg352):
    bf16, fp8 = plan(cfg352), plan(cfg352, "comm.fp8=true")
    # The metadata collectives (counts, router statistics) carry no bytes; the rest halve.
    assert sum(c.bytes for c in fp8.layer.fwd_comm) == pytest.approx(
        sum(c.bytes for c in bf16.layer.fwd_comm) / 2
    )
    assert fp8.layer.comm < bf16.layer.comm
    assert fp8.exposed_comm_s < bf16.exposed_comm_s
    assert fp8.seconds_per_iteration < bf16.seconds_per_iteration


def test_bf16_all_to_all_gradient_sync_shortens_the_dp_sync(cfg352):
    bf16, fp32 = plan(cfg352), plan(cfg352, "comm.grad_sync=fp32_rs")
    assert bf16.dp_sync_s < fp32.dp_sync_s
    assert bf16.seconds_per_iteration < fp32.seconds_per_iteration


def test_sp_attention_beats_tp_attention(cfg352):
    sp, tp = plan(cfg352), plan(cfg352, "parallel.attention=tp")
    assert sp.layer.comm < tp.layer.comm
    assert sp.seconds_per_iteration < tp.seconds_per_iteration


def test_ffn_modes_rank_all_to_all_then_gather_scatter_then_tp(cfg352):
    a2a, agrs, tp = (plan(cfg352, f"parallel.ffn={m}") for m in ("ep_a2a", "ep_agrs", "tp"))
    # All-to-all moves 2k/n of all-gather + reduce-scatter's bytes (k = 3, n = 8).
    assert a2a.layer.comm < agrs.layer.comm == pytest.approx(tp.layer.comm)
    assert agrs.compute_s < tp.compute_s  # TP slivers of every expert fill fewer tiles
    assert a2a.tokens_per_s > agrs.tokens_per_s > tp.tokens_per_s


def test_more_chunks_expose_less_communication(cfg352):
    exposed = [plan(cfg352, f"comm.chunks={c}").exposed_comm_s for c in (1, 2, 4, 8)]
    assert exposed == sorted(exposed, reverse=True)
    assert exposed[-1] < 0.5 * exposed[0]


def test_a_smaller_n_group_holds_more_experts_per_gpu(cfg352):
    # dp as written would no longer fill 240 GPUs: dp = 1 lets the planner fill it.
    n8 = plan(cfg352, "parallel.dp=1")
    n4 = plan(cfg352, "parallel.n=4", "parallel.dp=1")
    assert (n4.layout.n, n4.layout.dp) == (4, 4)
    assert n4.memory.weights > 1.5 * n8.memory.weights  # twice the experts, same attention
    assert n4.micro_batches == n8.micro_batches // 2


def test_more_pipeline_stages_more_bubble(cfg352):
    pp5, pp15 = plan(cfg352, "parallel.pp=5", gpus=80), plan(cfg352)
    for pred, P in ((pp5, 5), (pp15, 15)):
        M = pred.micro_batches
        pipeline = pred.seconds_per_iteration - pred.dp_sync_s - pred.optimizer_s
        assert pred.bubble_s / pipeline == pytest.approx((P - 1) / (M + P - 1))
    assert pp15.bubble_fraction > 3 * pp5.bubble_fraction


def test_dp_as_written_scales_out(cfg352):
    dp2, dp4 = plan(cfg352), plan(cfg352, "parallel.dp=4", gpus=480)
    assert (dp2.layout.dp, dp4.layout.dp) == (2, 4)
    assert dp4.memory.optimizer == pytest.approx(dp2.memory.optimizer / 2, rel=0.01)
    assert dp4.tokens_per_s > 1.5 * dp2.tokens_per_s


def test_virtual_stages_shrink_the_bubble_v_fold(cfg352):
    v1, v2 = plan(cfg352), plan(cfg352, "parallel.virtual_stages=2")
    P, M = 15, v1.micro_batches
    assert v2.bubble_s == pytest.approx(v1.bubble_s / 2)
    pipeline = v2.seconds_per_iteration - v2.dp_sync_s - v2.optimizer_s
    assert v2.bubble_s / pipeline == pytest.approx((P - 1) / (2 * M + P - 1))
    assert v2.seconds_per_iteration < v1.seconds_per_iteration


def test_virtual_stages_hold_more_warm_up_activations(cfg352):
    """Interleaved warm-up: the first stage holds P + (P - 1)/v micro-batches, not P."""
    v1, v2 = plan(cfg352), plan(cfg352, "parallel.virtual_stages=2")
    P = 15
    assert v2.memory.activations == pytest.approx(v1.memory.activations * (P + (P - 1) / 2) / P)


def test_virtual_stages_send_v_times_as_often(cfg352):
    """Each chunk receives and sends: 2v point-to-point sends per micro-batch and rank,
    on the critical path when sends are synchronous."""
    lay = replace(from_config(cfg352, 240, BATCH), pp_async=False)
    v1, v3 = (predict(cfg352, H800, replace(lay, virtual_stages=v), BATCH) for v in (1, 3))
    send = pp_send_seconds(cfg352.model, lay, H800, "bf16")
    assert send > 0
    assert v3.exposed_comm_s - v1.exposed_comm_s == pytest.approx(v1.micro_batches * 2 * 2 * send)


def test_a_bigger_micro_batch_has_fewer_micro_batches_and_more_activations(cfg352):
    b1, b2 = plan(cfg352), plan(cfg352, "train.micro_batch=2")
    assert b2.micro_batches == b1.micro_batches // 2
    assert b2.bubble_fraction > b1.bubble_fraction
    assert b2.memory.activations == pytest.approx(2 * b1.memory.activations)


def test_micro_batch_zero_is_one_data_parallel_share():
    cfg = config.load(CONFIG, ["train.micro_batch=0"])
    lay = from_config(cfg, 240, BATCH)
    assert lay.micro_batch == cfg.micro_batch_size == BATCH // 2
    assert not as_written(cfg, H800, 240, BATCH).fits


def test_dp_is_taken_as_written_or_fills_the_cluster(cfg352):
    assert from_config(cfg352, 240, BATCH).dp == 2  # 8 * 15 * 2 = 240 as written
    assert from_config(cfg352, 480, BATCH).dp == 4
    with pytest.raises(ConfigError, match=r"--gpus 300 is not divisible by .* = 120"):
        from_config(cfg352, 300, BATCH)


def test_cli_table_says_when_it_fills_dp(capsys):
    assert main(["plan", "--config", str(CONFIG), "--gpus", "480"]) == 0
    out = capsys.readouterr().out
    assert "parallel.dp = 2 makes 240 GPUs; on 480 the config column runs dp = 4" in out


def test_bad_virtual_stages_for_the_planned_batch_name_the_numbers(cfg352):
    cfg = config.apply_overrides(cfg352, ["parallel.virtual_stages=2"])
    from_config(cfg, 240, BATCH)  # 360 micro-batches: 24 rounds of 15
    with pytest.raises(ConfigError, match=r"730 / \(2 \* 1\) = 365, .* parallel\.pp = 15"):
        from_config(cfg, 240, 730)


def test_cli_json_has_the_config_beside_both_systems(capsys):
    assert main(["plan", "--config", str(CONFIG), "--gpus", "240", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["megamoe", "megatron", "config"]
    assert out["config"]["system"] == "config"
    assert out["config"]["layout"]["micro_batch"] == 1  # the config's train.micro_batch
    assert out["config"]["layout"]["virtual_stages"] == 1


def test_cli_table_has_a_third_column(capsys):
    argv = ["plan", "--config", str(CONFIG), "--gpus", "240", "--set", "train.micro_batch=1"]
    assert main([*argv, "--set", "parallel.virtual_stages=2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == ["megamoe", "megatron", "config"]
    layout = next(line for line in lines if line.startswith("layout"))
    assert layout.split()[-5:] == ["n8", "pp15", "v2", "dp2", "b1"]
    bubble = next(line for line in lines if line.startswith("pipeline bubble"))
    assert bubble.count("%") == 3
    assert "config as written:" in lines[-1]
