"""`megamoe serve` as a user starts it: the embedded etcd, the `serving on` line, the
`megamoe job` commands, stock grpcurl through reflection, and a clean SIGTERM."""

import json
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, megamoe
from tests.integration.conftest import pids_mentioning, running_serve
from trainer.parallel.spawn import free_port

TOKEN = "t0ken-for-tests"


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_data):
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "token").write_text(TOKEN + "\n")
    state = tmp / "state"
    metrics = free_port()
    args = ("--token-file", str(tmp / "token"), "--metrics-port", str(metrics))
    with running_serve(state, *args) as (proc, address):
        proc.metrics_port = metrics
        yield proc, address, tmp, state, demo_data


def job(server, *args):
    _, address, tmp, _, _ = server
    return megamoe("job", *args, "--server", address, "--token-file", str(tmp / "token"))


@pytest.mark.timeout(120)
def test_submit_get_list_through_the_cli(server):
    cheap = ("--set", "train.steps=2", "--set", f"data.path={server[4]}")
    submit = ("submit", "--config", "configs/tiny.toml", "--set", "parallel.n=2", *cheap)
    res = job(server, *submit, "--nodes", "2", "--id", "cli-job", "--json")
    assert res.returncode == 0, res.stderr
    created = json.loads(res.stdout)
    assert created["job_id"] == "cli-job" and created["state"] == "PENDING"
    got = json.loads(job(server, "get", "cli-job", "--json").stdout)
    assert {"job_id", "state", "nodes", "step", "final_loss", "summary_path"} <= set(got)
    listed = json.loads(job(server, "list", "--json").stdout)
    assert "cli-job" in {j["job_id"] for j in listed}
    bad = job(server, *submit, "--nodes", "3")
    assert bad.returncode == 2 and "INVALID_ARGUMENT: spec.num_nodes" in bad.stderr
    no_token = megamoe("job", "get", "cli-job", "--server", server[1])
    assert no_token.returncode == 2 and "UNAUTHENTICATED" in no_token.stderr
    assert "Traceback" not in bad.stderr + no_token.stderr


@pytest.mark.timeout(120)
def test_grpcurl_lists_the_service_and_creates_a_job_from_json(server):
    grpcurl = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or "grpcurl"
    address = server[1]
    listing = subprocess.run(
        [grpcurl, "-plaintext", address, "list"], capture_output=True, text=True, timeout=60
    )
    assert listing.returncode == 0, listing.stderr
    assert "megamoe.v1.JobService" in listing.stdout.split()
    config = (ROOT / "configs/tiny.toml").read_text()
    cheap = ["train.steps=2", f"data.path={server[4]}"]
    spec = {"config_toml": config, "overrides": cheap, "num_nodes": 1, "procs_per_node": 1}
    body = json.dumps({"job_id": "from-grpcurl", "spec": spec})
    auth = f"authorization: Bearer {TOKEN}"
    method = "megamoe.v1.JobService/CreateJob"
    created = subprocess.run(
        [grpcurl, "-plaintext", "-H", auth, "-d", body, address, method],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    reply = json.loads(created.stdout)
    assert reply["job_id"] == "from-grpcurl" and reply["status"]["state"] == "PENDING"


@pytest.mark.timeout(120)
def test_the_control_plane_exports_jobs_by_state_and_api_latency(server):
    proc, address = server[0], server[1]
    assert job(server, "get", "no-such-job").returncode == 2  # NOT_FOUND
    megamoe("job", "get", "no-such-job", "--server", address)  # no token: UNAUTHENTICATED
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics") as answer:
        text = answer.read().decode()
    assert re.search(
        r'megamoe_api_request_seconds_count\{code="NOT_FOUND",method="GetJob"\} [1-9]', text
    )
    assert re.search(
        r'megamoe_api_request_seconds_count\{code="UNAUTHENTICATED",method="GetJob"\}', text
    )
    states = dict(re.findall(r'megamoe_jobs\{state="(\w+)"\} (\S+)', text))
    assert set(states) == {"PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"}
    assert "megamoe_etcd_errors_total 0.0" in text


@pytest.mark.timeout(120)
def test_sigterm_stops_the_server_and_its_embedded_etcd(server):
    proc, _, _, state, _ = server
    assert any(_is_etcd(p) for p in pids_mentioning(str(state)))  # its data is there
    proc.send_signal(signal.SIGTERM)
    proc.drain.join(timeout=60)
    rest = "".join(proc.lines)
    assert proc.wait(timeout=60) == 0
    assert "shutting down" in rest
    assert not any(_is_etcd(p) for p in pids_mentioning(str(state)))


def _is_etcd(pid: int) -> bool:
    try:
        argv0 = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    return Path(argv0.decode()).name == "etcd"
