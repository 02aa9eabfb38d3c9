"""Prometheus metrics of the control plane: ``megamoe serve --metrics-port P``.

The same port answers the probes of an orchestrator: ``/healthz`` (200 while the
process serves HTTP at all) and ``/readyz`` (200 only when the gRPC server serves
and etcd answers; 503 with the reason otherwise). Everything else is the
Prometheus exposition.

Jobs by state are read from etcd's index when Prometheus scrapes (so a server
started with ``--executor none`` reports them too, and the number is never
stale); the rest is counted as it happens: API calls by method and status code
(the servicer's one error boundary reports each call), restarts, recoveries
and rendezvous durations (the reconciler, as it commits them), and etcd
requests that failed (the etcd client's error hook). Names and labels:
docs/OBSERVABILITY.md.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Callable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily

from service._gen.megamoe.v1 import jobs_pb2 as pb
from trainer.errors import MegamoeError

disable_created_metrics()

API_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
RECOVERY_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
STATES = [
    pb.JobState.Name(s) for s in (pb.PENDING, pb.RUNNING, pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)
]


class _JobsByState:
    """``megamoe_jobs{state}`` from the store's index, at scrape time."""

    def __init__(self, store, on_error) -> None:
        self.store, self.on_error = store, on_error

    def collect(self):
        family = GaugeMetricFamily("megamoe_jobs", "Jobs in each state", labels=["state"])
        try:
            counts = Tally(pb.JobState.Name(e.state) for e in self.store.index())
        except MegamoeError:
            self.on_error()
            return  # no number rather than a wrong one
        for state in STATES:
            family.add_metric([state], counts.get(state, 0))
        yield family


class ServeMetrics:
    def __init__(self, store=None) -> None:
        r = self.registry = CollectorRegistry()
        self.api_seconds = Histogram(
            "megamoe_api_request_seconds",
            "JobService call latency by method and status code",
            ["method", "code"],
            buckets=API_BUCKETS,
            registry=r,
        )
        self.etcd_errors = Counter(
            "megamoe_etcd_errors", "etcd requests of the control plane that failed", registry=r
        )
        self.job_restarts = Counter(
            "megamoe_job_restarts", "Restarts of a job's world", ["job_id"], registry=r
        )
        self.recovery_seconds = Histogram(
            "megamoe_recovery_seconds",
            "Failure seen -> first step of the restarted world",
            buckets=RECOVERY_BUCKETS,
            registry=r,
        )
        self.rendezvous_seconds = Histogram(
            "megamoe_rendezvous_seconds",
            "Nodes started -> first step reported (rendezvous, process groups, restore)",
            buckets=RECOVERY_BUCKETS,
            registry=r,
        )
        self.straggler_score = Gauge(
            "megamoe_straggler_score",
            "How far a rank's compute time lies from the other ranks' (robust z-score)",
            ["job_id", "rank", "node"],
            registry=r,
        )
        if store is not None:
            r.register(_JobsByState(store, self.etcd_errors.inc))
        self.server = None

    def serve(self, port: int, host: str, ready: Callable[[], str] | None = None) -> int:
        """Serve /metrics, /healthz and /readyz on host:port (0 = free); returns the port.
        ``ready()`` returns "" when ready, else the reason it is not."""
        metrics = make_wsgi_app(self.registry)

        def app(environ, start_response):
            path = environ.get("PATH_INFO", "")
            if path == "/healthz":
                return _plain(start_response, "200 OK", "ok\n")
            if path == "/readyz":
                reason = ready() if ready is not None else ""
                if reason:
                    return _plain(start_response, "503 Service Unavailable", reason + "\n")
                return _plain(start_response, "200 OK", "ready\n")
            return metrics(environ, start_response)

        self.server = make_server(host, port, app, _ThreadingServer, _QuietHandler)
        threading.Thread(target=self.server.serve_forever, daemon=True, name="metrics").start()
        return self.server.server_port

    def api_call(self, method: str, code: str, seconds: float) -> None:
        self.api_seconds.labels(method=method, code=code).observe(seconds)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def _plain(start_response, status: str, text: str) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # probes and scrapes every few seconds
        pass
