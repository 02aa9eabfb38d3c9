"""How long `megamoe train --nproc N` takes to start its ranks and to exit, around a few steps.

    python bench/startup.py [--nproc 2 4] [--repeats 5] [--steps 4] [--json FILE]

Runs ``configs/tiny.toml`` on the prepared demo corpus (``make demo`` or
``megamoe data prepare --stdlib --output data/demo``) as a user would, one
fresh command after another, and reads the time of each line the command
prints. Reported per ``--nproc``, medians over the repeats: seconds from the
command's start to its banner (the ranks are up and have built their model),
to its first step, and from its last line ("done: ...") to the command's exit;
and the whole wall time. Every start and every restart of a run pays these
seconds, and so does each test that runs the trainer.

The command runs from this checkout (``python -m service.cli``, working directory
the checkout's root), so the same script measures another tree when copied there.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._deps import require_corpus  # noqa: E402
from trainer.atomic import write_json_atomic  # noqa: E402


def one_run(nproc: int, steps: int, data: Path) -> dict:
    sets = [f"data.path={data}", f"train.steps={steps}", f"parallel.n={nproc}"]
    argv = [sys.executable, "-u", "-m", "service.cli", "train", "--config", "configs/tiny.toml"]
    argv += ["--nproc", str(nproc)]
    for s in sets:
        argv += ["--set", s]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    marks: dict[str, float] = {}
    lines = []
    for line in proc.stdout:
        now = time.perf_counter() - start
        lines.append(line)
        if line.startswith("megamoe:"):
            marks.setdefault("banner_s", now)
        elif line.startswith("step "):
            marks.setdefault("first_step_s", now)
        elif line.startswith("done:"):
            marks["done_s"] = now
    code = proc.wait()
    wall = time.perf_counter() - start
    if code != 0 or len(marks) != 3:
        raise SystemExit(f"megamoe train --nproc {nproc} failed ({code}):\n" + "".join(lines[-20:]))
    return {**marks, "exit_after_done_s": wall - marks["done_s"], "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--data", default=str(ROOT / "data/demo"))
    p.add_argument("--json", default=None)
    a = p.parse_args()
    require_corpus(a.data)
    data = Path(a.data)
    results = {}
    for nproc in a.nproc:
        runs = []
        for r in range(a.repeats):
            runs.append(one_run(nproc, a.steps, data))
            print(
                f"  --nproc {nproc} run {r + 1}/{a.repeats}: {runs[-1]['wall_s']:.2f} s", flush=True
            )
        med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        results[str(nproc)] = {"median": med, "runs": runs}
        print(
            f"--nproc {nproc}: banner {med['banner_s']:.2f} s, first step "
            f"{med['first_step_s']:.2f} s, exit {med['exit_after_done_s']:.2f} s after the last "
            f"line, wall {med['wall_s']:.2f} s (medians of {a.repeats})",
            flush=True,
        )
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(a.json, {"args": vars(a), "results": results})


if __name__ == "__main__":
    main()
