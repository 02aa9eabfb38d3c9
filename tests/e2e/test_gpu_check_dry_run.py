"""bench/gpu_check.sh in its CPU dry-run mode: the script the GPU machines run stays working."""

import json
import subprocess
import sys

import pytest

from tests.e2e.conftest import ROOT


@pytest.mark.timeout(180)
def test_gpu_check_dry_run_writes_its_json(tmp_path):
    out = tmp_path / "gpu.json"
    res = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True
    checks = result["op_checks_max_rel_error"]
    assert checks["attention_float32"] < 1e-4 and checks["rmsnorm_bwd"] < 1e-5
    assert checks["attention_bfloat16"] < 5e-2  # bf16 rounding, on the CPU in the dry run
    assert checks["fp8_roundtrip_rel"] <= 2**-4
    assert result["layer_slice"]["tflops"] > 0 and 0 < result["mfu"] < 2
    assert result["fp8_codec"]["GB_per_s"] > 0
