"""A real Prometheus scrapes a running job's ranks and the control plane; every query of the
Grafana dashboard returns data through Prometheus' HTTP API, and `promtool check metrics`
is clean on every exporter. The job is made to fail once (a rank killed by the `[fault]`
section) so the recovery, restart and rendezvous series have data too."""

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import grpc
import pytest

from service._gen.megamoe.v1 import jobs_pb2 as pb
from service._gen.megamoe.v1 import jobs_pb2_grpc as pb_grpc
from service.dashboard import queries
from tests.e2e.conftest import ROOT
from tests.integration.conftest import running_serve
from tests.procs import kill_group, start, wait_until
from trainer.parallel.spawn import free_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return answer.read().decode()


def _consecutive_free_ports() -> int:
    for _ in range(50):
        port = free_port()
        try:
            for p in (port, port + 1):
                _get(f"http://127.0.0.1:{p}/")
        except OSError:
            return port  # nothing answers on either
    raise AssertionError("no two consecutive free ports")


def _instant(prom: int, expr: str) -> list:
    url = f"http://127.0.0.1:{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(_get(url))
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


@pytest.mark.timeout(420)
def test_prometheus_scrapes_every_exporter_and_every_dashboard_query_has_data(demo_data, tmp_path):
    metrics, ranks, prom = free_port(), _consecutive_free_ports(), free_port()
    state = tmp_path / "state"
    with running_serve(state, "--metrics-port", str(metrics)) as (_, address):
        stub = pb_grpc.JobServiceStub(grpc.insecure_channel(address))
        sets = [
            "parallel.n=2",
            "train.steps=400",
            f"data.path={demo_data}",
            "checkpoint.interval=2",
            f"observe.metrics_port={ranks}",
            "fault.kill_rank=1",  # generation 0 only: the restarted world runs clean
            "fault.kill_step=6",
        ]
        spec = pb.JobSpec(
            config_toml=(ROOT / "configs/tiny.toml").read_text(),
            overrides=sets,
            num_nodes=2,
            procs_per_node=1,
            restart=pb.RestartPolicy(max_restarts=1, backoff_seconds=0.2),
        )
        stub.CreateJob(pb.CreateJobRequest(spec=spec, job_id="scraped"), timeout=30)
        config = tmp_path / "prometheus.yml"
        targets = [f"127.0.0.1:{p}" for p in (metrics, ranks, ranks + 1)]
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: megamoe\n    static_configs: [{{targets: {json.dumps(targets)}}}]\n"
        )
        command = [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom}",
        ]
        server = start(command, tmp_path / "prometheus.log")
        try:
            wait_until(lambda: _resumed(stub) and _up(prom) == 3, 240, "the restarted job, scraped")
            for exporter in targets:  # the exporters' own text, linted
                lint = subprocess.run(
                    [PROMTOOL, "check", "metrics"],
                    input=_get(f"http://{exporter}/metrics"),
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert lint.returncode == 0 and not lint.stdout.strip(), (exporter, lint)
            empty = []
            for title, expr in queries():
                expr = expr.replace("$job_id", ".*").replace("$__rate_interval", "1m")
                deadline = time.monotonic() + 30
                while not _instant(prom, expr) and time.monotonic() < deadline:
                    time.sleep(1)
                if not _instant(prom, expr):
                    empty.append((title, expr))
            assert empty == [], empty
        finally:
            kill_group(server)
            stub.CancelJob(pb.CancelJobRequest(job_id="scraped"), timeout=30)


def _resumed(stub) -> bool:
    """The job failed once, restarted, and trains again."""
    s = stub.GetJob(pb.GetJobRequest(job_id="scraped"), timeout=30).status
    return s.generation == 1 and not s.HasField("recovery") and s.step >= 12


def _up(prom: int) -> int:
    try:
        return sum(int(float(r["value"][1])) for r in _instant(prom, "up"))
    except OSError:
        return 0
