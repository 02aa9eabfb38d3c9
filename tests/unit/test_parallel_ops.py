"""The hand-written backward of each macro-module operator against autograd."""

import pytest
import torch
import torch.nn.functional as F

from trainer.config import Config, apply_overrides
from trainer.errors import ConfigError
from trainer.parallel import ops
from trainer.parallel.dims import check_layout

pytestmark = pytest.mark.timeout(60)


def test_rmsnorm_backward_matches_autograd():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    dy = torch.randn(3, 5, 16)
    ops.rmsnorm_fwd(x, w, 1e-5).backward(dy)
    dx, dw = ops.rmsnorm_bwd(dy, x.detach(), w.detach(), 1e-5)
    torch.testing.assert_close(dx, x.grad)
    torch.testing.assert_close(dw, w.grad)


def test_rope_inverse_undoes_rope():
    x = torch.randn(2, 6, 3, 8)
    pos = torch.arange(6) + 5
    back = ops.rope(ops.rope(x, pos, 10000.0), pos, 10000.0, inverse=True)
    torch.testing.assert_close(back, x)


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("use_math", [False, True])
def test_attention_backward_matches_autograd(group, use_math):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 10, 8, requires_grad=True)
    k = torch.randn(2, 4 // group, 10, 8, requires_grad=True)
    v = torch.randn(2, 4 // group, 10, 8, requires_grad=True)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)
    d_out = torch.randn_like(ref)
    ref.backward(d_out)
    if use_math:  # the fallback used where no flash kernel fits (e.g. fp32 on CUDA)
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        out, lse = ops._math_attention_fwd(qd, *(ops._expand_kv(t, group) for t in (kd, vd)))
        dq, dk, dv = ops._math_attention_bwd(
            d_out, qd, *(ops._expand_kv(t, group) for t in (kd, vd)), out, lse
        )
        dk, dv = ops._fold_kv(dk, group), ops._fold_kv(dv, group)
    else:
        out, lse = ops.attention_fwd(q.detach(), k.detach(), v.detach())
        dq, dk, dv = ops.attention_bwd(d_out, q.detach(), k.detach(), v.detach(), out, lse)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dq, q.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dk, k.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dv, v.grad, rtol=1e-4, atol=1e-5)


def test_expert_backward_matches_autograd():
    torch.manual_seed(0)
    x = torch.randn(7, 6, requires_grad=True)
    gate = torch.rand(7, requires_grad=True)
    w1, w3 = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5, requires_grad=True)
    w2 = torch.randn(5, 6, requires_grad=True)
    y = (F.silu(x @ w1) * (x @ w3) * gate[:, None]) @ w2
    dy = torch.randn_like(y)
    y.backward(dy)
    fc1, fc3 = ops.swiglu_fwd(x.detach(), w1.detach(), w3.detach())
    dx, dg, g1, g3, g2 = ops.expert_bwd(
        dy, x.detach(), fc1, fc3, gate.detach(), w1.detach(), w3.detach(), w2.detach()
    )
    for got, want in ((dx, x.grad), (dg, gate.grad), (g1, w1.grad), (g3, w3.grad), (g2, w2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


LAYOUT_ERRORS = [
    (["parallel.n=4"], 3, "1 * 1 * 4 = 4 but --nproc is 3"),
    (
        ["parallel.n=4", "model.kv_heads=2"],
        4,
        "model.kv_heads = 2 is not divisible by parallel.n = 4",
    ),
    (
        ["parallel.n=4", "model.seq_len=130"],
        4,
        "model.seq_len = 130 is not divisible by parallel.n = 4",
    ),
    (["parallel.n=4", "parallel.ffn=tp", "model.ffn_hidden=250"], 4, "model.ffn_hidden = 250"),
    (["parallel.n=4", "comm.chunks=3"], 4, "are not divisible by comm.chunks = 3"),
]


@pytest.mark.parametrize("overrides,nproc,message", LAYOUT_ERRORS)
def test_bad_layouts_fail_with_their_numbers(overrides, nproc, message):
    cfg = apply_overrides(Config(), ["model.heads=8", "model.kv_heads=4", *overrides])
    with pytest.raises(ConfigError, match="invalid parallel layout") as err:
        check_layout(cfg, nproc)
    assert message in str(err.value)


def test_single_process_reference_accepts_any_n():
    cfg = apply_overrides(Config(), ["parallel.n=4", "model.kv_heads=2"])
    check_layout(cfg, 1)  # the reference holds unsharded weights: no head constraint


@pytest.mark.parametrize("topk,n,mode", [(1, 8, "ep_a2a"), (2, 4, "ep_a2a"), (4, 4, "ep_agrs")])
def test_auto_picks_all_to_all_while_topk_is_below_n(topk, n, mode):
    cfg = apply_overrides(
        Config(), ["model.experts=8", f"model.topk={topk}", f"parallel.n={n}", "parallel.ffn=auto"]
    )
    assert cfg.ffn_mode == mode


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_slot_sums_equal_the_reduction(k, dtype):
    from trainer.model.experts import sum_slots

    rows = torch.randn(64, k, 48, generator=torch.Generator().manual_seed(k)).to(dtype)
    got, want = sum_slots(rows), rows.sum(1)
    assert got.dtype == dtype and got.shape == (64, 48)
    if k <= 2:  # one rounding of the same two terms: bit for bit
        assert torch.equal(got, want)
    else:  # summed in fp32 and rounded once, like the reduction; the order may differ
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_combine_gathers_each_tokens_slots_and_sums_them_like_sum_slots(k, dtype):
    # The all-to-all combine: rows arrive in dispatch order; slot_place says where each
    # (token, slot) row is. A gather per slot added in place must give sum_slots' bits.
    from trainer.model.experts import sum_slots
    from trainer.parallel.moe import _gather_slots

    g = torch.Generator().manual_seed(10 + k)
    T = 37
    rows = torch.randn(T * k, 24, generator=g).to(dtype)
    slot_place = torch.randperm(T * k, generator=g)
    before = rows.clone()
    got = _gather_slots(rows, slot_place, T, k)
    want = sum_slots(rows[slot_place].view(T, k, 24))
    assert got.dtype == dtype and got.shape == (T, 24)
    assert torch.equal(got, want)
    assert torch.equal(rows, before)  # the sums went into a new tensor, not the received rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_fill_and_gather_sums_the_present_slots_of_each_token(k, dtype):
    # ep_agrs: a rank holds the rows of some (token, slot) pairs, in expert order; each
    # token's present slots are summed, absent ones count as zero.
    from trainer.model.experts import fill_and_gather, sum_slots

    g = torch.Generator().manual_seed(20 + k)
    T = 29
    # about half of the slots of the first T - 5 tokens; the last 5 tokens have none here
    slots = torch.randperm((T - 5) * k, generator=g)[: (T - 5) * k // 2 + 1]
    rows = torch.randn(slots.numel(), 24, generator=g).to(dtype)
    got = fill_and_gather(rows, slots // k, T, k)
    want = sum_slots(rows.new_zeros(T * k, 24).index_copy(0, slots, rows).view(T, k, 24))
    assert got.dtype == dtype and got.shape == (T, 24)
    if k <= 2:  # the same terms, rounded once: bit for bit
        assert torch.equal(got, want)
    else:  # summed in fp32 (bf16: rounded once); only the order of the terms may differ
        torch.testing.assert_close(got, want)
    assert (got[T - 5 :] == 0).all()
