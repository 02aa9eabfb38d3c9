"""An in-process fake of the Kubernetes API, at the HTTP level, for the executor's tests.

No API server can run on the development and CI machines, so the Kubernetes
executor is tested through the official ``kubernetes`` client against this: a
real HTTP server on a loopback port that speaks the parts of the core/v1 REST
API the executor uses - create/get/list/watch/delete of pods, services and
configmaps in a namespace, label selectors, resourceVersions with watches from
a version (and 410 Gone for an expired one), pod logs with tailLines, follow,
timestamps and sinceSeconds - and answers errors as the API server does (a
``Status`` object with the code). Every object created is checked against the
real API schema (``kubernetes_validate``, strict: an unknown field is a 422 as on
a real server).

There is no kubelet and no scheduler: a test moves pods through their lives
itself (``run``, ``exit``, ``evict``, ``log``), and there is no garbage
collector. ``requests`` records each call as (verb, resource), the RBAC view of
it, so a test can compare what the executor used with the chart's Role.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import kubernetes_validate

SCHEMA_VERSION = "1.35.0"
PATH = re.compile(
    r"^/api/v1/namespaces/(?P<ns>[^/]+)/(?P<resource>pods|services|configmaps)"
    r"(?:/(?P<name>[^/]+))?(?:/(?P<sub>log))?$"
)
KINDS = {"pods": "Pod", "services": "Service", "configmaps": "ConfigMap"}
EVENTS_KEPT = 1000  # watch history; an older resourceVersion is 410 Gone


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _matches(obj: dict, selector: str) -> bool:
    labels = obj["metadata"].get("labels", {})
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class FakeKube:
    """The fake API server (see the module doc). Use as a context manager."""

    def __init__(self, namespace: str = "ml") -> None:
        self.namespace = namespace
        self.objects: dict[tuple[str, str], dict] = {}  # (resource, name) -> object
        self.logs: dict[str, list[tuple[dt.datetime, str]]] = {}  # pod -> timed lines
        self.events: list[tuple[int, str, dict]] = []  # (resourceVersion, type, pod)
        self.requests: list[tuple[str, str]] = []  # (verb, resource)
        self.deleted: list[tuple[str, str, int | None]] = []  # (resource, name, grace)
        self.create_delay_s = 0.0  # each pod create waits this long (a slow API server)
        self.create_started = threading.Event()  # set when a pod create begins
        self.failures: list[int] = []  # status codes the next pod creates answer with
        self.version = 0
        self.closed = False  # set on exit: streams end
        self.cond = threading.Condition()
        handler = type("Handler", (_Handler,), {"fake": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeKube:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ store

    def _bump(self) -> str:
        self.version += 1
        return str(self.version)

    def _record(self, kind: str, obj: dict) -> None:
        """A change of a pod, for watchers (under self.cond)."""
        self.events.append((self.version, kind, copy.deepcopy(obj)))
        del self.events[:-EVENTS_KEPT]
        self.cond.notify_all()

    def pods(self, **labels: str) -> list[dict]:
        with self.cond:
            return [
                copy.deepcopy(o)
                for (r, _), o in sorted(self.objects.items())
                if r == "pods" and labels.items() <= o["metadata"].get("labels", {}).items()
            ]

    def get(self, resource: str, name: str) -> dict | None:
        with self.cond:
            obj = self.objects.get((resource, name))
            return copy.deepcopy(obj) if obj else None

    # ------------------------------------------------------------------ a kubelet's moves

    def _update_pod(self, name: str, status: dict) -> None:
        with self.cond:
            pod = self.objects[("pods", name)]
            pod["status"] = status
            pod["metadata"]["resourceVersion"] = self._bump()
            self._record("MODIFIED", pod)

    def _container(self, name: str, state: dict, ready: bool) -> dict:
        return {
            "name": "worker",
            "image": self.objects[("pods", name)]["spec"]["containers"][0]["image"],
            "imageID": "",
            "ready": ready,
            "restartCount": 0,
            "state": state,
        }

    def run(self, name: str) -> None:
        """The pod's container started."""
        state = {"running": {"startedAt": _now()}}
        self._update_pod(
            name,
            {
                "phase": "Running",
                "podIP": "10.0.0.1",
                "containerStatuses": [self._container(name, state, True)],
            },
        )

    def exit(self, name: str, code: int, reason: str = "", message: str = "") -> None:
        """The pod's container ended with ``code`` (0: Succeeded, else Failed)."""
        terminated = {
            "exitCode": code,
            "reason": reason or ("Completed" if code == 0 else "Error"),
            "startedAt": _now(),
            "finishedAt": _now(),
        }
        if message:
            terminated["message"] = message
        self._update_pod(
            name,
            {
                "phase": "Succeeded" if code == 0 else "Failed",
                "containerStatuses": [self._container(name, {"terminated": terminated}, False)],
            },
        )

    def evict(self, name: str, message: str) -> None:
        """What the kubelet does under node pressure: Failed, reason Evicted."""
        terminated = {"exitCode": 137, "reason": "Error", "finishedAt": _now()}
        self._update_pod(
            name,
            {
                "phase": "Failed",
                "reason": "Evicted",
                "message": message,
                "containerStatuses": [self._container(name, {"terminated": terminated}, False)],
            },
        )

    def unschedulable(self, name: str, message: str) -> None:
        """What the scheduler reports for a pod no node can take."""
        self._update_pod(
            name,
            {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": message,
                    }
                ],
            },
        )

    def wait_image(self, name: str, reason: str, message: str) -> None:
        state = {"waiting": {"reason": reason, "message": message}}
        self._update_pod(
            name, {"phase": "Pending", "containerStatuses": [self._container(name, state, False)]}
        )

    def delete_pod(self, name: str) -> None:
        """What ``kubectl delete pod --now`` and a lost node end in: the pod is gone."""
        with self.cond:
            pod = self.objects.pop(("pods", name))
            pod["metadata"]["resourceVersion"] = self._bump()
            self._record("DELETED", pod)

    def log(self, name: str, text: str) -> None:
        """The pod's container wrote ``text``."""
        with self.cond:
            stamp = dt.datetime.now(dt.UTC)
            for line in text.splitlines():
                self.logs.setdefault(name, []).append((stamp, line))
            self.cond.notify_all()

    def expire_watches(self) -> None:
        """Forget the watch history (as compaction does): a watch from before is 410 Gone."""
        with self.cond:
            self.events.clear()
            self._bump()
            self.cond.notify_all()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeKube
    # HTTP/1.1 with chunked streams, as the API server sends watches and followed logs (a
    # client reads each chunk as it comes); one request per connection.
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    # ------------------------------------------------------------------ plumbing

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def _error(self, code: int, reason: str, message: str) -> None:
        self._send(code, _status(code, reason, message))

    def _route(self):
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        match = PATH.match(url.path)
        if not match:
            self._error(
                404, "NotFound", f"the server could not find the requested resource {url.path}"
            )
            return None
        if match["ns"] != self.fake.namespace:
            self._error(
                403,
                "Forbidden",
                f"{match['resource']} is forbidden in namespace {match['ns']}",
            )
            return None
        return match["resource"], match["name"], match["sub"], query

    def _verb(self, resource: str, name: str | None, sub: str | None, query: dict) -> None:
        method = self.command
        if method == "GET":
            verb = "get" if name else "watch" if _true(query.get("watch")) else "list"
        else:
            verb = {"POST": "create", "DELETE": "delete", "PUT": "update", "PATCH": "patch"}[method]
        with self.fake.cond:
            self.fake.requests.append((verb, f"{resource}/{sub}" if sub else resource))

    # ------------------------------------------------------------------ verbs

    def do_POST(self) -> None:
        routed = self._route()
        if routed is None:
            return
        resource, name, sub, query = routed
        self._verb(resource, name, sub, query)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        if resource == "pods":
            self.fake.create_started.set()
            if self.fake.create_delay_s:
                threading.Event().wait(self.fake.create_delay_s)
            with self.fake.cond:
                failure = self.fake.failures.pop(0) if self.fake.failures else None
            if failure is not None:
                self._error(failure, "ServiceUnavailable", "the server is busy, try again")
                return
        if body.get("kind") != KINDS[resource]:
            self._error(400, "BadRequest", f"kind {body.get('kind')} posted to {resource}")
            return
        try:
            kubernetes_validate.validate(body, SCHEMA_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            self._error(422, "Invalid", f"{KINDS[resource]} is invalid: {str(exc).splitlines()[0]}")
            return
        meta = body["metadata"]
        if meta.get("namespace", self.fake.namespace) != self.fake.namespace:
            self._error(400, "BadRequest", "the namespace of the object does not match the URL")
            return
        with self.fake.cond:
            key = (resource, meta["name"])
            if key in self.fake.objects:
                self._error(409, "AlreadyExists", f'{resource} "{meta["name"]}" already exists')
                return
            meta.update(
                namespace=self.fake.namespace,
                uid=str(uuid.uuid4()),
                creationTimestamp=_now(),
                resourceVersion=self.fake._bump(),
            )
            if resource == "pods":
                state = {"waiting": {"reason": "ContainerCreating"}}
                body["status"] = {
                    "phase": "Pending",
                    "containerStatuses": [
                        {
                            "name": "worker",
                            "image": body["spec"]["containers"][0]["image"],
                            "imageID": "",
                            "ready": False,
                            "restartCount": 0,
                            "state": state,
                        }
                    ],
                }
                self.fake._record("ADDED", body)
            self.fake.objects[key] = body
            created = copy.deepcopy(body)
        self._send(201, created)

    def do_DELETE(self) -> None:
        routed = self._route()
        if routed is None:
            return
        resource, name, sub, query = routed
        self._verb(resource, name, sub, query)
        length = int(self.headers.get("Content-Length", 0) or 0)
        options = json.loads(self.rfile.read(length) or b"{}") if length else {}
        grace = options.get("gracePeriodSeconds", query.get("gracePeriodSeconds"))
        with self.fake.cond:
            obj = self.fake.objects.pop((resource, name), None)
            if obj is None:
                self._error(404, "NotFound", f'{resource} "{name}" not found')
                return
            self.fake.deleted.append((resource, name, None if grace is None else int(grace)))
            obj["metadata"]["resourceVersion"] = self.fake._bump()
            if resource == "pods":
                self.fake._record("DELETED", obj)
        self._send(200, obj)

    def do_GET(self) -> None:
        routed = self._route()
        if routed is None:
            return
        resource, name, sub, query = routed
        self._verb(resource, name, sub, query)
        if sub == "log":
            self._log(name, query)
        elif name:
            obj = self.fake.get(resource, name)
            if obj is None:
                self._error(404, "NotFound", f'{resource} "{name}" not found')
            else:
                self._send(200, obj)
        elif _true(query.get("watch")):
            self._watch(resource, query)
        else:
            selector = query.get("labelSelector", "")
            with self.fake.cond:
                items = [
                    copy.deepcopy(o)
                    for (r, _), o in sorted(self.fake.objects.items())
                    if r == resource and _matches(o, selector)
                ]
                version = str(self.fake.version)
            self._send(
                200,
                {
                    "kind": f"{KINDS[resource]}List",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": version},
                    "items": items,
                },
            )

    def _stream_start(self, content_type: str = "application/json") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def _stream_end(self) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    def _watch(self, resource: str, query: dict) -> None:
        fake = self.fake
        selector = query.get("labelSelector", "")
        since = int(query.get("resourceVersion") or 0)
        timeout = float(query.get("timeoutSeconds") or 60)
        deadline = threading.Event()
        threading.Timer(timeout, lambda: (deadline.set(), _notify(fake))).start()
        with fake.cond:
            oldest = fake.events[0][0] if fake.events else fake.version + 1
            gone = since and since < oldest - 1 and since < fake.version
        self._stream_start()
        try:
            if gone:
                error = _status(410, "Expired", f"too old resource version: {since}")
                self._chunk(json.dumps({"type": "ERROR", "object": error}).encode() + b"\n")
                return
            while not deadline.is_set() and not fake.closed:
                with fake.cond:
                    ready = [e for e in fake.events if e[0] > since]
                    if not ready:
                        fake.cond.wait(1.0)
                        continue
                for version, kind, obj in ready:
                    since = version
                    if _matches(obj, selector):
                        self._chunk(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            return
        finally:
            self._stream_end()

    def _log(self, name: str, query: dict) -> None:
        fake = self.fake
        pod = fake.get("pods", name)
        if pod is None:
            self._error(404, "NotFound", f'pods "{name}" not found')
            return
        state = (pod.get("status", {}).get("containerStatuses") or [{}])[0].get("state", {})
        if "waiting" in state:
            reason = state["waiting"].get("reason", "")
            self._error(
                400,
                "BadRequest",
                f'container "worker" in pod "{name}" is waiting to start: {reason}',
            )
            return
        stamps = _true(query.get("timestamps"))
        tail = int(query["tailLines"]) if "tailLines" in query else None
        since = query.get("sinceSeconds")
        with fake.cond:
            lines = list(fake.logs.get(name, []))
        if since is not None:
            cut = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=int(since))
            lines = [x for x in lines if x[0] >= cut]
        if tail is not None:
            lines = lines[-tail:] if tail else []
        self._stream_start("text/plain")

        def render(entries) -> bytes:
            out = []
            for when, text in entries:
                prefix = when.strftime("%Y-%m-%dT%H:%M:%S.%fZ") + " " if stamps else ""
                out.append(f"{prefix}{text}\n")
            return "".join(out).encode()

        try:
            self._chunk(render(lines))
            if not _true(query.get("follow")):
                return
            sent = len(fake.logs.get(name, []))
            while not fake.closed:
                with fake.cond:
                    current = fake.logs.get(name, [])
                    new = current[sent:]
                    pod = fake.objects.get(("pods", name))
                    phase = pod["status"]["phase"] if pod else "Gone"
                    if not new and phase in ("Pending", "Running"):
                        fake.cond.wait(0.5)
                        continue
                sent += len(new)
                self._chunk(render(new))
                if phase not in ("Pending", "Running") and not new:
                    return
        except (BrokenPipeError, ConnectionResetError):
            return
        finally:
            self._stream_end()


def _true(value: str | None) -> bool:
    return (value or "").lower() in ("true", "1")


def _notify(fake: FakeKube) -> None:
    with fake.cond:
        fake.cond.notify_all()
