"""Router: top-k choice, device-group capacity with lowest-affinity dropping, balance loss."""

import math

import pytest
import torch

from trainer.model.router import balance_loss, group_capacity, route

pytestmark = pytest.mark.timeout(60)


def test_topk_picks_highest_softmax_scores_and_gates_are_those_scores():
    torch.manual_seed(0)
    logits = torch.randn(32, 8)
    r = route(logits, topk=2, groups=1)
    probs = torch.softmax(logits, -1)
    expected_scores, expected_ids = probs.topk(2, dim=-1)
    assert torch.equal(r.expert_ids_Tk, expected_ids)
    torch.testing.assert_close(r.gates_Tk, expected_scores)
    assert r.dropped == 0 and bool(r.keep_Tk.all())


def test_norm_topk_gates_sum_to_one():
    r = route(torch.randn(16, 8), topk=3, groups=1, norm_topk=True)
    torch.testing.assert_close(r.gates_Tk.sum(-1), torch.ones(16))


def test_capacity_is_per_device_group():
    # 8 tokens, top-1, 2 groups, factor 1.0 -> each group accepts ceil(8 * 1 / 2) = 4.
    assert group_capacity(8, 1, 2, 1.0) == 4
    assert group_capacity(10, 2, 4, 1.5) == math.ceil(1.5 * 10 * 2 / 4)
    assert group_capacity(8, 1, 2, 0.0) == 0  # dropless


def test_lowest_affinity_tokens_are_dropped_per_group():
    # Experts 0,1 form group 0 and 2,3 group 1. Six tokens go to group 0 with
    # distinct scores, two to group 1: group 0 keeps its four best, group 1 keeps both.
    strengths = [5.0, 1.0, 4.0, 2.0, 6.0, 3.0]
    rows = [
        [s, 0.0, 0.0, 0.0] if i % 2 == 0 else [0.0, s, 0.0, 0.0] for i, s in enumerate(strengths)
    ]
    rows += [[0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 3.0]]
    r = route(torch.tensor(rows), topk=1, groups=2, capacity_factor=1.0)
    assert r.dropped == 2
    dropped_tokens = (~r.keep_Tk[:, 0]).nonzero().flatten().tolist()
    assert dropped_tokens == [1, 3]  # the two lowest scores of group 0
    assert torch.all(r.gates_Tk[~r.keep_Tk] == 0)
    assert r.counts_E.tolist() == [3, 1, 1, 1]


def test_ties_keep_earlier_tokens():
    logits = torch.zeros(6, 2)
    logits[:, 0] = 1.0  # every token picks expert 0 with the same score
    r = route(logits, topk=1, groups=2, capacity_factor=1.0)  # capacity ceil(6/2) = 3
    assert r.keep_Tk[:, 0].tolist() == [True, True, True, False, False, False]


def test_dropless_never_drops_even_when_unbalanced():
    logits = torch.zeros(64, 4)
    logits[:, 0] = 10.0
    r = route(logits, topk=2, groups=4, capacity_factor=0.0)
    assert r.dropped == 0
    assert r.counts_E[0].item() == 64


def test_balance_loss_hand_computed():
    probs = torch.tensor(
        [
            [0.7, 0.1, 0.1, 0.1],
            [0.1, 0.6, 0.2, 0.1],
            [0.5, 0.2, 0.2, 0.1],
            [0.1, 0.1, 0.2, 0.6],
        ]
    )
    r = route(probs.log(), topk=1, groups=2)
    assert r.expert_ids_Tk.flatten().tolist() == [0, 1, 0, 3]
    # f_e = E/(kT) * count = [2, 1, 0, 1]; f'_g = [1.5, 0.5]
    # P_e = column means = [0.35, 0.25, 0.175, 0.225]; P'_g = [0.6, 0.4]
    # L = 1.5 * 0.6 + 0.5 * 0.4 = 1.1
    loss = balance_loss(r.probs_TE, r.expert_ids_Tk, groups=2)
    assert loss.item() == pytest.approx(1.1, rel=1e-6)


def test_balance_loss_is_one_when_routing_is_uniform():
    # Each token puts equal score on all experts; selections spread evenly.
    probs = torch.full((8, 4), 0.25)
    ids = torch.tensor([[0], [1], [2], [3], [0], [1], [2], [3]])
    assert balance_loss(probs, ids, groups=2).item() == pytest.approx(1.0)
    assert balance_loss(probs, ids, groups=4).item() == pytest.approx(1.0)


def test_balance_loss_gradient_reaches_router_logits():
    logits = torch.randn(16, 8, requires_grad=True)
    r = route(logits, topk=2, groups=4)
    balance_loss(r.probs_TE, r.expert_ids_Tk, groups=4).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
