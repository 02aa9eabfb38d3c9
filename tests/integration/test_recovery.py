"""Faults injected into live jobs with real signals: a killed worker, a killed torchrun
agent, a killed control plane, an etcd restart, a worker that keeps dying, a corrupt newest
checkpoint, cancels at every stage. Real etcd, real `megamoe serve`, real torchrun; every
recovered job must end with exactly the losses of an uninterrupted run."""

import json
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from service._gen.megamoe.v1 import jobs_pb2 as pb
from service._gen.megamoe.v1 import jobs_pb2_grpc as pb_grpc
from service.executor import job_processes as processes
from tests.e2e.conftest import ROOT
from tests.integration.conftest import reference_run, running_serve, start_serve
from tests.procs import kill_group, wait_until
from trainer.elastic.server import start_etcd

CONFIG = (ROOT / "configs/tiny.toml").read_text()
STEPS = 60
# 2 nodes x 1 process (n=2); a bigger batch than the demo's so a job lasts ~20 s on 2 cores
SETS = ["parallel.n=2", f"train.steps={STEPS}", "train.global_batch=32"]


@pytest.fixture(scope="module")
def reference(demo_data, tmp_path_factory):
    """The uninterrupted run (`megamoe train --nproc 2`) every recovered job must equal."""
    sets = [*SETS, f"data.path={demo_data}"]
    return reference_run(sets, 2, tmp_path_factory.mktemp("recovery-ref"))


@pytest.fixture(scope="module")
def etcd(etcd_server):
    return etcd_server


@pytest.fixture(scope="module")
def service(etcd, tmp_path_factory):
    state = tmp_path_factory.mktemp("recovery") / "state"
    with running_serve(state, "--etcd", etcd.endpoint, "--prefix", "/recovery") as (_, address):
        channel = grpc.insecure_channel(address)
        try:
            yield pb_grpc.JobServiceStub(channel), state
        finally:
            channel.close()


def create(stub, job_id, demo_data, *extra, max_restarts=2, backoff=0.5):
    spec = pb.JobSpec(
        config_toml=CONFIG,
        overrides=[*SETS, f"data.path={demo_data}", *extra],
        num_nodes=2,
        procs_per_node=1,
        restart=pb.RestartPolicy(max_restarts=max_restarts, backoff_seconds=backoff),
    )
    return stub.CreateJob(pb.CreateJobRequest(spec=spec, job_id=job_id), timeout=30)


def status(stub, job_id):
    return stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=30).status


def wait_for_step(stub, job_id, step, timeout=180):
    wait_until(lambda: status(stub, job_id).step >= step, timeout, f"{job_id} at step {step}")


def finish(stub, job_id, timeout=300):
    """Every event of the job, to its end."""
    request = pb.WatchJobRequest(job_id=job_id)
    return list(stub.WatchJob(request, timeout=timeout))


def assert_recovered(stub, job_id, events, reference):
    """SUCCEEDED, and from the resumed step on exactly the uninterrupted run's losses."""
    final = status(stub, job_id)
    assert final.state == pb.SUCCEEDED, final.message
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    summary = json.loads(Path(final.summary_path).read_text())
    resumed = summary["resumed_from"]["step"] if summary["resumed_from"] else 0
    assert summary["losses"] == reference["losses"][resumed:]  # bit for bit
    assert final.final_loss == reference["final_loss"]
    return final, summary


def kinds(events):
    return [e.type for e in events]


@pytest.mark.timeout(400)
def test_a_killed_worker_is_replaced_and_the_run_resumes_exactly(service, demo_data, reference):
    stub, _ = service
    create(stub, "kill-worker", demo_data, "checkpoint.interval=5")
    wait_for_step(stub, "kill-worker", 12)
    (worker,) = processes("kill-worker", node=1, kind="worker")
    os.kill(worker, signal.SIGKILL)
    events = finish(stub, "kill-worker")
    final, summary = assert_recovered(stub, "kill-worker", events, reference)
    assert summary["resumed_from"]["step"] >= 10
    assert final.restarts == 1 and final.generation == 1
    story = [k for k in kinds(events) if k in ("restarting", "restarted", "resumed")]
    assert story == ["restarting", "restarted", "resumed"]
    assert kinds(events).index("node_exited") < kinds(events).index("restarting")
    restarting = next(e for e in events if e.type == "restarting")
    assert "attempt 1 of 2" in restarting.message and "node 1" in restarting.message
    resumed = next(e for e in events if e.type == "resumed")
    assert resumed.details["resumed_step"] == str(summary["resumed_from"]["step"])
    assert float(resumed.details["recovery_s"]) > 0
    assert processes("kill-worker") == []


