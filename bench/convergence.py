"""Loss curves with and without compressed communication, on real text.

    python bench/convergence.py [--what grad_sync|fp8] [--steps 300] [--data data/demo] \\
        [--json bench/results/convergence.json] [--png docs/convergence_grad_sync.png]

``--what grad_sync`` (default): DP gradient sync, bf16 all-to-all (the
paper's) vs fp32 reduce-scatter, at dp = 2, n = 2 (4 local ranks).
``--what fp8``: FP8 communication (comm.fp8) vs full-precision collectives at
n = 4 with SP attention and AG/RS experts (so the FFN reduce-scatter and the
backward all-gathers are the FP8 ones).

Trains configs/tiny.toml on the demo corpus twice from the same seed and
reports the largest gap between the two loss curves smoothed over 20 steps,
the final losses and the bytes of the compressed collectives. ``--png`` plots
both curves and their difference (needs matplotlib, a dependency of megamoe,
checked before the first run starts); without it nothing is plotted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._deps import require, require_corpus
from trainer.atomic import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 20


SETTINGS = {
    "grad_sync": {
        "layout": ["parallel.n=2", "parallel.dp=2"],
        "runs": {"fp32_rs": ["comm.grad_sync=fp32_rs"], "bf16_a2a": ["comm.grad_sync=bf16_a2a"]},
        "tag": "grad_dp",
        "labels": ("fp32 reduce-scatter", "bf16 all-to-all + fp32 sum"),
    },
    "fp8": {
        "layout": ["parallel.n=4", "parallel.ffn=ep_agrs", "comm.overlap=true"],
        "runs": {"fp32": ["comm.fp8=false"], "fp8": ["comm.fp8=true"]},
        "tag": "ffn_rs",
        "labels": ("fp32 collectives", "FP8 E4M3 reductions and gathers"),
    },
}


def train(data: str, steps: int, sets: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "s.json"
        cmd = [sys.executable, "-m", "service.cli", "train", "--config", "configs/tiny.toml"]
        cmd += ["--nproc", "4", "--summary-json", str(summary)]
        for s in (f"data.path={data}", f"train.steps={steps}", "observe.log_interval=50", *sets):
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
        "final_smoothed_full": a[-1],
        "final_smoothed_compressed": b[-1],
        "final_rel_gap": gaps[-1],
    }


def plot(
    fp32: list[float],
    bf16: list[float],
    path: str,
    labels=SETTINGS["grad_sync"]["labels"],
    title: str = "tiny MoE, dp=2 x n=2, Python stdlib text",
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[3, 1])
    steps = range(1, len(fp32) + 1)
    top.plot(steps, smooth(fp32), label=labels[0])
    top.plot(steps, smooth(bf16), label=labels[1], linestyle="--")
    top.set_ylabel(f"training loss ({WINDOW}-step mean)")
    top.set_title(title)
    top.legend()
    bottom.plot(steps, [b - a for a, b in zip(smooth(fp32), smooth(bf16), strict=True)])
    bottom.axhline(0, color="grey", linewidth=0.5)
    bottom.set_ylabel("compressed - full")
    bottom.set_xlabel("step")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--what", choices=sorted(SETTINGS), default="grad_sync")
    p.add_argument("--data", default="data/demo")
    p.add_argument("--json", default=None, help="default bench/results/convergence[_fp8].json")
    p.add_argument("--png", default=None, help="plot to this file (e.g. docs/convergence_fp8.png)")
    a = p.parse_args()
    if a.png:
        require("matplotlib", why="--png")
    require_corpus(a.data)
    setting = SETTINGS[a.what]
    suffix = "" if a.what == "grad_sync" else f"_{a.what}"
    json_path = a.json or f"bench/results/convergence{suffix}.json"
    runs = {
        name: train(a.data, a.steps, setting["layout"] + sets)
        for name, sets in setting["runs"].items()
    }
    (base, base_run), (comp, comp_run) = runs.items()
    full, compressed = base_run["losses"], comp_run["losses"]
    result = {
        "what": a.what,
        "steps": a.steps,
        **compare(full, compressed),
        "bytes": {n: r["comm_bytes_by_tag"].get(setting["tag"], 0) for n, r in runs.items()},
        "bytes_tag": setting["tag"],
        "losses": {base: full, comp: compressed},
    }
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(json_path, result)
    short = " ".join(o.split(".", 1)[1] for o in setting["layout"])
    if a.png:
        title = f"tiny MoE ({short}), Python stdlib text"
        plot(full, compressed, a.png, setting["labels"], title)
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=1))


if __name__ == "__main__":
    main()
