"""The training step: schedule, clipping, non-finite skip, bf16 autocast."""

import itertools
import math

import pytest
import torch

from trainer.config import Config, TrainConfig, apply_overrides
from trainer.train import build_model, build_optimizer, lr_at, train_step

pytestmark = pytest.mark.timeout(120)

CFG = apply_overrides(
    Config(),
    ["model.vocab_size=64", "model.hidden=32", "model.seq_len=16", "model.ffn_hidden=32"],
)


def batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g))
        for _ in range(n)
    ]


def test_lr_warms_up_linearly_then_decays_to_min():
    t = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(1, t) == pytest.approx(0.1)
    assert lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(55, t) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, t) == pytest.approx(0.1)
    lrs = [lr_at(s, t) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_step_changes_parameters_and_reports_loss():
    model = build_model(CFG, torch.device("cpu"))
    opt = build_optimizer(model, CFG.train)
    before = model.head.weight.detach().clone()
    result = train_step(model, opt, batches(), CFG)
    assert not result.skipped
    assert math.log(64) - 1 < result.loss < math.log(64) + 1
    assert not torch.equal(before, model.head.weight)


class RecordGrads(torch.optim.Optimizer):
    """An optimizer whose step records the gradients it is handed and changes nothing.

    Comparing weights after one AdamW step would hide a wrong micro-batch scale: the
    first AdamW update is about lr * sign(g), blind to the gradient's magnitude.
    """

    def __init__(self, model: torch.nn.Module):
        self.names = {p: n for n, p in model.named_parameters()}
        super().__init__(model.parameters(), {"lr": 0.0})
        self.grads: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure=None):
        self.grads = {
            self.names[p]: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for group in self.param_groups
            for p in group["params"]
        }


def test_gradient_accumulation_equals_one_big_batch():
    big = batches(1)[0]
    halves = [(big[0][:1], big[1][:1]), (big[0][1:], big[1][1:])]
    # The balance loss is per micro-batch (so are its statistics) and does not accumulate
    # to the big batch's; switch it off so that every gradient must match. Dropless routing
    # (capacity_factor = 0, the default) keeps the expert assignments per token identical.
    cfg = apply_overrides(CFG, ["model.balance_coef=0.0", "train.grad_clip=0.0"])
    assert cfg.model.capacity_factor == 0
    results, grads = [], []
    for micro_batches in ([big], halves):
        model = build_model(cfg, torch.device("cpu"))
        opt = RecordGrads(model)
        results.append(train_step(model, opt, micro_batches, cfg))
        grads.append(opt.grads)
    assert results[1].loss == pytest.approx(results[0].loss, rel=1e-5)
    assert results[1].grad_norm == pytest.approx(results[0].grad_norm, rel=1e-4)
    assert grads[0].keys() == grads[1].keys()
    assert grads[0]["head.weight"].abs().max() > 0
    for name, g in grads[0].items():
        torch.testing.assert_close(
            grads[1][name], g, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_non_finite_gradient_skips_the_step():
    model = build_model(CFG, torch.device("cpu"))
    opt = build_optimizer(model, CFG.train)
    with torch.no_grad():
        model.head.weight[0, 0] = float("inf")
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_step(model, opt, batches(), CFG)
    assert result.skipped
    assert opt.state == {} or all(len(s) == 0 for s in opt.state.values())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, snapshot[name], equal_nan=True)


def test_bf16_autocast_loss_is_close_to_fp32():
    bf16 = apply_overrides(CFG, ["train.dtype=bf16"])
    losses = []
    for cfg in (CFG, bf16):
        model = build_model(cfg, torch.device("cpu"))
        losses.append(train_step(model, build_optimizer(model, cfg.train), batches(), cfg).loss)
    assert losses[1] == pytest.approx(losses[0], rel=0.02)
