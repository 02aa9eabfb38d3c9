"""The MoE-layer benchmark runs end to end at toy size and writes its JSON (no timing asserted)."""

import json
import subprocess
import sys

import pytest

from tests.e2e.conftest import ROOT


@pytest.mark.timeout(120)
def test_moe_layer_benchmark_writes_json(tmp_path):
    out = tmp_path / "moe.json"
    args = "--hidden 32 --ffn 64 --experts 4 --topk 2 --tokens 64 --ep 2 --warmup 1 --steps 2"
    res = subprocess.run(
        [sys.executable, "bench/moe_layer.py", *args.split(), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert len(result["step_times_s"]) == 2
    assert result["step_s"] > 0 and result["roofline_s"] > 0
    assert "of roofline" in res.stdout
