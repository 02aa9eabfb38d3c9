"""`megamoe train` as the workers of a plain torchrun (2 agents x 2 processes, the etcd-v3
rendezvous), no control plane: one world of 4 that trains exactly like `--nproc 4`."""

import json
import sys
import uuid
from pathlib import Path

import pytest

from tests.integration.conftest import REFERENCE_SETS, REFERENCE_STEPS
from trainer.elastic.server import start_etcd

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


@pytest.mark.timeout(400)
def test_two_torchrun_agents_train_like_four_local_ranks(
    demo_data, reference_4, sessions, tmp_path
):
    sets = [*REFERENCE_SETS, f"data.path={demo_data}"]
    train = ["train", "--config", "configs/tiny.toml", *[x for s in sets for x in ("--set", s)]]
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
    assert output.count(f"step 1/{REFERENCE_STEPS}") == 1  # one progress display, from rank 0
    got, want = json.loads(summary.read_text()), reference_4
    assert got["layout"]["world"] == 4
    assert got["losses"] == want["losses"]
