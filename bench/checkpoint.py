"""What a checkpoint costs the training loop: blocked vs whole save time, and restore time.

    python bench/checkpoint.py [--which tiny,large] [--json bench/results/checkpoint.json]

For each model, in this one run, at n = 2 (2 local ranks, `megamoe train`):

1. the same steps without checkpoints and with a save every ``interval`` steps
   (the wall-time ratio is the whole cost of saving, CPU contention included:
   on a 2-core machine the background writer competes with the ranks);
2. per save: the seconds the loop was blocked (waiting for the previous save +
   copying the shard to host memory) against the save's whole time (until the
   manifest is committed), and the checkpoint's size;
3. a restore: `--resume-from` the last checkpoint, its load time.

``tiny`` is configs/tiny.toml; ``large`` is hidden 1024, 8 layers, 16 experts
(h_ffn 512), 227M parameters, 2.7 GB per checkpoint. The corpus is data/demo
(`make demo`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._deps import require_corpus
from trainer.atomic import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "tiny": {"steps": 12, "interval": 4, "sets": []},
    "large": {
        "steps": 6,
        "interval": 2,
        "sets": [
            *("model.hidden=1024", "model.layers=8", "model.heads=8", "model.kv_heads=4"),
            *("model.experts=16", "model.ffn_hidden=512", "train.global_batch=4"),
        ],
    },
}
SAVE_KEYS = ("step", "blocked_s", "staging_s", "waited_s", "write_s", "total_s", "committed")


def _train(tmp: Path, name: str, spec: dict, data: str, sets=(), flags=()) -> dict:
    summary = tmp / f"{name}.json"
    args = [sys.executable, "-m", "service.cli", "train", "--config", "configs/tiny.toml"]
    args += ["--nproc", "2", "--summary-json", str(summary), *flags]
    for s in (f"data.path={data}", f"train.steps={spec['steps']}", "parallel.n=2", *spec["sets"]):
        args += ["--set", s]
    for s in sets:
        args += ["--set", s]
    res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=3000)
    if res.returncode:
        raise SystemExit(f"{name} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return json.loads(summary.read_text())


def bench(which: str, data: str) -> dict:
    spec = MODELS[which]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ckpt = tmp / "ckpt"
        plain = _train(tmp, "plain", spec, data)
        sets = (f"checkpoint.dir={ckpt}", f"checkpoint.interval={spec['interval']}")
        saving = _train(tmp, "saving", spec, data, (*sets, "checkpoint.keep=1"))
        last = ckpt / f"step-{spec['steps']:08d}"
        size = json.loads((last / "manifest.json").read_text())["bytes"]
        restored = _train(tmp, "restore", spec, data, flags=("--resume-from", str(last)))
        shutil.rmtree(ckpt, ignore_errors=True)
    saves = saving["checkpoint"]["saves"]
    return {
        "model": which,
        "steps": spec["steps"],
        "interval": spec["interval"],
        "checkpoint_bytes": size,
        "wall_s_without": plain["wall_s"],
        "wall_s_with": saving["wall_s"],
        "wall_ratio": saving["wall_s"] / plain["wall_s"],
        "step_s_without": plain["step_time_s"],
        "step_s_with": saving["step_time_s"],
        "saves": [{k: s.get(k) for k in SAVE_KEYS} for s in saves],
        "blocked_s_median": statistics.median(s["blocked_s"] for s in saves),
        "total_s_median": statistics.median(s["total_s"] for s in saves),
        "restore_s": restored["resumed_from"]["restore_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--which", default="tiny,large", help="comma-separated: tiny, large")
    p.add_argument("--data", default="data/demo")
    p.add_argument("--json", default="bench/results/checkpoint.json")
    a = p.parse_args()
    require_corpus(a.data)
    rows = []
    for which in a.which.split(","):
        row = bench(which, a.data)
        rows.append(row)
        print(
            f"{which}: {row['checkpoint_bytes'] / 1e6:.1f} MB per checkpoint; per save blocked "
            f"{row['blocked_s_median'] * 1e3:.0f} ms of {row['total_s_median'] * 1e3:.0f} ms "
            f"({100 * row['blocked_s_median'] / row['total_s_median']:.1f} %); restore "
            f"{row['restore_s']:.2f} s; wall with/without saving {row['wall_ratio']:.2f}",
            flush=True,
        )
    write_json_atomic(a.json, {"rows": rows})


if __name__ == "__main__":
    main()
