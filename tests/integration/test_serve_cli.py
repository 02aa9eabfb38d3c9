"""`megamoe serve` as a user starts it: the embedded etcd, the `serving on` line, the
`megamoe job` commands, stock grpcurl through reflection, and a clean SIGTERM."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, megamoe
from tests.procs import kill_group, start

TOKEN = "t0ken-for-tests"


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "token").write_text(TOKEN + "\n")
    state = tmp / "state"
    args = ["serve", "--port", "0", "--state-dir", str(state), "--token-file", str(tmp / "token")]
    proc = start([sys.executable, "-m", "service.cli", *args])
    try:
        deadline, lines = time.monotonic() + 60, []
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"serving on 127\.0\.0\.1:(\d+)", line)
            if m:
                break
            assert time.monotonic() < deadline, "".join(lines)
        else:
            pytest.fail("serve exited: " + "".join(lines))
        yield proc, f"127.0.0.1:{m.group(1)}", tmp, state
    finally:
        kill_group(proc)
        for pid in _pids_mentioning(str(state)):  # an embedded etcd left behind
            os.kill(pid, signal.SIGKILL)


def job(server, *args):
    _, address, tmp, _ = server
    return megamoe("job", *args, "--server", address, "--token-file", str(tmp / "token"))


@pytest.mark.timeout(120)
def test_submit_get_list_through_the_cli(server):
    submit = ("submit", "--config", "configs/tiny.toml", "--set", "parallel.n=2")
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
    spec = {"config_toml": config, "num_nodes": 1, "procs_per_node": 1}
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
def test_sigterm_stops_the_server_and_its_embedded_etcd(server):
    proc, _, _, state = server
    assert _pids_mentioning(str(state))  # the embedded etcd runs with its data there
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 0
    assert "shutting down" in rest
    assert _pids_mentioning(str(state)) == []
