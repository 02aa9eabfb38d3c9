"""`megamoe train` as the workers of a plain torchrun (2 agents x 2 processes, the etcd-v3
rendezvous), no control plane: one world of 4 that trains exactly like `--nproc 4`."""

import json
import sys
import uuid
from pathlib import Path

import pytest

from tests.e2e.conftest import megamoe
from trainer.elastic.server import start_etcd

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
STEPS = 4


def _sets(demo_data):
    sets = [f"data.path={demo_data}", f"train.steps={STEPS}", "parallel.n=2", "parallel.dp=2"]
    return [x for s in sets for x in ("--set", s)]


@pytest.mark.timeout(300)
def test_two_torchrun_agents_train_like_four_local_ranks(demo_data, sessions, tmp_path):
    ref_summary = tmp_path / "ref.json"
    train = ["train", "--config", "configs/tiny.toml", *_sets(demo_data)]
    res = megamoe(*train, "--nproc", "4", "--summary-json", str(ref_summary), timeout=280)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = tmp_path / "torchrun.json"
    with start_etcd(tmp_path / "etcd") as etcd:
        rdzv = [
            "--rdzv-backend=etcd-v3",
            f"--rdzv-endpoint={etcd.endpoint}",
            f"--rdzv-id=worker-{uuid.uuid4().hex[:8]}",
            "--rdzv-conf=join_timeout=120",
        ]
        agent = [TORCHRUN, "--nnodes=2", "--nproc-per-node=2", *rdzv, "--local-addr=127.0.0.1"]
        worker = ["--no-python", sys.executable, "-m", "service.cli", *train]
        command = [*agent, "--max-restarts=0", *worker, "--summary-json", str(summary)]
        logs = [tmp_path / f"agent{i}.log" for i in range(2)]
        agents = [sessions(command, log) for log in logs]
        codes = [a.wait(timeout=240) for a in agents]
    output = "\n".join(log.read_text()[-3000:] for log in logs)
    assert codes == [0, 0], output
    assert output.count(f"step 1/{STEPS}") == 1  # one progress display, from global rank 0
    got, want = json.loads(summary.read_text()), json.loads(ref_summary.read_text())
    assert got["layout"]["world"] == 4
    assert got["losses"] == want["losses"]
