"""`megamoe plan` as a user runs it: both systems, the layout search, bad input."""

import json

import pytest

from tests.e2e.conftest import megamoe, one_line_error
from trainer import config
from trainer.parallel.dims import check_layout

FIELDS = (
    "tokens_per_s",
    "seconds_per_iteration",
    "mfu",
    "exposed_comm_s",
    "memory_per_gpu_bytes",
    "layout",
)


@pytest.mark.timeout(120)
def test_json_predicts_both_systems_for_the_papers_cluster():
    res = megamoe("plan", "--config", "configs/internal-352b.toml", "--gpus", "1440", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out) == {"megamoe", "megatron", "config"}  # the config as written: third
    for system in out.values():
        for key in FIELDS:
            assert key in system, key
        assert system["layout"]["dp"] == 12 and system["layout"]["pp"] == 15
        assert system["memory_per_gpu_bytes"] < 80 * 2**30
    assert out["megamoe"]["tokens_per_s"] == pytest.approx(1407.7e3, rel=0.10)
    assert out["megamoe"]["tokens_per_s"] > 1.6 * out["megatron"]["tokens_per_s"]


@pytest.mark.timeout(120)
def test_table_is_readable():
    res = megamoe("plan", "--config", "configs/internal-352b.toml", "--gpus", "240")
    assert res.returncode == 0, res.stderr
    for text in (
        "240 x H800",
        "megamoe",
        "megatron",
        "tokens / s",
        "MFU",
        "memory / GPU",
        "pipeline bubble",
        "speed-up megamoe / megatron",
    ):
        assert text in res.stdout, text


@pytest.mark.timeout(120)
def test_search_for_mixtral_on_64_h100_returns_a_layout_the_trainer_accepts():
    res = megamoe(
        "plan",
        "--search",
        "--config",
        "configs/mixtral-8x7b.toml",
        "--gpus",
        "64",
        "--gpu",
        "H100",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    overrides = out["search"]["overrides"]
    cfg = config.apply_overrides(config.load("configs/mixtral-8x7b.toml"), overrides)
    check_layout(cfg, nproc=64)
    assert cfg.parallel.world == 64
    assert out["megamoe"]["memory_per_gpu_bytes"] <= 80 * 2**30
    assert out["megamoe"]["tokens_per_s"] > out["megatron"]["tokens_per_s"]
    assert out["search"]["why"]

    text = megamoe(
        "plan", "--search", "--config", "configs/mixtral-8x7b.toml", "--gpus", "64", "--gpu", "H100"
    )
    assert text.returncode == 0, text.stderr
    assert "best:" in text.stdout and "why:" in text.stdout and "--set parallel.n=" in text.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--gpu", "V100", "--gpus", "240"), "unknown --gpu 'V100'"),
        (("--gpus", "100"), "--gpus 100 is not divisible by the 8 GPUs per H800 node"),
        (("--gpus", "64"), "--gpus 64 is not divisible by parallel.n * parallel.pp = 8 * 15 = 120"),
    ],
)
def test_bad_input_is_one_line_naming_the_value(args, message):
    res = megamoe("plan", "--config", "configs/internal-352b.toml", *args)
    assert message in one_line_error(res)


@pytest.mark.timeout(60)
def test_missing_config_file_is_one_line():
    res = megamoe("plan", "--config", "configs/nope.toml", "--gpus", "8")
    assert "configs/nope.toml does not exist" in one_line_error(res)
