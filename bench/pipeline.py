"""Measured 1F1B bubble fraction against (P - 1) / (M + P - 1).

    python bench/pipeline.py [--data data/demo] [--steps 8] [--json bench/results/pipeline.json]

Trains configs/tiny.toml (4 layers here, so 4 stages are possible) with
``megamoe train`` for pipeline depths P = 2 and 4 (n = 1, dp = 1, one thread
per rank) and M = 2, 4, 8 micro-batches per step, and reports the median
measured bubble (1 - compute / makespan, averaged over ranks; first step left
out) beside the theory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._deps import require_corpus
from trainer.atomic import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]


def run(data: str, stages: int, micro_batches: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "s.json"
        sets = [f"data.path={data}", "model.layers=4", f"parallel.pp={stages}"]
        sets += [f"train.micro_batch={16 // micro_batches}", f"train.steps={steps}"]
        sets += ["observe.log_interval=1000", "train.threads=1"]
        cmd = [sys.executable, "-m", "service.cli", "train", "--config", "configs/tiny.toml"]
        cmd += ["--nproc", str(stages), "--summary-json", str(summary)]
        for s in sets:
            cmd += ["--set", s]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        return json.loads(summary.read_text())["pipeline"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/demo")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--json", default="bench/results/pipeline.json")
    a = p.parse_args()
    require_corpus(a.data)
    rows = []
    for stages in (2, 4):
        for micro in (2, 4, 8):
            r = run(a.data, stages, micro, a.steps)
            rows.append(r)
            measured, theory = r["bubble_measured"], r["bubble_theory"]
            print(f"P={stages} M={micro}: measured {measured:.3f}, theory {theory:.3f}", flush=True)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(a.json, {"rows": rows})
    print("\n| stages P | micro-batches M | measured bubble | (P-1)/(M+P-1) | difference |")
    print("|---|---|---|---|---|")
    for r in rows:
        diff = r["bubble_measured"] - r["bubble_theory"]
        cells = [r["stages"], r["micro_batches"], f"{r['bubble_measured']:.3f}"]
        cells += [f"{r['bubble_theory']:.3f}", f"{diff:+.3f}"]
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
