"""Loss curves of DP gradient sync: bf16 all-to-all (the paper's) vs fp32 reduce-scatter.

    python bench/convergence.py [--steps 300] [--data data/demo] \\
        [--json bench/results/convergence.json] [--png docs/convergence_grad_sync.png]

Trains configs/tiny.toml on real text (the demo corpus) at dp = 2, n = 2 (4
local ranks) twice from the same seed, once per ``comm.grad_sync``, and
reports the largest gap between the two loss curves smoothed over 20 steps,
the final losses, and the DP gradient bytes of each. The PNG plots both
curves and their difference (needs matplotlib: ``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 20


def train(data: str, steps: int, grad_sync: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "s.json"
        cmd = [sys.executable, "-m", "service.cli", "train", "--config", "configs/tiny.toml",
               "--nproc", "4", "--summary-json", str(summary)]  # fmt: skip
        for s in (f"data.path={data}", f"train.steps={steps}", "parallel.n=2", "parallel.dp=2",
                  f"comm.grad_sync={grad_sync}", "observe.log_interval=50"):  # fmt: skip
            cmd += ["--set", s]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        return json.loads(summary.read_text())


def smooth(values: list[float], window: int = WINDOW) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def compare(fp32: list[float], bf16: list[float]) -> dict:
    a, b = smooth(fp32), smooth(bf16)
    gaps = [abs(x - y) / x for x, y in zip(a, b, strict=True)]
    return {
        "max_smoothed_rel_gap": max(gaps),
        "final_smoothed_fp32_rs": a[-1],
        "final_smoothed_bf16_a2a": b[-1],
        "final_rel_gap": gaps[-1],
    }


def plot(fp32: list[float], bf16: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[3, 1])
    steps = range(1, len(fp32) + 1)
    top.plot(steps, smooth(fp32), label="fp32 reduce-scatter")
    top.plot(steps, smooth(bf16), label="bf16 all-to-all + fp32 sum", linestyle="--")
    top.set_ylabel(f"training loss ({WINDOW}-step mean)")
    top.set_title("tiny MoE, dp=2 x n=2, Python stdlib text")
    top.legend()
    bottom.plot(steps, [b - a for a, b in zip(smooth(fp32), smooth(bf16), strict=True)])
    bottom.axhline(0, color="grey", linewidth=0.5)
    bottom.set_ylabel("bf16 - fp32")
    bottom.set_xlabel("step")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--data", default="data/demo")
    p.add_argument("--json", default="bench/results/convergence.json")
    p.add_argument("--png", default="docs/convergence_grad_sync.png")
    a = p.parse_args()
    runs = {gs: train(a.data, a.steps, gs) for gs in ("fp32_rs", "bf16_a2a")}
    fp32, bf16 = runs["fp32_rs"]["losses"], runs["bf16_a2a"]["losses"]
    result = {
        "steps": a.steps,
        **compare(fp32, bf16),
        "grad_dp_bytes": {gs: r["comm_bytes_by_tag"]["grad_dp"] for gs, r in runs.items()},
        "losses": {"fp32_rs": fp32, "bf16_a2a": bf16},
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    if a.png:
        plot(fp32, bf16, a.png)
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=1))


if __name__ == "__main__":
    main()