@pytest.mark.timeout(400)
def test_a_killed_torchrun_agent_is_replaced_with_its_orphaned_worker(
    service, demo_data, reference
):
    stub, _ = service
    create(stub, "kill-agent", demo_data, "checkpoint.interval=5")
    wait_for_step(stub, "kill-agent", 12)
    (agent,) = processes("kill-agent", node=0, kind="agent")
    os.kill(agent, signal.SIGKILL)
    events = finish(stub, "kill-agent")
    assert_recovered(stub, "kill-agent", events, reference)
    exited = next(e for e in events if e.type == "node_exited")
    assert exited.node == 0 and "SIGKILL" in exited.message
    assert processes("kill-agent") == []  # the worker the agent left behind is gone too


@pytest.mark.timeout(300)
def test_a_worker_that_keeps_dying_fails_the_job_after_max_restarts(service):
    stub, _ = service
    spec_data = "/nonexistent/corpus"
    create(stub, "keeps-dying", spec_data, max_restarts=2, backoff=0.2)
    events = finish(stub, "keeps-dying")
    final = status(stub, "keeps-dying")
    assert final.state == pb.FAILED and final.restarts == 2
    assert kinds(events).count("restarting") == 2
    assert "exited with code 1: megamoe: error: prepared data directory" in final.message
    assert "after 2 restart(s)" in final.message and final.message.startswith("node ")


