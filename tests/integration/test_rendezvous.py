"""torchrun's etcd-v3 rendezvous against a real etcd: the backend's compare-and-set, the
store's c10d semantics, and two real torchrun agents forming one world of four workers
whose keys vanish with the run's lease after the agents exit."""

import json
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.procs import wait_until
from trainer.elastic.etcd import Etcd
from trainer.elastic.keys import Keys
from trainer.elastic.rendezvous import EtcdRendezvousBackend, EtcdStore, RunLease, run_lease_id

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
PREFIX = "/rdzv-test"

WORKER = """\
import json, os, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
if int(os.environ["WORLD_SIZE"]) != 4:
    sys.exit(f"WORLD_SIZE is {os.environ['WORLD_SIZE']}, expected 4")
total = torch.tensor([float(dist.get_rank())])
dist.all_reduce(total)
result = {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "sum": total.item()}
with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w") as fh:
    json.dump(result, fh)
dist.destroy_process_group()
"""


@pytest.fixture
def run(etcd_server):
    """(etcd, keys, run id, the run's lease) for a run id of the test's own."""
    etcd, keys, run_id = Etcd(etcd_server.endpoint), Keys(PREFIX), uuid.uuid4().hex
    lease_id = run_lease_id(keys, run_id)
    lease = RunLease(etcd, lease_id, ttl=30)
    yield etcd, keys, run_id, lease
    lease.close()  # no refresh thread outlives the test (nor the module's etcd)
    alive = [t.name for t in threading.enumerate() if t.name == f"etcd-lease-{lease_id:x}"]
    assert not alive, f"{alive} still refreshing after close()"


@pytest.mark.timeout(30)
def test_the_backend_sets_state_by_compare_and_set_on_the_revision(run):
    etcd, keys, run_id, lease = run
    backend = EtcdRendezvousBackend(etcd, keys.rdzv_state(run_id), lease)
    assert backend.get_state() is None
    state, token, written = backend.set_state(b"round 0")  # no token: only if absent
    assert (state, written) == (b"round 0", True)
    assert backend.set_state(b"someone else's round 0") == (b"round 0", token, False)
    state, newer, written = backend.set_state(b"round 1", token)
    assert (state, written) == (b"round 1", True) and newer > token
    # A node holding the old token loses and is handed the current state to retry from.
    assert backend.set_state(b"stale", token) == (b"round 1", newer, False)
    assert backend.set_state(b"foreign token", "not ours") == (b"round 1", newer, False)
    assert backend.get_state() == (b"round 1", newer)


@pytest.mark.timeout(60)
def test_the_store_behaves_like_c10d_through_torchs_prefix_store(run):
    etcd, keys, run_id, lease = run
    raw = EtcdStore(etcd, keys.rdzv_store(run_id), lease, timedelta(seconds=1))
    store = dist.PrefixStore("torch.rendezvous.run.0", raw)  # as torch's handler wraps it
    store.set("MASTER_ADDR", "127.0.0.1")
    assert store.get("MASTER_ADDR") == b"127.0.0.1"
    assert store.multi_get(["MASTER_ADDR"]) == [b"127.0.0.1"]
    assert etcd.get(keys.rdzv_store(run_id) + "torch.rendezvous.run.0/MASTER_ADDR")

    started = time.monotonic()
    with pytest.raises(dist.DistStoreError, match="not set in etcd store"):
        store.get("never set")  # after the store's timeout of 1 s, not before
    assert 1.0 <= time.monotonic() - started < 5.0

    # A blocked get returns as soon as another agent sets the key.
    setter = threading.Timer(0.3, store.set, args=("late", b"here"))
    setter.start()
    try:
        store.wait(["late"], timedelta(seconds=10))
    finally:
        setter.cancel()
    assert store.check(["late", "MASTER_ADDR"]) and not store.check(["late", "absent"])

    assert [store.add("members", 1) for _ in range(3)] == [1, 2, 3]
    assert store.compare_set("flag", "", "first") == b"first"  # empty expected: absent
    assert store.compare_set("flag", "wrong", "second") == b"first"
    assert store.compare_set("flag", "first", "second") == b"second"
    assert store.compare_set("missing", "x", "y") == b"x"  # c10d: absent returns expected
    assert store.num_keys() == 4  # MASTER_ADDR, late, members, flag
    assert store.delete_key("flag") and not store.check(["flag"])


@pytest.mark.timeout(120)
def test_two_torchrun_agents_form_one_world_over_etcd_v3(etcd_server, sessions, tmp_path):
    script, out = tmp_path / "worker.py", tmp_path / "out"
    script.write_text(WORKER)
    out.mkdir()
    run_id, keys, lease_ttl = f"rdzv-{uuid.uuid4().hex[:8]}", Keys(PREFIX), 5
    command = [
        TORCHRUN,
        "--nnodes=2",
        "--nproc-per-node=2",
        "--rdzv-backend=etcd-v3",
        f"--rdzv-endpoint={etcd_server.endpoint}",
        f"--rdzv-id={run_id}",
        f"--rdzv-conf=prefix={PREFIX},lease_ttl={lease_ttl},join_timeout=60",
        "--local-addr=127.0.0.1",
        "--max-restarts=0",
        "--no-python",
        sys.executable,
        str(script),
        str(out),
    ]
    logs = [tmp_path / f"agent{i}.log" for i in range(2)]
    processes = [sessions(command, log, OMP_NUM_THREADS="1") for log in logs]
    codes = [process.wait(timeout=90) for process in processes]
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)

    results = [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
    assert sorted(r["rank"] for r in results) == [0, 1, 2, 3]
    assert {(r["world_size"], r["sum"]) for r in results} == {(4, 6.0)}

    # The rendezvous went through etcd under the configured prefix ...
    etcd = Etcd(etcd_server.endpoint)
    assert etcd.get(keys.rdzv_state(run_id)) is not None
    store_keys = [key for key, _, _ in etcd.get_prefix(keys.rdzv_store(run_id))]
    assert any(key.endswith("/MASTER_ADDR") for key in store_keys), store_keys
    # ... and with its agents gone, the run's lease lapses and takes all its keys along.
    wait_until(
        lambda: etcd.get_prefix(keys.rdzv(run_id)) == [],
        lease_ttl + 10,
        "the run's keys vanishing with its lease",
    )
