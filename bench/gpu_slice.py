"""GPU checks and the 352B layer-slice timing that bench/gpu_check.sh runs.

    python bench/gpu_slice.py --json OUT [--dry-run]

1. Operator checks: the macro module's operators on the device (flash
   attention kernels for bf16, explicit softmax for fp32 on CUDA; the CPU
   flash kernel in the dry run), the hand-written RMSNorm forward and
   backward, each against a float64 reference computed on the CPU by autograd
   through the naive formula; and the FP8 codec round trip against the values
   it encoded. Errors above ``TOLERANCE`` make the script exit 1 (after
   writing the JSON).
2. One rank's share of an Internal-352B layer at n = 8, seq 8192, bf16:
   QKV and output projections on s/n = 1024 tokens, causal attention over the
   full sequence on h/n (4 query, 1 kv) heads, 4 local experts of h_ffn 14336
   fed by top-3 routing (3 x 1024 rows, 768 per expert when balanced) plus the
   shared expert - forward and backward, timed, with TFLOP/s and MFU against
   the GPU's peak (trainer.observe.mfu table).
3. The FP8 codec's encode + decode throughput on a [1024 x 3, 4096] tensor.

``--dry-run`` runs the same code on the CPU at 1/32 of every width and 1/32
of the sequence in fp32, so the test suite keeps this script working on
machines without a GPU. Its operator checks measure the CPU kernels against
the same float64 references, so their errors are real (not 0 by construction).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from trainer.atomic import write_json_atomic
from trainer.compress.fp8 import decode, encode_rows
from trainer.observe.mfu import cpu_peak_flops, gpu_peak_flops
from trainer.parallel import ops

FULL = {"s": 8192, "h": 4096, "heads": 32, "kv": 8, "n": 8, "ffn": 14336, "experts": 32, "k": 3}


def shapes(dry: bool) -> dict:
    if not dry:
        return dict(FULL)
    return {**FULL, "s": 256, "h": 128, "ffn": 448}


# Largest accepted max relative error of each operator check (max |op - reference| over
# max |reference|, the worst of its outputs). Measured on the CPU (dry run): attention
# fp32 5e-7, bf16 6.8e-3; RMSNorm forward and backward 1e-7; FP8 round trip 0.036.
# fp32 gets a 10-20x margin for other kernels' summation orders; bf16 attention pays
# bf16 inputs and outputs (eps 7.8e-3) compounded through softmax and the backward's
# GEMMs; the FP8 round trip is bounded by E4M3's half ulp, 2^-4 of the row's amax
# (trainer/compress/fp8.py).
TOLERANCE = {
    "attention_float32": 1e-5,
    "attention_bfloat16": 5e-2,
    "rmsnorm_fwd": 1e-6,
    "rmsnorm_bwd": 1e-6,
    "fp8_roundtrip_rel": 2**-4,
}


def _rel_err(got, ref) -> float:
    """max |got - ref| / max |ref| over the pairs, computed in float64 on the CPU."""
    return max(
        float((g.double().cpu() - r).abs().max() / r.abs().max())
        for g, r in zip(got, ref, strict=True)
    )


def naive_attention(q_BNSD, k_BGSD, v_BGSD):
    """Causal softmax attention written out in full: the reference, not the operator."""
    group = q_BNSD.shape[1] // k_BGSD.shape[1]
    k, v = k_BGSD.repeat_interleave(group, 1), v_BGSD.repeat_interleave(group, 1)
    S = q_BNSD.shape[2]
    scores = q_BNSD @ k.transpose(-1, -2) / q_BNSD.shape[-1] ** 0.5
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v


def naive_rmsnorm(x, w, eps: float):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _autograd_reference(fn, inputs, d_out):
    """fn's output and its input gradients, by autograd in float64 on the CPU."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(d_out.double())
    return out.detach(), [t.grad for t in leaves]


def op_checks(device: torch.device) -> dict:
    """Max relative error of the trainer's operators on ``device`` vs float64 references.

    The operators are trainer.parallel.ops (flash attention kernels - the CPU one in the
    dry run -, the hand-written RMSNorm forward and backward) and the FP8 codec; the
    references are the naive formulas above differentiated by autograd in float64, so
    every error is measured, not zero by construction (also on the CPU).
    """
    torch.manual_seed(0)
    out = {}
    q = torch.randn(1, 4, 256, 64, dtype=torch.float64)  # 4 query heads on 2 kv heads (GQA)
    k, v = (torch.randn(1, 2, 256, 64, dtype=torch.float64) for _ in range(2))
    d_out = torch.randn(1, 4, 256, 64, dtype=torch.float64)
    ref_o, ref_g = _autograd_reference(naive_attention, (q, k, v), d_out)
    for dtype in (torch.float32, torch.bfloat16):
        dq, dk, dv, dd = (t.to(device, dtype) for t in (q, k, v, d_out))
        o, lse = ops.attention_fwd(dq, dk, dv)
        grads = ops.attention_bwd(dd, dq, dk, dv, o, lse)
        out[f"attention_{str(dtype)[6:]}"] = _rel_err([o, *grads], [ref_o, *ref_g])
    x, w = torch.randn(64, 128, dtype=torch.float64), 1 + torch.randn(128, dtype=torch.float64)
    dy = torch.randn(64, 128, dtype=torch.float64)
    eps = 1e-5
    ref_y, ref_g = _autograd_reference(lambda a, b: naive_rmsnorm(a, b, eps), (x, w), dy)
    dx, dw, ddy = (t.to(device, torch.float32) for t in (x, w, dy))
    out["rmsnorm_fwd"] = _rel_err([ops.rmsnorm_fwd(dx, dw, eps)], [ref_y])
    out["rmsnorm_bwd"] = _rel_err(ops.rmsnorm_bwd(ddy, dx, dw, eps), ref_g)
    # The codec against the values it encodes: error per row relative to the row's amax.
    rows = torch.randn(512, 256) * torch.logspace(-3, 3, 512)[:, None]
    enc = encode_rows(rows.to(device))
    out["fp8_roundtrip_rel"] = float(
        ((decode(enc).cpu() - rows).abs() / rows.abs().amax(1, keepdim=True)).max()
    )
    return out