@pytest.mark.timeout(400)
def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(service, demo_data, reference):
    stub, state = service
    create(stub, "corrupt", demo_data, "checkpoint.interval=5", "checkpoint.keep=3")
    wait_until(lambda: status(stub, "corrupt").last_checkpoint_step >= 10, 180, "two checkpoints")
    newest = Path(status(stub, "corrupt").last_checkpoint)
    (worker,) = processes("corrupt", node=1, kind="worker")
    os.kill(worker, signal.SIGSTOP)  # hold training while the checkpoint is damaged
    for data in sorted(newest.glob("*.distcp")):
        data.write_bytes(data.read_bytes()[: len(data.read_bytes()) // 2])
    os.kill(worker, signal.SIGKILL)
    events = finish(stub, "corrupt")
    _, summary = assert_recovered(stub, "corrupt", events, reference)
    assert summary["resumed_from"]["step"] < int(newest.name.split("-")[1])
    log = (state / "jobs/corrupt/node-0.log").read_text() + (
        state / "jobs/corrupt/node-1.log"
    ).read_text()
    assert f"checkpoint {newest}" in log and "falling back to the previous checkpoint" in log


@pytest.mark.timeout(300)
@pytest.mark.parametrize("moment", ["start-up", "training", "checkpoint-save"])
def test_cancel_leaves_no_process_behind(service, demo_data, moment):
    stub, _ = service
    job_id = f"cancel-{moment}"
    extra = ["checkpoint.interval=1"] if moment == "checkpoint-save" else []
    create(stub, job_id, demo_data, *extra)
    if moment != "start-up":
        wait_for_step(stub, job_id, 3)
    stub.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=30)
    wait_until(lambda: status(stub, job_id).state == pb.CANCELLED, 60, f"{job_id} CANCELLED")
    assert processes(job_id) == []
    assert finish(stub, job_id)[-1].state == pb.CANCELLED


@pytest.mark.timeout(400)
def test_a_killed_control_plane_comes_back_and_finishes_its_job(
    etcd, demo_data, reference, tmp_path
):
    state = tmp_path / "state"
    args = ("--etcd", etcd.endpoint, "--prefix", "/cp-restart")
    proc, address = start_serve(state, *args)
    try:
        stub = pb_grpc.JobServiceStub(grpc.insecure_channel(address))
        create(stub, "survivor", demo_data)
        wait_for_step(stub, "survivor", 5)
    finally:
        kill_group(proc)  # SIGKILL, the server only: the job's nodes live in their own sessions
    assert len(processes("survivor", kind="worker")) == 2
    time.sleep(2)  # the job trains on without a control plane
    with running_serve(state, *args) as (_, address):
        stub = pb_grpc.JobServiceStub(grpc.insecure_channel(address))
        events = finish(stub, "survivor")
        assert_recovered(stub, "survivor", events, reference)
        # no gap, no duplicate, no restart: the second control plane adopted the nodes
        assert kinds(events).count("created") == 1 and "restarting" not in kinds(events)
        assert kinds(events).count("node_exited") == 2
        assert processes("survivor") == []


@pytest.mark.timeout(400)
def test_an_etcd_restart_loses_nothing_and_the_api_says_unavailable_meanwhile(
    demo_data, reference, tmp_path
):
    data_dir = tmp_path / "etcd"
    etcd = start_etcd(data_dir)
    try:
        with running_serve(tmp_path / "state", "--etcd", etcd.endpoint) as (_, address):
            stub = pb_grpc.JobServiceStub(grpc.insecure_channel(address))
            create(stub, "through-outage", demo_data)
            wait_for_step(stub, "through-outage", 5)
            etcd.stop()
            codes, outage_end = [], time.monotonic() + 10
            while time.monotonic() < outage_end:
                try:
                    stub.GetJob(pb.GetJobRequest(job_id="through-outage"), timeout=10)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
                time.sleep(0.5)
            assert set(codes) == {grpc.StatusCode.UNAVAILABLE}, codes
            etcd = start_etcd(data_dir)  # the same data, the same port
            events = finish(stub, "through-outage")
            final, summary = assert_recovered(stub, "through-outage", events, reference)
            assert summary["resumed_from"] is None and final.restarts == 0  # it never stopped
    finally:
        etcd.stop()


@pytest.mark.timeout(300)
def test_a_rank_slowed_2x_is_reported_and_no_other(service, demo_data):
    stub, _ = service
    create(stub, "slow-report", demo_data, "fault.slow_rank=1", "fault.slow_factor=2")
    events = finish(stub, "slow-report")
    flagged = [e for e in events if e.type == "straggler"]
    assert [e.details["rank"] for e in flagged] == ["1"], [e.message for e in flagged]
    assert float(flagged[0].details["score"]) >= 5
    assert int(flagged[0].details["step"]) <= 20  # docs/OBSERVABILITY.md: within 20 steps here
    assert status(stub, "slow-report").state == pb.SUCCEEDED  # report only: nothing stopped


@pytest.mark.timeout(400)
def test_a_straggler_is_replaced_and_the_job_succeeds(service, demo_data, reference):
    stub, _ = service
    spec_sets = ("checkpoint.interval=5", "fault.slow_rank=0", "fault.slow_factor=2")
    spec = pb.JobSpec(
        config_toml=CONFIG,
        overrides=[*SETS, f"data.path={demo_data}", *spec_sets],
        num_nodes=2,
        procs_per_node=1,
        restart=pb.RestartPolicy(max_restarts=1, backoff_seconds=0.5),
        straggler=pb.STRAGGLER_REPLACE,
    )
    stub.CreateJob(pb.CreateJobRequest(spec=spec, job_id="slow-replace"), timeout=30)
    events = finish(stub, "slow-replace")
    final, _ = assert_recovered(stub, "slow-replace", events, reference)
    assert final.restarts == 1 and final.generation == 1
    story = [k for k in kinds(events) if k in ("straggler", "restarting", "restarted", "resumed")]
    assert story == ["straggler", "restarting", "restarted", "resumed"]
    straggler = next(e for e in events if e.type == "straggler")
    assert straggler.details["rank"] == "0" and "replacing its node" in straggler.message


@pytest.mark.timeout(400)
def test_a_hung_rank_is_named_within_the_timeout_and_the_job_recovers(
    service, demo_data, reference
):
    stub, _ = service
    timeout = 10
    extra = ("checkpoint.interval=5", "fault.hang_rank=1", "fault.hang_step=12")
    create(stub, "hung", demo_data, *extra, f"observe.hang_timeout_s={timeout}")
    wait_for_step(stub, "hung", 11)  # rank 1 stops before step 12
    last_step_seen = time.time()
    events = finish(stub, "hung")
    final, _ = assert_recovered(stub, "hung", events, reference)
    hang = next(e for e in events if e.type == "hang")
    # the etcd rendezvous orders the nodes as they join: rank 1 runs on node 0 or node 1
    assert hang.details["ranks"] == "1" and hang.node in (0, 1)
    assert hang.details["nodes"] == str(hang.node)
    assert f"rank 1 on node {hang.node}" in hang.message
    assert "did not reach collective" in hang.message
    # named after the timeout and within it plus a margin of 5 s (a step report takes up
    # to 1 s to arrive, the reconciler looks twice a second; docs/OBSERVABILITY.md)
    named_after = hang.time.ToNanoseconds() / 1e9 - last_step_seen
    assert timeout - 2 <= named_after <= timeout + 5, named_after
    assert final.restarts == 1
