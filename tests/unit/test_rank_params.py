"""One rank of the 352B configuration, built on the meta device (no memory): the
parameters it holds are exactly what the planner counts per GPU for that layout and stage,
so the planner's memory and communication model and the trainer share one rule."""

from pathlib import Path

import pytest
import torch

from trainer.config import load
from trainer.model.transformer import MoETransformer
from trainer.parallel.comm import Comm
from trainer.parallel.model import ParallelMoE
from trainer.plan.layout import trainer_layout
from trainer.plan.memory import stage_params

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "internal-352b.toml"


def _rank_params(cfg, rank: int, stage: int) -> tuple[int, int]:
    """(sharded, replicated) parameter counts of one rank's ParallelMoE, on meta."""
    with torch.device("meta"):
        reference = MoETransformer(cfg.model, groups=cfg.parallel.n)
        model = ParallelMoE(
            cfg, Comm(None, rank, cfg.parallel.n), rank, reference, stage, cfg.parallel.pp
        )
    sharded = replicated = 0
    for p in model.parameters():
        assert p.device.type == "meta"
        if p.megamoe_replicated:
            replicated += p.numel()
        else:
            sharded += p.numel()
    return sharded, replicated


@pytest.mark.parametrize("stage", [0, 7, 14])  # embedding stage, a middle one, LM head stage
@pytest.mark.parametrize("ffn", ["ep_a2a", "tp"])
def test_a_352b_rank_holds_exactly_the_planners_parameters(stage, ffn):
    cfg = load(CONFIG, [f"parallel.ffn={ffn}"])
    assert (cfg.parallel.n, cfg.parallel.pp, cfg.parallel.dp) == (8, 15, 2)
    sharded, replicated = _rank_params(cfg, rank=3, stage=stage)
    planned = stage_params(cfg.model, trainer_layout(cfg), stage)
    assert (sharded, replicated) == (planned.sharded, planned.replicated)
    assert sharded + replicated == planned.held


LAYOUTS = {
    "sp attention, ep experts, shared expert": (
        ["parallel.n=4", "parallel.attention=sp", "parallel.ffn=ep_a2a", "model.shared_experts=1"],
        2,
        0,
    ),
    "tp attention, tp experts": (
        ["parallel.n=2", "parallel.attention=tp", "parallel.ffn=tp"],
        1,
        0,
    ),
    "last of two pipeline stages": (["parallel.n=2", "parallel.pp=2", "model.layers=4"], 1, 1),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_rank_built_alone_equals_its_share_of_the_whole_reference(layout):
    """build_parallel_model draws only the rank's share (on meta first, then each local
    tensor alone) and gets exactly the values cut from the whole reference model."""
    from trainer.config import loads
    from trainer.parallel.model import build_parallel_model

    sets, rank, stage = LAYOUTS[layout]
    cfg = loads((CONFIG.parent / "tiny.toml").read_text(), sets)
    comm = Comm(None, rank, cfg.parallel.n)
    alone = build_parallel_model(cfg, comm, rank, torch.device("cpu"), stage=stage)
    torch.manual_seed(cfg.train.seed)
    whole = MoETransformer(cfg.model, groups=cfg.parallel.n)
    cut = ParallelMoE(cfg, comm, rank, whole, stage, cfg.parallel.pp)
    mine, theirs = dict(alone.named_parameters()), dict(cut.named_parameters())
    assert mine.keys() == theirs.keys()
    for name, p in mine.items():
        assert p.device.type == "cpu" and not p.is_meta
        assert torch.equal(p, theirs[name]), name
        assert p.megamoe_replicated == theirs[name].megamoe_replicated


def test_building_a_rank_costs_about_its_share_not_the_model():
    """Peak resident memory of building rank 0 (fresh process, bench/rank_memory.py): near
    the share's own size, far below the whole model's, which the old way built first."""
    from bench.rank_memory import measure

    sets = [
        *("model.hidden=512", "model.ffn_hidden=2048", "model.experts=16", "model.layers=4"),
        *("model.vocab_size=8000", "model.heads=8", "model.kv_heads=2"),
        *("parallel.n=4", "parallel.pp=2", "train.micro_batch=2", "train.global_batch=2"),
    ]
    alone = measure("alone", sets)
    share = alone["share_bytes"]
    whole_model = 4 * (4 * (16 * 3 * 512 * 2048 + 4 * 512 * 512) + 2 * 8000 * 512)  # fp32 bytes
    assert share < whole_model / 3
    assert alone["peak_bytes"] < 2 * share + 64 * 2**20, (alone, share)
