"""The committed gRPC stubs are what `make proto` generates from proto/ today."""

import pytest

from service.protos import OUT_DIR, generate


@pytest.mark.timeout(120)
def test_committed_stubs_are_not_stale(tmp_path):
    fresh = {p.relative_to(tmp_path): p.read_text() for p in generate(tmp_path)}
    committed = {p.relative_to(OUT_DIR): p.read_text() for p in OUT_DIR.rglob("*.py*")}
    committed = {k: v for k, v in committed.items() if "__pycache__" not in str(k)}
    assert sorted(fresh) == sorted(committed), "run `make proto` and commit service/_gen"
    stale = [str(k) for k in fresh if fresh[k] != committed[k]]
    assert not stale, f"stale stubs {stale}: run `make proto` and commit service/_gen"


def test_the_service_is_in_the_generated_module():
    from service._gen.megamoe.v1 import jobs_pb2, jobs_pb2_grpc

    service = jobs_pb2.DESCRIPTOR.services_by_name["JobService"]
    assert service.full_name == "megamoe.v1.JobService"
    assert {m.name for m in service.methods} == {
        "CreateJob",
        "GetJob",
        "ListJobs",
        "CancelJob",
        "WatchJob",
        "GetJobLogs",
    }
    assert hasattr(jobs_pb2_grpc, "JobServiceServicer")
