"""Measured (interleaved) 1F1B bubble fraction against (P - 1) / (v M + P - 1).

    python bench/pipeline.py [--data data/demo] [--steps 8] [--stages 2,4]
                             [--virtual-stages 1,2] [--json bench/results/pipeline.json]

Trains configs/tiny.toml (8 layers here, so 4 stages of 2 virtual stages are
possible, and every (P, v) row trains the same model) with ``megamoe train``
for pipeline depths P, virtual stages v per rank and M = P, 2P, 4P
micro-batches per step (at most 16: the global batch), n = 1, dp = 1, one
thread per rank, and reports the median measured bubble (1 - compute /
makespan, averaged over ranks; first step left out) beside the theory. With
v = 2 each rank runs twice as many units of half the work and sends twice as
often; on a CPU those transfers and the per-unit overheads count as bubble, so
the measured drop is smaller than the theory's halving.
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
LAYERS, BATCH = 8, 16


def run(data: str, stages: int, virtual: int, micro_batches: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "s.json"
        sets = [f"data.path={data}", f"model.layers={LAYERS}", f"parallel.pp={stages}"]
        sets += [f"parallel.virtual_stages={virtual}", f"train.global_batch={BATCH}"]
        sets += [f"train.micro_batch={BATCH // micro_batches}", f"train.steps={steps}"]
        sets += ["observe.log_interval=1000", "train.threads=1"]
        cmd = [sys.executable, "-m", "service.cli", "train", "--config", "configs/tiny.toml"]
        cmd += ["--nproc", str(stages), "--summary-json", str(summary)]
        for s in sets:
            cmd += ["--set", s]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        return json.loads(summary.read_text())["pipeline"]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/demo")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--stages", type=_ints, default=[2, 4], help="pipeline depths P")
    p.add_argument("--virtual-stages", type=_ints, default=[1, 2], help="chunks per rank v")
    p.add_argument("--json", default="bench/results/pipeline.json")
    a = p.parse_args()
    require_corpus(a.data)
    rows = []
    for stages in a.stages:
        for micro in (m for m in (stages, 2 * stages, 4 * stages) if m <= BATCH):
            for virtual in a.virtual_stages:
                r = run(a.data, stages, virtual, micro, a.steps)
                rows.append(r)
                measured, theory = r["bubble_measured"], r["bubble_theory"]
                print(
                    f"P={stages} v={virtual} M={micro}: measured {measured:.3f}, "
                    f"theory {theory:.3f}",
                    flush=True,
                )
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(a.json, {"layers": LAYERS, "rows": rows})
    print(
        "\n| stages P | virtual v | micro-batches M | measured bubble | (P-1)/(vM+P-1) "
        "| difference |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        diff = r["bubble_measured"] - r["bubble_theory"]
        cells = [r["stages"], r["virtual_stages"], r["micro_batches"]]
        cells += [f"{r['bubble_measured']:.3f}", f"{r['bubble_theory']:.3f}", f"{diff:+.3f}"]
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
