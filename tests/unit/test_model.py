"""The reference model: grouped experts, gate placement, capacity, shared experts, training."""

import pytest
import torch
import torch.nn.functional as F

from trainer.config import ModelConfig
from trainer.model import MoETransformer, lm_loss
from trainer.model.experts import DenseSwiGLU, RoutedExperts
from trainer.model.layers import init_weights
from trainer.model.router import route

pytestmark = pytest.mark.timeout(120)

SMALL = ModelConfig(
    vocab_size=64,
    hidden=32,
    layers=2,
    heads=4,
    kv_heads=2,
    ffn_hidden=48,
    experts=8,
    topk=2,
    seq_len=16,
)


def make_experts(seed=0):
    torch.manual_seed(seed)
    experts = RoutedExperts(8, 32, 48)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return experts


def naive_moe(experts, x_TH, routing, gate_after_fc2=False):
    """Token by token, slot by slot: the definition the grouped version must equal."""
    out = torch.zeros_like(x_TH)
    for t in range(x_TH.shape[0]):
        for j in range(routing.expert_ids_Tk.shape[1]):
            if not routing.keep_Tk[t, j]:
                continue
            e, g = routing.expert_ids_Tk[t, j], routing.gates_Tk[t, j]
            h = F.silu(x_TH[t] @ experts.w1[e]) * (x_TH[t] @ experts.w3[e])
            out[t] += (h @ experts.w2[e]) * g if gate_after_fc2 else (h * g) @ experts.w2[e]
    return out


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0, 0.5])
def test_grouped_experts_equal_token_by_token(capacity_factor):
    experts = make_experts()
    x = torch.randn(40, 32)
    routing = route(torch.randn(40, 8), topk=2, groups=4, capacity_factor=capacity_factor)
    if capacity_factor == 0.5:
        assert routing.dropped > 0
    got = experts(x, routing.expert_ids_Tk, routing.gates_Tk, routing.keep_Tk)
    torch.testing.assert_close(got, naive_moe(experts, x, routing), rtol=1e-5, atol=1e-5)


def test_gate_before_fc2_equals_gate_after():
    experts = make_experts()
    x = torch.randn(24, 32)
    routing = route(torch.randn(24, 8), topk=2, groups=2)
    got = experts(x, routing.expert_ids_Tk, routing.gates_Tk, routing.keep_Tk)
    expected = naive_moe(experts, x, routing, gate_after_fc2=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_expert_with_no_tokens_is_fine():
    experts = make_experts()
    x = torch.randn(4, 32)
    logits = torch.full((4, 8), -10.0)
    logits[:, 3] = 10.0
    logits[:, 5] = 9.0
    routing = route(logits, topk=2, groups=1)
    got = experts(x, routing.expert_ids_Tk, routing.gates_Tk, routing.keep_Tk)
    torch.testing.assert_close(got, naive_moe(experts, x, routing), rtol=1e-5, atol=1e-5)


def test_large_capacity_equals_dropless():
    tokens = torch.randint(0, 64, (2, 16))
    torch.manual_seed(1)
    dropless = MoETransformer(SMALL, groups=4)
    torch.manual_seed(1)
    roomy = MoETransformer(ModelConfig(**{**SMALL.__dict__, "capacity_factor": 8.0}), groups=4)
    (a, sa), (b, sb) = dropless(tokens), roomy(tokens)
    torch.testing.assert_close(a, b)
    assert sa.dropped == sb.dropped == 0


def test_tight_capacity_drops_and_reports():
    torch.manual_seed(1)
    model = MoETransformer(ModelConfig(**{**SMALL.__dict__, "capacity_factor": 0.5}), groups=4)
    _, stats = model(torch.randint(0, 64, (2, 16)))
    # Each of 4 groups keeps ceil(0.5 * 32 * 2 / 4) = 8 of the 64 assignments per layer.
    assert stats.assignments == 2 * 32 * 2
    assert stats.dropped == stats.assignments - 2 * 4 * 8
    assert stats.expert_counts_LE.sum().item() == stats.assignments - stats.dropped


def test_router_groups_change_balance_loss_not_outputs_when_dropless():
    tokens = torch.randint(0, 64, (2, 16))
    torch.manual_seed(3)
    one = MoETransformer(SMALL, groups=1)
    torch.manual_seed(3)
    four = MoETransformer(SMALL, groups=4)
    (a, sa), (b, sb) = one(tokens), four(tokens)
    torch.testing.assert_close(a, b)
    assert sa.balance_loss.item() != pytest.approx(sb.balance_loss.item())


def test_shared_expert_is_added_densely():
    torch.manual_seed(0)
    shared = DenseSwiGLU(8, 12)
    init_weights(shared, ModelConfig())
    x = torch.randn(5, 8)
    expected = (F.silu(x @ shared.w1) * (x @ shared.w3)) @ shared.w2
    torch.testing.assert_close(shared(x), expected)
    cfg = ModelConfig(**{**SMALL.__dict__, "shared_experts": 1})
    model = MoETransformer(cfg)
    assert model.blocks[0].ffn.shared.w1.shape == (32, 48)


def test_embedding_and_head_are_untied_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = MoETransformer(SMALL, groups=2)
    assert model.embed.weight.data_ptr() != model.head.weight.data_ptr()
    tokens = torch.randint(0, 64, (4, 16))
    logits, stats = model(tokens)
    (lm_loss(logits, tokens) + stats.balance_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = MoETransformer(SMALL, groups=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 64, (4, 17))
    losses = []
    for _ in range(40):
        logits, stats = model(tokens[:, :-1])
        loss = lm_loss(logits, tokens[:, 1:])
        (loss + stats.balance_loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
