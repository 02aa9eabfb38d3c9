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


@pytest.mark.timeout(240)
def test_ablation_ladder_runs_every_row_and_writes_json(tmp_path):
    # Toy shapes on loopback only (the fabric needs root and has its own integration test).
    out = tmp_path / "ablation.json"
    toy = ["model.hidden=64", "model.ffn_hidden=64", "model.seq_len=64", "model.layers=1",
           "model.vocab_size=128"]  # fmt: skip
    res = subprocess.run(
        [sys.executable, "bench/ablation.py", "--steps", "2", "--warmup", "1", "--no-fabric",
         "--png", "", "--json", str(out), *[arg for t in toy for arg in ("--set", t)]],
        cwd=ROOT, capture_output=True, text=True, timeout=230,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["results"]["loopback"]
    assert [r["row"] for r in rows][:2] == ["tp+tp, no overlap", "sp+ep"]
    assert len(rows) == 6 and rows[0]["step_ratio"] == 1.0
    assert rows[1]["bytes_per_rank"] < rows[0]["bytes_per_rank"]  # SP + EP move fewer bytes
    assert rows[5]["bytes_per_rank"] < rows[4]["bytes_per_rank"]  # FP8 dispatch and combine
    assert rows[0]["overlap_ratio"] < rows[2]["overlap_ratio"]  # inter-op overlap hides some
    assert set(result["exposed_falls"]["loopback"]) == {"+ inter-op overlap", "+ intra-op chunks"}
    assert "ep_dispatch" in rows[1]["exposed_by_tag_s"]
    assert "| tp+tp, no overlap | loopback |" in res.stdout
