"""Jobs through the control plane, end to end: a real `megamoe serve` (embedded etcd, the
reconciler, the local executor) runs real torchrun agents and workers. A 2 x 2 job trains
exactly like `megamoe train --nproc 4`; its events stream live and resume after a sequence
number; logs, cancel and a failing worker behave as a user expects."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from service._gen.megamoe.v1 import jobs_pb2 as pb
from service._gen.megamoe.v1 import jobs_pb2_grpc as pb_grpc
from service.executor import job_processes as processes
from tests.e2e.conftest import ROOT, megamoe
from tests.integration.conftest import REFERENCE_SETS, REFERENCE_STEPS, running_serve
from tests.procs import kill_group, start, wait_until

CONFIG = (ROOT / "configs/tiny.toml").read_text()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    state = tmp_path_factory.mktemp("service") / "state"
    with running_serve(state) as (_, address):
        channel = grpc.insecure_channel(address)
        try:
            yield pb_grpc.JobServiceStub(channel), address, state
        finally:
            channel.close()


def _create(stub, job_id, nodes, procs, *overrides):
    spec = pb.JobSpec(
        config_toml=CONFIG, overrides=list(overrides), num_nodes=nodes, procs_per_node=procs
    )
    return stub.CreateJob(pb.CreateJobRequest(spec=spec, job_id=job_id), timeout=30)


def _watch(stub, job_id, after=0):
    """Every event of the stream with the time it arrived."""
    request = pb.WatchJobRequest(job_id=job_id, after_seq=after)
    return [(event, time.time()) for event in stub.WatchJob(request, timeout=300)]


@pytest.mark.timeout(420)
def test_two_nodes_of_two_processes_train_like_four_local_ranks(service, demo_data, reference_4):
    stub, address, _ = service
    sets = [*REFERENCE_SETS, f"data.path={demo_data}", "checkpoint.interval=2"]
    created = _create(stub, "four", 2, 2, *sets)
    assert created.status.state == pb.PENDING

    received = _watch(stub, "four")
    events = [event for event, _ in received]
    job = stub.GetJob(pb.GetJobRequest(job_id="four"), timeout=30)
    assert job.status.state == pb.SUCCEEDED, job.status.message
    assert events[-1].state == pb.SUCCEEDED
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["created", "state"] and kinds.count("node_exited") == 2
    assert [e.details["step"] for e in events if e.type == "checkpoint"] == ["2", "4"]
    # live: the job's start reached the watcher before the job had ended
    started_at = next(t for e, t in received if e.type == "state" and e.state == pb.RUNNING)
    assert started_at < job.status.end_time.ToNanoseconds() / 1e9

    summary = json.loads(Path(job.status.summary_path).read_text())
    assert summary["layout"]["world"] == 4
    assert summary["losses"] == reference_4["losses"]  # step for step, bit for bit
    assert job.status.final_loss == reference_4["final_loss"]
    assert job.status.step == REFERENCE_STEPS == job.status.total_steps
    assert job.status.last_checkpoint_step == REFERENCE_STEPS
    assert [n.state for n in job.status.nodes] == [pb.NODE_SUCCEEDED] * 2

    # a watch resumed after seq 2 gets exactly the events after it
    resumed = [event for event, _ in _watch(stub, "four", after=2)]
    assert [e.SerializeToString() for e in resumed] == [e.SerializeToString() for e in events[2:]]

    got = megamoe("job", "get", "four", "--server", address, "--json")
    assert got.returncode == 0, got.stderr
    shown = json.loads(got.stdout)
    assert shown["state"] == "SUCCEEDED" and shown["final_loss"] == reference_4["final_loss"]
    assert shown["summary_path"] == job.status.summary_path
    assert [n["exit_code"] for n in shown["nodes"]] == [0, 0]

    logs = [megamoe("job", "logs", "four", "--node", str(k), "--server", address) for k in (0, 1)]
    assert all(res.returncode == 0 for res in logs), [res.stderr for res in logs]
    for k, res in enumerate(logs):
        assert f"=== megamoe: node {k} of four" in res.stdout
    both = logs[0].stdout + logs[1].stdout
    assert both.count(f"step 1/{REFERENCE_STEPS}") == 1  # global rank 0 prints, once
    tail = megamoe("job", "logs", "four", "--node", "0", "--tail", "2", "--server", address)
    assert tail.stdout.splitlines() == logs[0].stdout.splitlines()[-2:]

    listed = stub.ListJobs(pb.ListJobsRequest(state=pb.SUCCEEDED), timeout=30)
    assert "four" in {j.job_id for j in listed.jobs}
    running = stub.ListJobs(pb.ListJobsRequest(state=pb.RUNNING), timeout=30)
    assert "four" not in {j.job_id for j in running.jobs}


@pytest.mark.timeout(300)
def test_cancel_mid_run_stops_every_process_and_ends_a_followed_log(service, demo_data, tmp_path):
    stub, address, _ = service
    _create(stub, "to-stop", 2, 1, "parallel.n=2", f"data.path={demo_data}", "train.steps=5000")

    def step():
        return stub.GetJob(pb.GetJobRequest(job_id="to-stop"), timeout=30).status.step

    wait_until(lambda: step() >= 2, 180, "two steps of the job")
    assert len(processes("to-stop")) >= 6  # per node: its shell, agent and worker
    follow_log = tmp_path / "follow.txt"
    command = [sys.executable, "-m", "service.cli", "job", "logs", "to-stop", "--follow"]
    follower = start([*command, "--server", address], follow_log)
    try:
        res = megamoe("job", "cancel", "to-stop", "--server", address)
        assert res.returncode == 0 and "cancel requested" in res.stdout, res.stderr
        state = lambda: stub.GetJob(pb.GetJobRequest(job_id="to-stop"), timeout=30).status  # noqa: E731
        wait_until(lambda: state().state == pb.CANCELLED, 60, "CANCELLED")
        assert processes("to-stop") == []
        assert [n.state for n in state().nodes] == [pb.NODE_STOPPED] * 2
        assert follower.wait(timeout=30) == 0  # --follow ends once the node has stopped
    finally:
        if follower.poll() is None:
            kill_group(follower)
    assert "=== megamoe: node 0 of to-stop" in follow_log.read_text()
    again = megamoe("job", "cancel", "to-stop", "--server", address)
    assert again.returncode == 0 and "already CANCELLED" in again.stdout
    events = [event for event, _ in _watch(stub, "to-stop")]
    assert (events[-1].type, events[-1].state) == ("state", pb.CANCELLED)


@pytest.mark.timeout(180)
def test_a_failing_worker_fails_the_job_naming_its_node_and_error(service):
    stub, _, _ = service
    _create(stub, "no-data", 2, 1, "parallel.n=2", "data.path=/nonexistent/corpus")
    events = [event for event, _ in _watch(stub, "no-data")]
    status = stub.GetJob(pb.GetJobRequest(job_id="no-data"), timeout=30).status
    assert status.state == pb.FAILED
    assert status.message.startswith("node ")
    assert "exited with code 1: megamoe: error: prepared data directory /nonexistent/corpus" in (
        status.message
    )
    exits = [e for e in events if e.type == "node_exited"]
    assert exits and {e.details["exit_code"] for e in exits} == {"1"}
    # a node that had not failed yet when the first did is stopped with the job
    assert {n.state for n in status.nodes} <= {pb.NODE_FAILED, pb.NODE_STOPPED}
    assert processes("no-data") == []


@pytest.mark.timeout(180)
def test_a_one_process_job_runs_without_a_process_group(service, demo_data):
    stub, _, _ = service
    _create(stub, "solo", 1, 1, f"data.path={demo_data}", "train.steps=2")
    events = [event for event, _ in _watch(stub, "solo")]
    status = stub.GetJob(pb.GetJobRequest(job_id="solo"), timeout=30).status
    assert status.state == pb.SUCCEEDED, status.message
    assert events[-1].state == pb.SUCCEEDED
    summary = json.loads(Path(status.summary_path).read_text())
    assert summary["layout"]["world"] == 1 and len(summary["losses"]) == 2
    assert status.final_loss == summary["final_loss"]


def test_job_processes_finds_a_process_by_its_marker():
    """The helper the cancel test relies on sees a marked process and only that."""
    marked = subprocess.Popen(["sleep", "30"], env={**os.environ, "MEGAMOE_JOB_ID": "marker-t"})
    try:
        # until it has exec'd, the child's /proc environ is still the parent's
        deadline = time.monotonic() + 10
        while processes("marker-t") != [marked.pid] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes("marker-t") == [marked.pid]
    finally:
        marked.kill()
        marked.wait()
