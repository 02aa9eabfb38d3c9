"""Layout search: every layout it returns is one the trainer accepts and that fits in memory."""

import itertools
from dataclasses import replace
from pathlib import Path

import pytest

from trainer import config
from trainer.errors import ConfigError
from trainer.parallel.dims import check_layout
from trainer.plan import GPUS
from trainer.plan.search import explain, search

ROOT = Path(__file__).resolve().parents[2]


def load(name, *overrides):
    return config.load(ROOT / "configs" / name, list(overrides))


@pytest.fixture(scope="module")
def mixtral_64_h100():
    return search(load("mixtral-8x7b.toml"), GPUS["H100"], 64, 512)


def test_mixtral_on_64_h100_picks_a_layout_the_trainer_accepts(mixtral_64_h100):
    cfg = load("mixtral-8x7b.toml")
    best = mixtral_64_h100.best
    applied = config.apply_overrides(cfg, best.layout.overrides(512))
    check_layout(applied, nproc=64)  # raises ConfigError if the trainer would refuse it
    assert applied.parallel.world == 64
    assert best.fits and best.memory.total <= 80 * 2**30
    assert best.layout.attention == "sp" and best.layout.ffn.startswith("ep")


def test_ranking_is_by_throughput_and_every_candidate_fits(mixtral_64_h100):
    ranked = mixtral_64_h100.ranked
    assert len(ranked) > 3
    for better, worse in itertools.pairwise(ranked):
        assert better.tokens_per_s >= worse.tokens_per_s * 0.997  # ties go to simpler layouts
        assert worse.fits
    assert mixtral_64_h100.rejected_memory > 0  # e.g. no model parallelism at all


def test_explanation_names_the_deciding_term(mixtral_64_h100):
    text = explain(mixtral_64_h100)
    assert "beats the next different layout" in text
    assert any(term in text for term in mixtral_64_h100.best.terms())


def test_layouts_the_trainer_refuses_are_filtered_out():
    # With 2 kv heads, attention cannot shard over n = 4 ranks.
    cfg = load("tiny.toml", "model.kv_heads=2")
    four_per_node = replace(GPUS["H800"], gpus_per_node=4)
    result = search(cfg, four_per_node, 4, 16)
    assert result.rejected_layout > 0
    assert "kv_heads" in result.examples["layout"]
    assert all(p.layout.n in (1, 2) for p in result.ranked)


def test_no_layout_fits_is_an_error_naming_the_cluster():
    with pytest.raises(ConfigError, match="no layout of 8 x A100"):
        search(load("mixtral-8x22b.toml"), GPUS["A100"], 8, 64)
