"""The job API over real gRPC against a real etcd: create, get, list, cancel, watch, the
error codes a client sees, bearer-token auth, health and reflection."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service._gen.megamoe.v1 import jobs_pb2 as pb
from service._gen.megamoe.v1 import jobs_pb2_grpc as pb_grpc
from service.manager import JobManager
from service.server import create_server
from service.store import JobStore
from tests.unit.test_job_spec import TINY
from trainer.elastic.etcd import Etcd
from trainer.elastic.keys import Keys

TOKEN = "s3cret-token"
AUTH = [("authorization", f"Bearer {TOKEN}")]


@pytest.fixture(scope="module")
def api(etcd_server):
    store = JobStore(Etcd(etcd_server.endpoint), Keys("/test-server"))
    running = create_server(JobManager(store), token=TOKEN)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield pb_grpc.JobServiceStub(channel), channel, store
    finally:
        channel.close()
        running.stop(1.0)


def spec(**fields):
    fields["overrides"] = ["parallel.n=2", *fields.get("overrides", [])]
    return pb.JobSpec(**{"config_toml": TINY, "num_nodes": 2, "procs_per_node": 1, **fields})


def create(stub, job_id="", **fields):
    return stub.CreateJob(pb.CreateJobRequest(spec=spec(**fields), job_id=job_id), metadata=AUTH)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert "Traceback" not in (err.value.details() or "")
    return err.value.code(), err.value.details()


@pytest.mark.timeout(60)
def test_create_get_and_list(api):
    stub, _, _ = api
    job = create(stub, "first-job")
    assert job.job_id == "first-job" and job.status.state == pb.PENDING
    again = stub.GetJob(pb.GetJobRequest(job_id="first-job"), metadata=AUTH)
    assert again.spec == job.spec
    auto = create(stub)
    assert auto.job_id.startswith("job-")
    listed = stub.ListJobs(pb.ListJobsRequest(page_size=1), metadata=AUTH)
    assert len(listed.jobs) == 1 and listed.next_page_token
    rest = stub.ListJobs(pb.ListJobsRequest(page_token=listed.next_page_token), metadata=AUTH)
    ids = {j.job_id for j in [*listed.jobs, *rest.jobs]}
    assert {"first-job", auto.job_id} <= ids


@pytest.mark.timeout(60)
def test_same_id_same_spec_is_idempotent_other_spec_already_exists(api):
    stub, _, _ = api
    create(stub, "idem")
    assert create(stub, "idem").job_id == "idem"
    code, details = code_of(lambda: create(stub, "idem", overrides=["train.steps=3"]))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "idem" in details


@pytest.mark.timeout(60)
def test_invalid_specs_and_unknown_ids(api):
    stub, _, _ = api
    code, details = code_of(lambda: create(stub, overrides=["parallel.n=two"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("spec.overrides[1]")
    code, details = code_of(lambda: create(stub, num_nodes=3))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("spec.num_nodes")
    code, details = code_of(lambda: create(stub, "Bad_Id"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("job_id")
    code, _ = code_of(lambda: stub.GetJob(pb.GetJobRequest(job_id="nope"), metadata=AUTH))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = code_of(lambda: stub.CancelJob(pb.CancelJobRequest(job_id="nope"), metadata=AUTH))
    assert code == grpc.StatusCode.NOT_FOUND


@pytest.mark.timeout(60)
def test_token_is_required_but_health_and_reflection_stay_open(api):
    stub, channel, _ = api
    code, details = code_of(lambda: stub.GetJob(pb.GetJobRequest(job_id="x")))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "missing bearer token" in details
    bad = [("authorization", "Bearer wrong")]
    code, details = code_of(lambda: stub.GetJob(pb.GetJobRequest(job_id="x"), metadata=bad))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "wrong bearer token" in details
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="megamoe.v1.JobService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = reflect.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for a in answers for s in a.list_services_response.service}
    assert "megamoe.v1.JobService" in names


@pytest.mark.timeout(60)
def test_watch_streams_history_then_live_events_and_resumes_after_a_seq(api):
    stub, _, store = api
    create(stub, "watched")
    for i in range(3):
        store.append_event(
            "watched", pb.JobEvent(type="note", message=f"event {i}", state=pb.PENDING)
        )
    stream = stub.WatchJob(pb.WatchJobRequest(job_id="watched"), metadata=AUTH)
    first = [next(stream) for _ in range(3)]
    assert [e.seq for e in first] == [1, 2, 3]
    store.append_event("watched", pb.JobEvent(type="state", message="done", state=pb.SUCCEEDED))
    live = list(stream)  # the stream ends with the terminal event
    assert [(e.seq, e.state) for e in live] == [(4, pb.SUCCEEDED)]
    resumed = list(stub.WatchJob(pb.WatchJobRequest(job_id="watched", after_seq=2), metadata=AUTH))
    assert [e.seq for e in resumed] == [3, 4]


@pytest.mark.timeout(60)
def test_cancel_records_a_request_and_is_idempotent(api):
    stub, _, store = api
    create(stub, "to-cancel")
    for _ in range(2):
        job = stub.CancelJob(pb.CancelJobRequest(job_id="to-cancel"), metadata=AUTH)
        assert job.job_id == "to-cancel"
    assert store.view("to-cancel").cancel
