"""The `megamoe` command as a user runs it: prepare the demo corpus, train, bad input."""

import json

import pytest

from tests.e2e.conftest import megamoe, one_line_error


@pytest.mark.timeout(300)
def test_tiny_config_trains_and_loss_falls_below_60_percent(demo_data, tmp_path):
    summary_path = tmp_path / "summary.json"
    res = megamoe(
        "train",
        "--config",
        "configs/tiny.toml",
        "--set",
        f"data.path={demo_data}",
        "--summary-json",
        str(summary_path),
    )
    assert res.returncode == 0, res.stderr
    assert "step 200/200" in res.stdout and "MFU" in res.stdout
    s = json.loads(summary_path.read_text())
    for key in (
        "steps",
        "tokens",
        "losses",
        "final_loss",
        "tokens_per_s",
        "mfu",
        "step_time_s",
        "peak_memory_bytes",
        "layout",
        "comm",
    ):
        assert key in s, key
    assert s["steps"] == 200 and len(s["losses"]) == 200
    assert s["tokens"] == 200 * 16 * 128
    assert s["final_loss"] < 0.6 * s["losses"][0]
    assert 0 < s["mfu"] < 1.5 and s["tokens_per_s"] > 0
    assert s["peak_memory_bytes"] > 0
    assert s["layout"]["n"] == 1 and s["layout"]["mode"] == "reference"


@pytest.mark.timeout(120)
def test_reference_with_router_groups_and_dropping(demo_data, tmp_path):
    summary_path = tmp_path / "summary.json"
    res = megamoe(
        "train",
        "--config",
        "configs/tiny.toml",
        "--set",
        f"data.path={demo_data}",
        "--set",
        "train.steps=3",
        "--set",
        "parallel.n=4",
        "--set",
        "model.capacity_factor=1.0",
        "--summary-json",
        str(summary_path),
    )
    assert res.returncode == 0, res.stderr
    s = json.loads(summary_path.read_text())
    assert s["layout"]["n"] == 4 and "reference of n=4" in res.stdout
    assert s["dropped_tokens"] > 0  # an untrained router is unbalanced: capacity 1.0 drops


TINY = ("train", "--config", "configs/tiny.toml")


@pytest.mark.timeout(60)
def test_malformed_toml(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nhidden = 3\n")
    assert "is not valid TOML" in one_line_error(megamoe("train", "--config", str(bad)))


@pytest.mark.timeout(60)
def test_unknown_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nstepz = 3\n")
    assert "unknown key train.stepz" in one_line_error(megamoe("train", "--config", str(bad)))


@pytest.mark.timeout(60)
def test_missing_data_directory(tmp_path):
    missing = tmp_path / "nowhere"
    line = one_line_error(
        megamoe("train", "--config", "configs/tiny.toml", "--set", f"data.path={missing}")
    )
    assert str(missing) in line and "megamoe data prepare" in line


@pytest.mark.timeout(60)
def test_bad_override_and_missing_input(tmp_path):
    line = one_line_error(
        megamoe("train", "--config", "configs/tiny.toml", "--set", "model.topk=9")
    )
    assert "model.topk = 9 must be <= model.experts = 8" in line
    line = one_line_error(
        megamoe(
            "data", "prepare", "--input", str(tmp_path / "none"), "--output", str(tmp_path / "o")
        )
    )
    assert "none" in line


@pytest.mark.timeout(60)
def test_vocab_too_small_for_data(demo_data):
    args = [*TINY, "--set", f"data.path={demo_data}", "--set", "model.vocab_size=200"]
    line = one_line_error(megamoe(*args))
    assert "model.vocab_size = 200" in line and "257" in line


@pytest.mark.timeout(60)
def test_config_show_prints_resolved_values():
    res = megamoe("config", "show", "--config", "configs/tiny.toml", "--set", "train.steps=5")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["train"]["steps"] == 5
