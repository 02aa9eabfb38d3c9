"""Hand-written forward and backward of the operators inside one MoE layer.

The macro module (``block.py``) runs without autograd inside the layer, so it
needs each operator as a pair of plain functions: ``*_fwd`` returns what the
next operator needs, ``*_bwd`` takes the output gradient and the kept (or
recomputed) inputs. Each pair is checked against autograd on the reference
modules in the tests.

Shape legend: B batch, S sequence (full), L local sequence, H hidden,
N query heads, G kv heads, D head dim, A assignment rows, F expert hidden,
E experts, T tokens, k top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.model.layers import rope_tables


def linear_bwd(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
    """y = x @ w.T: returns (dx, dw) with the leading dims of x and dy flattened for dw."""
    dx = dy @ w
    dw = dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    return dx, dw


def rmsnorm_fwd(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def rmsnorm_bwd(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, eps: float):
    """d/dx and d/dw of x * rsqrt(mean(x^2) + eps) * w."""
    x32, dy32 = x.float(), dy.float()
    r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    xhat = x32 * r
    dw = (dy32 * xhat).reshape(-1, x.shape[-1]).sum(0)
    g = dy32 * w.float()
    dx = r * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), dw.to(w.dtype)


def rope(x_BSND: torch.Tensor, positions: torch.Tensor, theta: float, inverse: bool = False):
    """Rotate by the positions' angles; ``inverse`` rotates back (RoPE's backward)."""
    cos, sin = rope_tables(positions, x_BSND.shape[-1], theta)
    cos, sin = cos.to(x_BSND.device), sin.to(x_BSND.device)
    if inverse:
        sin = -sin
    half = x_BSND.shape[-1] // 2
    rotated = torch.cat([-x_BSND[..., half:], x_BSND[..., :half]], dim=-1)
    return x_BSND * cos[None, :, None, :].to(x_BSND.dtype) + rotated * sin[None, :, None, :].to(
        x_BSND.dtype
    )


def _expand_kv(t_BGSD: torch.Tensor, group: int) -> torch.Tensor:
    return t_BGSD if group == 1 else t_BGSD.repeat_interleave(group, dim=1)


def _fold_kv(d_BNSD: torch.Tensor, group: int) -> torch.Tensor:
    if group == 1:
        return d_BNSD
    B, N, S, D = d_BNSD.shape
    return d_BNSD.view(B, N // group, group, S, D).sum(2)


def _flash_ok(q: torch.Tensor) -> bool:
    if q.device.type == "cpu":
        return True
    return q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)


def attention_fwd(q_BNSD, k_BGSD, v_BGSD):
    """Causal attention; returns (out_BNSD, logsumexp_BNS), the stats backward needs."""
    group = q_BNSD.shape[1] // k_BGSD.shape[1]
    k, v = _expand_kv(k_BGSD, group), _expand_kv(v_BGSD, group)
    if q_BNSD.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q_BNSD, k, v, 0.0, True)
    if _flash_ok(q_BNSD):
        out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q_BNSD, k, v, 0.0, True)
        return out, lse
    return _math_attention_fwd(q_BNSD, k, v)


def attention_bwd(d_out, q_BNSD, k_BGSD, v_BGSD, out, lse):
    """Gradients (dq, dk, dv) from the kept q, k, v, output and logsumexp."""
    group = q_BNSD.shape[1] // k_BGSD.shape[1]
    k, v = _expand_kv(k_BGSD, group), _expand_kv(v_BGSD, group)
    if q_BNSD.device.type == "cpu":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            d_out.contiguous(), q_BNSD, k, v, out, lse, 0.0, True
        )
    elif _flash_ok(q_BNSD):
        S = q_BNSD.shape[2]
        empty = torch.empty(0, device=q_BNSD.device)
        zero = torch.zeros((), dtype=torch.int64, device=q_BNSD.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            d_out.contiguous(), q_BNSD, k, v, out, lse, empty, empty, S, S, 0.0, True, zero, zero
        )
    else:
        dq, dk, dv = _math_attention_bwd(d_out, q_BNSD, k, v, out, lse)
    return dq, _fold_kv(dk, group), _fold_kv(dv, group)


def _scores(q, k):
    S = q.shape[2]
    s = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
    mask = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    return s.masked_fill(~mask, float("-inf"))


def _math_attention_fwd(q, k, v):
    """Fallback (e.g. fp32 on CUDA): explicit softmax, O(S^2) memory."""
    s = _scores(q, k)
    lse = torch.logsumexp(s, dim=-1)
    out = (torch.exp(s - lse[..., None]) @ v.float()).to(q.dtype)
    return out, lse


def _math_attention_bwd(d_out, q, k, v, out, lse):
    p = torch.exp(_scores(q, k) - lse[..., None])
    d_out32 = d_out.float()
    dv = p.transpose(-1, -2) @ d_out32
    dp = d_out32 @ v.float().transpose(-1, -2)
    ds = p * (dp - (d_out32 * out.float()).sum(-1, keepdim=True))
    scale = q.shape[-1] ** -0.5
    dq = (ds @ k.float()) * scale
    dk = (ds.transpose(-1, -2) @ q.float()) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def swiglu_fwd(x_AH, w1_HF, w3_HF):
    """FC1 and FC3 of one expert: the outputs SAR keeps."""
    return x_AH @ w1_HF, x_AH @ w3_HF


def swiglu_act(fc1, fc3, gate_A):
    """The FC2 input: silu(fc1) * fc3 * gate (gate before FC2, as the paper moves it)."""
    return F.silu(fc1) * fc3 * gate_A[:, None].to(fc1.dtype)


# Fused elementwise work around the expert GEMMs (opt-in: ``train.fused_kernels``). The
# SwiGLU activation with its gate, and its backward (gate gradient, FC1 and FC3 output
# gradients), each become one generated kernel - torch.compile's inductor: vectorised C++
# on the CPU (it needs a C++ compiler), Triton on a GPU - instead of 3 and 7 passes over
# the [rows, h_ffn] tensors. Off by default: the first call compiles for about 20 s per
# process and dtype (cached on disk for later processes), which short runs and the test
# suite should not pay. Segments of fewer than 2 rows stay eager (sizes 0 and 1 would
# each compile a specialised kernel).
_FUSED_ON = {"on": False}
_FUSED_FNS: dict[str, object] = {}


def use_fused_kernels(on: bool) -> None:
    """Turn the compiled elementwise kernels on or off for this process."""
    _FUSED_ON["on"] = on


def fused_kernels_apply(rows: torch.Tensor) -> bool:
    return _FUSED_ON["on"] and rows.shape[0] >= 2


def silu_mul(fc1, fc3):
    """silu(fc1) * fc3 (one kernel when compiled)."""
    return F.silu(fc1) * fc3


def swiglu_gated(fc1, fc3, gate_A1):
    """silu(fc1) * fc3 * gate: the FC2 input (one kernel when compiled)."""
    return F.silu(fc1) * fc3 * gate_A1


def swiglu_bwd(d_in, fc1, fc3, gate_A1):
    """From d(act * gate) to (dgate, d_fc1, d_fc3), SiLU recomputed (one kernel compiled)."""
    silu = F.silu(fc1)
    dgate = (d_in * silu * fc3).sum(-1)
    d_act = d_in * gate_A1
    return dgate, torch.ops.aten.silu_backward(d_act * fc3, fc1), d_act * silu


def _fused(name: str):
    if name not in _FUSED_FNS:
        fn = {"silu_mul": silu_mul, "swiglu_gated": swiglu_gated, "swiglu_bwd": swiglu_bwd}[name]
        _FUSED_FNS[name] = torch.compile(fn, dynamic=True)
    return _FUSED_FNS[name]


def expert_bwd_data(
    dy_AH, fc1, fc3, gate_A, w1, w3, w2, gate_after=False, dx_out=None, dw2_out=None, dw2_add=False
):
    """Backward of fc2(silu(fc1) * fc3 * gate) up to the input: everything but dW1, dW3.

    Returns (dx, dgate, dw2, d_fc1, d_fc3); the activation is recomputed here.
    Split from the weight gradients so those can run while dx is communicated.
    Elementwise work is kept to the passes the math needs over the [rows, h_ffn]
    tensors: the gate scales dy's h columns, not the activation's h_ffn ones; SiLU's
    derivative comes from its fused backward kernel; products go in place into
    tensors this function made (or into one compiled kernel, see above). ``dx_out``
    receives dx when given; ``dw2_out`` receives dW2 (added to it with ``dw2_add``).
    """
    gate = gate_A[:, None].to(fc1.dtype)
    fused = not gate_after and fused_kernels_apply(dy_AH)
    if fused:
        act = _fused("silu_mul")(fc1, fc3)
    else:
        silu = F.silu(fc1)
        act = silu * fc3
    if gate_after:  # y = (act @ w2) * gate: the FP8 recipe's placement
        dgate = (dy_AH * (act @ w2)).sum(-1)
        dy_g = dy_AH * gate
        dw2 = mm_into(act.T, dy_g, dw2_out, dw2_add)
        d_act = dy_g @ w2.T
    else:  # y = (act * gate) @ w2
        dw2 = mm_into(act.T, dy_AH * gate, dw2_out, dw2_add)
        d_in = dy_AH @ w2.T  # d(act * gate)
        if fused:
            dgate, d_fc1, d_fc3 = _fused("swiglu_bwd")(d_in, fc1, fc3, gate)
        else:
            dgate = (d_in * act).sum(-1)
            d_act = d_in.mul_(gate)
    if not fused:
        d_fc3 = d_act * silu
        d_fc1 = torch.ops.aten.silu_backward(d_act.mul_(fc3), fc1)
    dx = torch.mm(d_fc1, w1.T, out=dx_out) if dx_out is not None else d_fc1 @ w1.T
    dx.addmm_(d_fc3, w3.T)
    return dx, dgate, dw2, d_fc1, d_fc3


def mm_into(a, b, out=None, add=False):
    """``a @ b``; written into ``out`` when given, or added to it (``add``): a gradient
    summed over row blocks needs no zero-filled buffer and no separate addition pass."""
    if out is None:
        return a @ b
    return out.addmm_(a, b) if add else torch.mm(a, b, out=out)


def expert_bwd(dy_AH, x_AH, fc1, fc3, gate_A, w1, w3, w2):
    """Backward of fc2(silu(fc1) * fc3 * gate) for one expert's rows.

    Returns (dx, dgate, dw1, dw3, dw2).
    """
    dy_AH, w1, w3, w2 = in_compute_dtype(dy_AH, w1, w3, w2)
    dx, dgate, dw2, d_fc1, d_fc3 = expert_bwd_data(dy_AH, fc1, fc3, gate_A, w1, w3, w2)
    return dx, dgate, x_AH.T @ d_fc1, x_AH.T @ d_fc3, dw2


# Grouped experts: rows sorted by expert, one GEMM per (expert, rows) segment.


def cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` along rows without the copy when there is one part (one piece)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def segments_of(counts: list[int]) -> list[tuple[int, int]]:
    """Rows grouped by expert in expert order: [(expert, rows), ...]."""
    return list(enumerate(counts))


def _split(t, segments):
    return t.split([rows for _, rows in segments])


# The expert GEMMs of a grouped layer can run as one ``torch._grouped_mm`` call each (one
# launch, no per-expert Python; kernels: CUDA bf16, CPU bf16 and fp32 in torch 2.13) or as a
# loop over the experts, each expert's FC1/FC3 GEMMs, activation and FC2 GEMM back to back.
# By default the grouped calls run on CUDA bf16, where a loop's launches and host work
# dominate; on CPU the loop runs: there each expert's activation reads its GEMM outputs
# while they are still in cache, and bench/moe_layer.py measured the whole-tensor
# activation between grouped calls 8-25 % slower at the benchmark's shapes
# (docs/PERFORMANCE.md). ``grouped=True``/``False`` forces either; both give the same values
# (tests/unit/test_grouped_gemm.py).
_GROUPED_KERNELS = {"cpu": (torch.bfloat16, torch.float32), "cuda": (torch.bfloat16,)}
_GROUPED_BY_DEFAULT = {"cuda": (torch.bfloat16,)}
_grouped_broken: set[tuple[str, torch.dtype]] = set()


def in_compute_dtype(x: torch.Tensor, *weights: torch.Tensor):
    """``x`` and the weights in the dtype their GEMMs run in: autocast's (bf16) for fp32
    inputs inside an autocast region, else their own. Explicit, because the grouped
    kernel and the loop's ``out=`` GEMMs are outside autocast's op list."""
    dev = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return (x.to(dt), *(w.to(dt) for w in weights))
    return (x, *(w.to(x.dtype) for w in weights))


def grouped_offsets(segments, device) -> torch.Tensor | None:
    """``torch._grouped_mm``'s end offsets of the segments' rows, or None when the segments
    are not each local expert once, in order (then the per-segment loop runs)."""
    if [e for e, _ in segments] != list(range(len(segments))):
        return None
    ends, total = [], 0
    for _, rows in segments:
        total += rows
        ends.append(total)
    return torch.tensor(ends, dtype=torch.int32, device=device)


def _kernel(t: torch.Tensor, table) -> bool:
    return _has_kernel(t.device.type, t.dtype, table)


def _has_kernel(device: str, dtype: torch.dtype, table) -> bool:
    return (
        hasattr(torch, "_grouped_mm")
        and dtype in table.get(device, ())
        and (device, dtype) not in _grouped_broken
    )


def runs_grouped(t: torch.Tensor, grouped: bool | None = None) -> bool:
    """Whether ``grouped_fwd`` of rows like ``t`` (in their compute dtype, see
    ``in_compute_dtype``) takes the grouped calls; the loop otherwise, which accepts an
    expert in several segments and so rows in any order."""
    (probe,) = in_compute_dtype(t[:0])
    table = _GROUPED_KERNELS if grouped else _GROUPED_BY_DEFAULT
    return grouped is not False and _has_kernel(t.device.type, probe.dtype, table)


def grouped_plan(t: torch.Tensor, segments, grouped: bool | None = None) -> torch.Tensor | None:
    """The offsets when the grouped calls run for rows like ``t`` (see above), else None."""
    table = _GROUPED_KERNELS if grouped else _GROUPED_BY_DEFAULT
    if grouped is False or not _kernel(t, table):
        return None
    return grouped_offsets(segments, t.device)


def _no_kernel(t: torch.Tensor, exc: RuntimeError) -> None:
    import logging

    _grouped_broken.add((t.device.type, t.dtype))
    logging.getLogger(__name__).warning(
        "torch._grouped_mm failed on %s %s (%s); expert GEMMs run one per expert",
        t.device.type,
        t.dtype,
        str(exc).splitlines()[0],
    )


def grouped_mm(x_AK: torch.Tensor, w_EKN: torch.Tensor, segments, offs) -> torch.Tensor:
    """Rows of segment (e, rows) times ``w_EKN[e]``, every segment: [A, N]; one grouped
    call with ``offs`` (from ``grouped_plan``), a loop without."""
    if offs is not None and _kernel(x_AK, _GROUPED_KERNELS):
        try:
            return torch._grouped_mm(x_AK, w_EKN, offs=offs)
        except RuntimeError as exc:
            _no_kernel(x_AK, exc)
    outs = [x_e @ w_EKN[e] for (e, _), x_e in zip(segments, _split(x_AK, segments), strict=True)]
    return torch.cat(outs) if outs else x_AK.new_zeros(0, w_EKN.shape[-1])


def grouped_mm_t(a_AK: torch.Tensor, b_AN: torch.Tensor, segments, offs, like: torch.Tensor):
    """Per expert, the sum over its segments of a^T b: the weight gradients, shaped (and
    typed) like ``like`` [E, K, N]; zero for an expert without rows."""
    if offs is not None and _kernel(a_AK, _GROUPED_KERNELS):
        try:
            return torch._grouped_mm(a_AK.T, b_AN, offs=offs)
        except RuntimeError as exc:
            _no_kernel(a_AK, exc)
    out = torch.zeros_like(like)
    for (e, _), a, b in zip(segments, _split(a_AK, segments), _split(b_AN, segments), strict=True):
        out[e] += a.T @ b
    return out


def grouped_fwd(xs, gs, segments, w1, w3, w2, gate_after=False, grouped=None):
    """FC1/FC3/FC2 of rows grouped by expert (``segments``: (local expert, rows) in row
    order; an expert may appear in several segments in chunked pipelines); returns (y, fc1,
    fc3). The gate multiplies before FC2 (the paper's placement), or after it in FP8 mode."""
    xs, w1, w3, w2 = in_compute_dtype(xs, w1, w3, w2)
    offs = grouped_plan(xs, segments, grouped)
    if offs is None:
        return _looped_fwd(xs, gs, segments, w1, w3, w2, gate_after)
    fc1 = grouped_mm(xs, w1, segments, offs)
    fc3 = grouped_mm(xs, w3, segments, offs)
    if gate_after:
        y = grouped_mm(F.silu(fc1) * fc3, w2, segments, offs) * gs[:, None]
    else:
        y = grouped_mm(swiglu_act(fc1, fc3, gs), w2, segments, offs)
    return y, fc1, fc3


def _looped_fwd(xs, gs, segments, w1, w3, w2, gate_after):
    """Each segment's GEMMs and activation back to back, written straight into the
    outputs (no concatenation afterwards)."""
    rows_total, f, h = xs.shape[0], w1.shape[-1], w2.shape[-1]
    fc1, fc3, y = (
        xs.new_empty(rows_total, f),
        xs.new_empty(rows_total, f),
        xs.new_empty(rows_total, h),
    )
    start = 0
    for e, rows in segments:
        sl = slice(start, start + rows)
        start += rows
        x_e, g_e = xs[sl], gs[sl, None].to(xs.dtype)
        torch.mm(x_e, w1[e], out=fc1[sl])
        torch.mm(x_e, w3[e], out=fc3[sl])
        if gate_after:
            act = F.silu(fc1[sl]).mul_(fc3[sl])
            torch.mm(act, w2[e], out=y[sl]).mul_(g_e)
        elif fused_kernels_apply(x_e):
            torch.mm(_fused("swiglu_gated")(fc1[sl], fc3[sl], g_e), w2[e], out=y[sl])
        else:
            torch.mm(F.silu(fc1[sl]).mul_(fc3[sl]).mul_(g_e), w2[e], out=y[sl])
    return y, fc1, fc3


def grouped_bwd_data(dys, gs, segments, fc1, fc3, w1, w3, w2, gate_after=False, grouped=None):
    """dx, dgate, dW2 (per expert) and the FC1/FC3 output gradients of grouped rows: the
    backward of ``grouped_fwd`` up to its input (the activation recomputed), everything but
    dW1 and dW3, which ``grouped_bwd_weights`` computes while dx is communicated. The FC1/FC3
    gradients come as one tensor (grouped) or a list per segment (loop)."""
    dys, w1, w3, w2 = in_compute_dtype(dys, w1, w3, w2)
    offs = grouped_plan(dys, segments, grouped)
    if offs is None:
        return _looped_bwd_data(dys, gs, segments, fc1, fc3, w1, w3, w2, gate_after)
    sig = torch.sigmoid(fc1)
    act = fc1 * sig * fc3  # silu(fc1) * fc3
    gate = gs[:, None].to(fc1.dtype)
    if gate_after:  # y = (act @ w2) * gate: the FP8 recipe's placement
        dgs = (dys * grouped_mm(act, w2, segments, offs)).sum(-1)
        dy_g = dys * gate
        dw2 = grouped_mm_t(act, dy_g, segments, offs, w2)
        d_act = grouped_mm(dy_g, w2.transpose(1, 2), segments, offs)
    else:  # y = (act * gate) @ w2
        dw2 = grouped_mm_t(act * gate, dys, segments, offs, w2)
        d_in = grouped_mm(dys, w2.transpose(1, 2), segments, offs)
        dgs = (d_in * act).sum(-1)
        d_act = d_in * gate
    dfc3 = d_act * fc1 * sig
    dfc1 = d_act * fc3 * sig * (1 + fc1 * (1 - sig))
    dxs = grouped_mm(dfc1, w1.transpose(1, 2), segments, offs) + grouped_mm(
        dfc3, w3.transpose(1, 2), segments, offs
    )
    return dxs, dgs, dw2, dfc1, dfc3


def _looped_bwd_data(dys, gs, segments, fc1, fc3, w1, w3, w2, gate_after):
    dxs = dys.new_empty(dys.shape[0], w1.shape[1])
    dw2 = dys.new_empty(w2.shape)
    dgs, dfc1, dfc3, seen = [], [], [], set()
    start = 0
    for e, rows in segments:
        sl = slice(start, start + rows)
        start += rows
        _, dg, _, d1, d3 = expert_bwd_data(
            dys[sl],
            fc1[sl],
            fc3[sl],
            gs[sl],
            w1[e],
            w3[e],
            w2[e],
            gate_after,
            dxs[sl],
            dw2[e],
            e in seen,
        )
        seen.add(e)
        dgs.append(dg)
        dfc1.append(d1)
        dfc3.append(d3)
    _zero_unseen(seen, dw2)
    return dxs, cat_rows(dgs) if dgs else gs.new_zeros(0), dw2, dfc1, dfc3


def _zero_unseen(seen, *grads):
    """Experts no row reached have a zero gradient (their buffers were never written)."""
    for e in range(grads[0].shape[0]):
        if e not in seen:
            for g in grads:
                g[e].zero_()


def grouped_bwd_weights(xs, segments, dfc1, dfc3, w1):
    """dW1, dW3 = x^T d(fc1), x^T d(fc3) per expert: the GEMMs that hide communication
    (grouped when ``grouped_bwd_data`` was: its FC1/FC3 gradients are then one tensor)."""
    if isinstance(dfc1, torch.Tensor):
        offs = grouped_offsets(segments, xs.device)
        return grouped_mm_t(xs, dfc1, segments, offs, w1), grouped_mm_t(
            xs, dfc3, segments, offs, w1
        )
    xs = xs.to(dfc1[0].dtype) if dfc1 else xs
    dw1 = torch.empty(w1.shape, dtype=xs.dtype, device=xs.device)
    dw3 = torch.empty_like(dw1)
    seen = set()
    for (e, _), x, d1, d3 in zip(segments, _split(xs, segments), dfc1, dfc3, strict=True):
        mm_into(x.T, d1, dw1[e], e in seen)  # an expert's later blocks add in place
        mm_into(x.T, d3, dw3[e], e in seen)
        seen.add(e)
    _zero_unseen(seen, dw1, dw3)
    return dw1, dw3
