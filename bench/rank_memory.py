"""Peak memory of building one rank's model: only its share, against the whole reference cut.

    python bench/rank_memory.py [--hidden 1024 --ffn 4096 --experts 16 --layers 8 \\
        --vocab 32000 --n 4 --pp 2] [--json FILE]
    python bench/rank_memory.py --config configs/internal-352b.toml --layers 2 --pp 1 \\
        --alone-only [--json FILE]

With ``--config`` the model's shapes and n come from the file (``--layers`` and ``--pp``
still apply, dp is 1); ``--alone-only`` skips the ``cut`` build, which for a slice of
Internal-352B would need the whole slice (47 GB for 2 layers) in memory.

Each way runs in a fresh process that builds rank 0 of stage 0 and reports its peak
resident set (``ru_maxrss``) above what the process held before building: ``alone`` is
``build_parallel_model`` (meta layout, each local tensor drawn alone), ``cut`` builds the
whole reference model and takes the share from it (what ranks did before). The share's own
size (its fp32 parameters) and the whole model's are printed beside them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.atomic import write_json_atomic

CHILD = r"""
import json, resource, sys, torch
from trainer.config import loads
from trainer.model.transformer import MoETransformer
from trainer.parallel.comm import Comm
from trainer.parallel.model import ParallelMoE, build_parallel_model
way, sets, text = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
cfg = loads(text, sets)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
comm = Comm(None, 0, cfg.parallel.n)
if way == "alone":
    model = build_parallel_model(cfg, comm, 0, torch.device("cpu"), stage=0)
else:
    torch.manual_seed(cfg.train.seed)
    whole = MoETransformer(cfg.model, groups=cfg.parallel.n)
    model = ParallelMoE(cfg, comm, 0, whole, 0, cfg.parallel.pp)
    full = sum(p.numel() for p in whole.parameters()) * 4
    del whole
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
share = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"peak_bytes": peak - before, "share_bytes": share}))
"""


def measure(way: str, sets: list[str], text: str = "") -> dict:
    res = subprocess.run(
        [sys.executable, "-c", CHILD, way, json.dumps(sets), text],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=Path(__file__).resolve().parents[1],
    )
    if res.returncode != 0:
        raise SystemExit(f"rank_memory: the {way} build failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sizes = {"--hidden": 1024, "--ffn": 4096, "--experts": 16, "--layers": 8, "--vocab": 32000}
    for flag, default in {**sizes, "--n": 4, "--pp": 2}.items():
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--json", default=None)
    p.add_argument("--config", default=None, help="model shapes and n from this TOML file")
    p.add_argument("--alone-only", action="store_true", help="skip the whole-reference build")
    a = p.parse_args()
    if a.config:
        return _from_config(a)
    sets = [
        f"model.hidden={a.hidden}",
        f"model.ffn_hidden={a.ffn}",
        f"model.experts={a.experts}",
        f"model.layers={a.layers}",
        f"model.vocab_size={a.vocab}",
        f"model.heads={a.hidden // 64}",
        f"model.kv_heads={a.hidden // 256}",
        f"parallel.n={a.n}",
        f"parallel.pp={a.pp}",
        f"train.micro_batch={a.pp}",
        f"train.global_batch={a.pp}",
    ]
    alone, cut = measure("alone", sets), measure("cut", sets)
    share = alone["share_bytes"]
    result = {"args": vars(a), "alone": alone, "cut": cut, "share_bytes": share}
    gib = 2**30
    print(
        f"rank 0, stage 0 of n={a.n} pp={a.pp} (hidden {a.hidden}, {a.experts} experts, "
        f"{a.layers} layers): share {share / gib:.2f} GiB; peak while building: alone "
        f"{alone['peak_bytes'] / gib:.2f} GiB ({alone['peak_bytes'] / share:.2f}x the share), "
        f"cut from the whole reference {cut['peak_bytes'] / gib:.2f} GiB "
        f"({cut['peak_bytes'] / share:.2f}x)"
    )
    _write(a.json, result)


def _write(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, result)


def _from_config(a) -> None:
    from trainer.config import loads
    from trainer.model.flops import total_params

    text = Path(a.config).read_text()
    sets = [
        f"model.layers={a.layers}",
        f"parallel.pp={a.pp}",
        "parallel.dp=1",
        f"train.micro_batch={a.pp}",
        f"train.global_batch={a.pp}",
    ]
    cfg = loads(text, sets)
    alone = measure("alone", sets, text)
    cut = None if a.alone_only else measure("cut", sets, text)
    share, whole = alone["share_bytes"], total_params(cfg.model) * 4
    gib = 2**30
    result = {
        "args": vars(a),
        "alone": alone,
        "cut": cut,
        "share_bytes": share,
        "whole_model_bytes": whole,
    }
    print(
        f"rank 0, stage 0 of {a.config} with {a.layers} layers at n={cfg.parallel.n} "
        f"pp={a.pp}: share {share / gib:.2f} GiB of a {whole / gib:.1f} GiB model; peak "
        f"while building alone {alone['peak_bytes'] / gib:.2f} GiB "
        f"({alone['peak_bytes'] / share:.2f}x the share, "
        f"{alone['peak_bytes'] / whole:.2f}x the model)"
    )
    _write(a.json, result)


if __name__ == "__main__":
    main()
