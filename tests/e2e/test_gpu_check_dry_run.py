"""bench/gpu_check.sh in its CPU dry-run mode: the script the GPU machines run stays working.

Its operator checks compare the trainer's kernels with float64 autograd references,
so the errors they report are measured; the second test shows they catch a wrong
operator.
"""

import json
import subprocess
import sys

import pytest
import torch

from bench import gpu_slice
from tests.e2e.conftest import ROOT
from trainer.parallel import block, ops


@pytest.mark.timeout(180)
def test_gpu_check_dry_run_writes_its_json(tmp_path):
    out = tmp_path / "gpu.json"
    res = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True
    checks = result["op_checks_max_rel_error"]
    assert set(checks) == set(gpu_slice.TOLERANCE)
    assert result["op_checks_failed"] == []
    for name, err in checks.items():
        assert err <= gpu_slice.TOLERANCE[name], name
    # Measured against a different computation, not against itself: the fp32 kernels
    # differ from the float64 reference by rounding (about 1e-7), never by exactly 0.
    assert checks["attention_float32"] > 1e-9 and checks["rmsnorm_bwd"] > 1e-9
    assert checks["attention_bfloat16"] > checks["attention_float32"]
    assert result["layer_slice"]["tflops"] > 0 and 0 < result["mfu"] < 2
    # the 352B slice ran through the macro module: its collectives were booked
    assert {"attn_qkv", "ep_dispatch", "ep_combine"} <= set(result["layer_slice"]["comm_bytes"])
    macro = result["macro_checks"]
    assert set(macro) == {"fp32_chunks1", "fp32_chunks2", "bf16_chunks1", "bf16_chunks2"}
    assert result["macro_failed"] == []
    assert 0 < macro["fp32_chunks1"]["grad_rel_error"] < 1e-4  # measured, not 0 by construction
    assert result["fp8_codec"]["GB_per_s"] > 0


def _rmsnorm_bwd_without_projection(dy, x, w, eps):
    """A plausible slip: dx = r * dy * w, forgetting the term through mean(x^2)."""
    r = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    dw = (dy.float() * x.float() * r).sum(0)
    return (r * dy.float() * w.float()).to(x.dtype), dw.to(w.dtype)


def _attention_fwd_without_scale(q, k, v):
    """Another: softmax(q k^T) v without the 1/sqrt(D) (scale 1 given to the kernel)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), 0.0, True, scale=1.0
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("op", "wrong", "check"),
    [
        ("rmsnorm_bwd", _rmsnorm_bwd_without_projection, "rmsnorm_bwd"),
        ("attention_fwd", _attention_fwd_without_scale, "attention_float32"),
    ],
)
def test_op_checks_catch_a_wrong_operator(monkeypatch, op, wrong, check):
    monkeypatch.setattr(ops, op, wrong)
    errors = gpu_slice.op_checks(torch.device("cpu"))
    assert errors[check] > 100 * gpu_slice.TOLERANCE[check]
    assert any(f.startswith(check) for f in gpu_slice.failed_checks(errors))


@pytest.mark.timeout(60)
def test_macro_check_catches_a_wrong_backward(monkeypatch):
    monkeypatch.setattr(block, "rmsnorm_bwd", _rmsnorm_bwd_without_projection)
    result = {"fp32_chunks1": gpu_slice.macro_check(torch.device("cpu"), "fp32")}
    assert result["fp32_chunks1"]["grad_rel_error"] > 100 * gpu_slice.MACRO_TOLERANCE["fp32"]
    assert gpu_slice.failed_macro_checks(result)