def failed_checks(errors: dict) -> list[str]:
    return [
        f"{name} {err:.3g} > {TOLERANCE[name]:.3g}"
        for name, err in errors.items()
        if not err <= TOLERANCE[name]
    ]


def _timed(fn, repeats: int, device: torch.device) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def layer_slice(sh: dict, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    s, h, n, ffn, k = sh["s"], sh["h"], sh["n"], sh["ffn"], sh["k"]
    d = h // sh["heads"]
    hq, hkv = sh["heads"] // n, sh["kv"] // n
    local, experts = s // n, sh["experts"] // n
    rows = local * k // experts  # per local expert, balanced top-k routing
    mk = lambda *shape: (torch.randn(*shape, device=device, dtype=dtype) * 0.02).requires_grad_()  # noqa: E731
    x = mk(local, h)
    wqkv, wo = mk(h, (sh["heads"] + 2 * sh["kv"]) * d), mk(h, h)
    q, kk, v = mk(1, hq, s, d), mk(1, hkv, s, d), mk(1, hkv, s, d)
    xe = mk(experts, rows, h)
    w1, w3, w2 = mk(experts, h, ffn), mk(experts, h, ffn), mk(experts, ffn, h)
    sw1, sw3, sw2 = mk(h, ffn), mk(h, ffn), mk(ffn, h)

    def step():
        proj = (x @ wqkv).sum() + (x @ wo).sum()
        att = F.scaled_dot_product_attention(q, kk, v, is_causal=True, enable_gqa=hq != hkv).sum()
        moe = ((F.silu(xe @ w1) * (xe @ w3)) @ w2).sum()
        shared = ((F.silu(x @ sw1) * (x @ sw3)) @ sw2).sum()
        (proj + att + moe + shared).backward()

    seconds = _timed(step, repeats, device)
    gemm = 2 * local * h * ((sh["heads"] + 2 * sh["kv"]) * d + h)  # projections
    gemm += 2 * experts * rows * 3 * h * ffn + 2 * local * 3 * h * ffn  # experts + shared
    attention = 2 * 2 * s * s * d * hq / 2  # QK^T and AV, causal half
    flops = 3 * (gemm + attention)  # forward + backward
    return {
        "seconds": seconds,
        "flops": flops,
        "tflops": flops / seconds / 1e12,
        "shapes": {**sh, "local_tokens": local, "rows_per_expert": rows},
    }


def fp8_codec(sh: dict, device: torch.device, repeats: int) -> dict:
    t = torch.randn(sh["s"] // sh["n"] * sh["k"], sh["h"], device=device, dtype=torch.bfloat16)
    seconds = _timed(lambda: decode(encode_rows(t)), repeats, device)
    return {"seconds": seconds, "GB_per_s": t.numel() * t.element_size() / seconds / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--dry-run", action="store_true", help="CPU, 1/32 widths, fp32")
    a = p.parse_args()
    if not a.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_slice: no CUDA device (use --dry-run to check the script on a CPU)")
    device = torch.device("cpu" if a.dry_run else "cuda")
    dtype = torch.float32 if a.dry_run else torch.bfloat16
    name = "cpu (dry run)" if a.dry_run else torch.cuda.get_device_name(0)
    peak = cpu_peak_flops("fp32") if a.dry_run else gpu_peak_flops(name, "bf16")
    sh = shapes(a.dry_run)
    errors = op_checks(device)
    result = {
        "device": name,
        "dtype": str(dtype),
        "dry_run": a.dry_run,
        "op_checks_reference": "float64 autograd through naive formulas, on the CPU",
        "op_checks_max_rel_error": errors,
        "op_checks_tolerance": TOLERANCE,
        "op_checks_failed": failed_checks(errors),
    }
    result["layer_slice"] = layer_slice(sh, device, dtype, repeats=2 if a.dry_run else 10)
    result["fp8_codec"] = fp8_codec(sh, device, repeats=2 if a.dry_run else 20)
    result["peak_tflops"] = peak / 1e12 if peak else None
    result["mfu"] = result["layer_slice"]["tflops"] * 1e12 / peak if peak else None
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(a.json, result)
    print(json.dumps(result, indent=1))
    if result["op_checks_failed"]:
        sys.exit("gpu_slice: operator checks failed: " + "; ".join(result["op_checks_failed"]))


if __name__ == "__main__":
    main()
