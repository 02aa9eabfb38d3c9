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
