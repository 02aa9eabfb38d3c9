"""What every training process pays to start and to exit: no torch.compile machinery
loaded by building a rank and running its optimizer (trainer.optim), and the objects
frozen for the garbage collector at exit with nothing lost (trainer.quickexit).

Both probes run in fresh interpreters: which modules are loaded and what runs at exit
are per process."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import torch

from trainer.optim import adamw

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def _pair(seed: int):
    torch.manual_seed(seed)
    values = [torch.randn(6, 4), torch.randn(6), torch.randn(3, 6)]
    return [torch.nn.Parameter(v.clone()) for v in values]


def _groups(params):
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def _steps(opt, params, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        opt.zero_grad()


def test_adamw_updates_exactly_as_torchs_and_their_states_load_into_each_other():
    ours_p, torchs_p = _pair(0), _pair(0)
    ours = adamw(_groups(ours_p), 1e-2, (0.9, 0.95))
    torchs = torch.optim.AdamW(_groups(torchs_p), lr=1e-2, betas=(0.9, 0.95), foreach=True)
    _steps(ours, ours_p, 4, seed=1)
    _steps(torchs, torchs_p, 4, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(ours_p, torchs_p, strict=True))
    # a checkpoint of one continues in the other, bit for bit
    ours.load_state_dict(copy.deepcopy(torchs.state_dict()))  # loading aliases tensors
    _steps(ours, ours_p, 2, seed=2)
    _steps(torchs, torchs_p, 2, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(ours_p, torchs_p, strict=True))
    assert ours.state_dict()["state"][0]["step"] == torchs.state_dict()["state"][0]["step"] == 6


RANK_PROBE = """
import json, sys
import torch
from trainer.config import load
from trainer.optim import adamw
from trainer.parallel.loopback import LoopbackComm
from trainer.parallel.model import build_parallel_model
from trainer.train import build_model, build_optimizer

cfg = load("configs/tiny.toml", ["parallel.n=2"])
loaded = {}
# a rank's share, laid out on the meta device and drawn, and its optimizer
share = build_parallel_model(cfg, LoopbackComm(2), 0, torch.device("cpu"))
opt = adamw([{"params": list(share.parameters()), "weight_decay": 0.1}], 1e-3, (0.9, 0.95))
sum(p.float().sum() for p in share.parameters()).backward()
opt.step()
opt.zero_grad()
opt.load_state_dict(opt.state_dict())
loaded["rank"] = "torch._dynamo" in sys.modules
# the single-process model and its optimizer
ref = build_model(cfg, torch.device("cpu"))
ropt = build_optimizer(ref, cfg.train)
ref.head.weight.sum().backward()
ropt.step()
ropt.load_state_dict(ropt.state_dict())
loaded["reference"] = "torch._dynamo" in sys.modules
print(json.dumps(loaded))
"""


def test_building_a_rank_and_stepping_its_optimizer_loads_no_compiler():
    # torch.compile's machinery costs about 1.1 s of CPU to import, in every rank, at
    # every start and restart; a torch upgrade that brings the import back fails here
    out = _python(RANK_PROBE)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"rank": False, "reference": False}


EXIT_PROBE = """
import atexit, gc, sys
import torch
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count(), flush=True))
from trainer.quickexit import freeze_at_exit
freeze_at_exit()
freeze_at_exit()
log = open(sys.argv[1], "w")
log.write("written, never closed nor flushed by the program")
print("buffered output", end="")
"""


def test_objects_are_frozen_at_exit_and_nothing_written_is_lost(tmp_path):
    log = tmp_path / "log.txt"
    out = subprocess.run(
        [sys.executable, "-c", EXIT_PROBE, str(log)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # the handler registered before freeze_at_exit runs after it (atexit is last-in,
    # first-out): torch's objects are out of the exit's garbage collection by then
    assert out.stdout.startswith("buffered output")
    frozen = int(out.stdout.split("frozen at exit:")[1])
    assert frozen > 50_000, out.stdout
    assert log.read_text() == "written, never closed nor flushed by the program"


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_the_launchers_rendezvous_store_listens_on_loopback_only():
    from trainer.parallel.spawn import launcher_store

    store = launcher_store()
    client = torch.distributed.TCPStore("127.0.0.1", store.port, is_master=False)
    client.set("rank", "1")
    assert store.get("rank") == b"1"
    assert _listening_addresses(store.port) == {"0100007F"}  # 127.0.0.1, nothing else
    port = store.port
    del client, store
    assert _listening_addresses(port) == set()  # the store closed the socket it was handed
