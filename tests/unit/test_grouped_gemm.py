"""The grouped expert GEMMs (``torch._grouped_mm`` where the device and dtype have a kernel,
a loop over experts elsewhere) against autograd on a plain per-expert SwiGLU: forward,
input, gate and weight gradients, both gate placements, experts without rows, and the
loop fallback giving the same values."""

import pytest
import torch
import torch.nn.functional as F

from trainer.parallel import ops

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _reference(x, g, counts, w1, w3, w2, gate_after):
    """y per expert with autograd: the definition the grouped code must equal."""
    ys = []
    for e, (x_e, g_e) in enumerate(zip(x.split(counts), g.split(counts), strict=True)):
        act = F.silu(x_e @ w1[e]) * (x_e @ w3[e])
        y = (act @ w2[e]) * g_e[:, None] if gate_after else (act * g_e[:, None]) @ w2[e]
        ys.append(y)
    return torch.cat(ys)


def _case(dtype, counts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    E, H, Fh, A = len(counts), 16, 24, sum(counts)

    def r(*shape):
        return (torch.randn(*shape, generator=gen) * 0.3).to(dtype).requires_grad_()

    return r(A, H), r(A), r(E, H, Fh), r(E, H, Fh), r(E, Fh, H)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate_after", [False, True])
@pytest.mark.parametrize("counts", [[5, 3, 7, 1], [0, 6, 0, 4]])
def test_grouped_experts_equal_autograd_on_the_per_expert_definition(
    dtype, gate_after, counts, grouped
):
    x, g, w1, w3, w2 = _case(dtype, counts)
    segments = ops.segments_of(counts)
    y_ref = _reference(x, g, counts, w1, w3, w2, gate_after)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    with torch.no_grad():
        y, fc1, fc3 = ops.grouped_fwd(x, g, segments, w1, w3, w2, gate_after, grouped)
        dx, dg, dw2, dfc1, dfc3 = ops.grouped_bwd_data(
            dy, g, segments, fc1, fc3, w1, w3, w2, gate_after, grouped
        )
        assert isinstance(dfc1, torch.Tensor) == grouped  # the path it says it took
        dw1, dw3 = ops.grouped_bwd_weights(x, segments, dfc1, dfc3, w1)
    tol = TOL[dtype]
    torch.testing.assert_close(y, y_ref.detach(), **tol)
    for got, want in ((dx, x), (dg, g), (dw1, w1), (dw3, w3), (dw2, w2)):
        torch.testing.assert_close(got, want.grad, **tol)
    for e in (e for e, rows in enumerate(counts) if rows == 0):
        assert dw1[e].abs().sum() == 0 and dw2[e].abs().sum() == 0  # no rows, no gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_loop_gives_the_grouped_kernels_values_exactly(dtype):
    """On CPU both paths run (the loop by default, see trainer/parallel/ops.py), and their
    GEMMs agree bit for bit; segments that repeat an expert have no grouped plan."""
    counts = [4, 2, 5]
    x, _, w1, _, _ = _case(dtype, counts, seed=1)
    segments = ops.segments_of(counts)
    with torch.no_grad():
        offs = ops.grouped_offsets(segments, x.device)
        assert offs.tolist() == [4, 6, 11] and offs.dtype == torch.int32
        grouped = ops.grouped_mm(x, w1, segments, offs)
        looped = ops.grouped_mm(x, w1, segments, None)
        torch.testing.assert_close(grouped, looped, rtol=0, atol=0)
        wg = ops.grouped_mm_t(x, grouped, segments, offs, w1)
        wl = ops.grouped_mm_t(x, grouped, segments, None, w1)
        torch.testing.assert_close(wg, wl, rtol=0, atol=0)
    assert ops.grouped_offsets([(0, 3), (1, 2), (0, 1)], x.device) is None
    assert ops.grouped_plan(x, segments) is None  # CPU: the loop unless asked
    assert ops.grouped_plan(x, segments, grouped=True).tolist() == [4, 6, 11]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate_after", [False, True])
def test_the_loop_takes_rows_as_they_arrive_in_blocks_per_source_rank(dtype, gate_after):
    """Dropless all-to-all on CPU: rows arrive by source rank, then expert, and the loop
    takes each (rank, expert) block in place - an expert in several segments."""
    segments = [(0, 2), (1, 3), (2, 1), (0, 4), (1, 1), (2, 3)]  # two source ranks
    counts = [6, 4, 4]
    x, g, w1, w3, w2 = _case(dtype, counts)
    order = [0, 1, 6, 7, 8, 9, 2, 3, 4, 10, 5, 11, 12, 13]  # arrival index, by expert
    y_ref = _reference(x[order], g[order], counts, w1, w3, w2, gate_after)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    inverse = torch.empty(14, dtype=torch.long)
    inverse[order] = torch.arange(14)
    with torch.no_grad():
        y, fc1, fc3 = ops.grouped_fwd(x, g, segments, w1, w3, w2, gate_after, grouped=False)
        dx, dg, dw2, dfc1, dfc3 = ops.grouped_bwd_data(
            dy[inverse], g, segments, fc1, fc3, w1, w3, w2, gate_after, grouped=False
        )
        dw1, dw3 = ops.grouped_bwd_weights(x, segments, dfc1, dfc3, w1)
    tol = TOL[dtype]
    torch.testing.assert_close(y, y_ref.detach()[inverse], **tol)
    for got, want in ((dx, x), (dg, g), (dw1, w1), (dw3, w3), (dw2, w2)):
        torch.testing.assert_close(got.to(want.dtype), want.grad, **tol)


@pytest.mark.timeout(240)
def test_fused_kernels_give_the_eager_values():
    """train.fused_kernels: the compiled SwiGLU chains equal the eager passes (one compile
    per chain, ~20 s on 2 cores; the only test that pays it)."""
    counts = [5, 7, 3]
    x, g, w1, w3, w2 = _case(torch.float32, counts, seed=2)
    segments = ops.segments_of(counts)
    with torch.no_grad():
        eager = _fwd_bwd(x, g, segments, w1, w3, w2)
        ops.use_fused_kernels(True)
        try:
            fused = _fwd_bwd(x, g, segments, w1, w3, w2)
        finally:
            ops.use_fused_kernels(False)
    assert set(ops._FUSED_FNS) == {"silu_mul", "swiglu_gated", "swiglu_bwd"}  # they ran
    for got, want in zip(fused, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _fwd_bwd(x, g, segments, w1, w3, w2):
    y, fc1, fc3 = ops.grouped_fwd(x, g, segments, w1, w3, w2, False, grouped=False)
    dy = torch.linspace(-1, 1, y.numel()).view_as(y)
    dx, dg, dw2, dfc1, dfc3 = ops.grouped_bwd_data(
        dy, g, segments, fc1, fc3, w1, w3, w2, False, grouped=False
    )
    dw1, dw3 = ops.grouped_bwd_weights(x, segments, dfc1, dfc3, w1)
    return y, dx, dg, dw1, dw3, dw2
