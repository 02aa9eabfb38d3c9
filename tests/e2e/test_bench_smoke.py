"""The benchmarks run end to end at toy size and write their JSON (no timing asserted), and
check what they need before they start."""

import json
import os
import subprocess
import sys

import pytest

from tests.e2e.conftest import ROOT


@pytest.fixture
def no_matplotlib(tmp_path):
    """An environment in which ``import matplotlib`` fails, installed or not."""
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('matplotlib blocked by the test')\n")
    return {**os.environ, "PYTHONPATH": str(shim.parent)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra", ["", "--overlap --chunks 2"], ids=["plain", "overlap-chunks"])
def test_moe_layer_benchmark_writes_json(tmp_path, extra):
    out = tmp_path / "moe.json"
    args = "--hidden 32 --ffn 64 --experts 4 --topk 2 --tokens 64 --ep 2 --warmup 1 --steps 2 "
    args += extra
    res = subprocess.run(
        [sys.executable, "bench/moe_layer.py", *args.split(), "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert len(result["step_times_s"]) == 2
    assert result["step_s"] > 0 and result["roofline_s"] > 0
    # 3 after each timed step (the step's own roofline), then 5 at the end
    assert result["roofline_samples"] == 2 * 3 + 5
    # each step's own roofline (paired ratio x step) comes from samples the best-of-run
    # roofline also saw, so it can be no faster than that roofline
    paired = result["paired_ratios"]
    assert len(paired) == 2 and result["paired_ratio"] == sum(paired) / 2
    for ratio, step in zip(paired, result["step_times_s"], strict=True):
        assert ratio * step >= result["roofline_s"] * (1 - 1e-9)
    assert "of roofline" in res.stdout


@pytest.mark.timeout(240)
def test_ablation_ladder_runs_every_row_and_writes_json(tmp_path, no_matplotlib):
    # Toy shapes on loopback only (the fabric needs root and has its own integration test);
    # no --png, so nothing is plotted and matplotlib (blocked here) is never needed.
    out = tmp_path / "ablation.json"
    toy = "model.hidden=64 model.ffn_hidden=64 model.seq_len=64 model.layers=1 model.vocab_size=128"
    args = ["--steps", "2", "--warmup", "1", "--no-fabric", "--json", str(out)]
    args += [arg for t in toy.split() for arg in ("--set", t)]
    res = subprocess.run(
        [sys.executable, "bench/ablation.py", *args],
        cwd=ROOT,
        env=no_matplotlib,
        capture_output=True,
        text=True,
        timeout=230,
    )
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


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "argv",
    [
        ["bench/ablation.py", "--steps", "10", "--warmup", "2", "--no-fabric"],
        ["bench/convergence.py", "--steps", "300", "--data", "no/such/corpus"],
    ],
    ids=["ablation", "convergence"],
)
def test_a_plot_without_matplotlib_fails_before_any_training(tmp_path, no_matplotlib, argv):
    out = tmp_path / "result.json"
    res = subprocess.run(
        [sys.executable, *argv, "--json", str(out), "--png", str(tmp_path / "plot.png")],
        cwd=ROOT,
        env=no_matplotlib,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    # Refused at the argument check: no step ran and no result was written.
    assert "step" not in res.stdout and not out.exists()
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "--png needs matplotlib" in lines[0] and "pip install -e ." in lines[0]
    assert not out.exists() and res.stdout == ""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bench", ["pipeline", "startup"])
def test_a_benchmark_without_a_corpus_fails_at_once(tmp_path, bench):
    res = subprocess.run(
        [sys.executable, f"bench/{bench}.py", "--data", str(tmp_path / "none")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "no prepared corpus" in res.stderr and "make demo" in res.stderr


@pytest.mark.timeout(120)
def test_startup_benchmark_times_each_phase_of_a_real_run(tmp_path, demo_data):
    out = tmp_path / "startup.json"
    argv = ["bench/startup.py", "--nproc", "2", "--repeats", "1", "--steps", "2"]
    res = subprocess.run(
        [sys.executable, *argv, "--data", str(demo_data), "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    med = json.loads(out.read_text())["results"]["2"]["median"]
    assert 0 < med["banner_s"] <= med["first_step_s"] <= med["done_s"] < med["wall_s"]
    assert med["exit_after_done_s"] >= 0
    assert "--nproc 2: banner" in res.stdout
