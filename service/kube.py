"""The Kubernetes executor: a job's nodes as pods (``megamoe serve --executor kubernetes``).

It implements the executor protocol of ``service.executor`` with the official
``kubernetes`` client; the reconciler drives it exactly as it drives the local
executor, so a failed or evicted pod is replaced the way a dead local node is:
the whole world stops and starts again as the next generation (new pods, named
``...-g<generation>-n<node>``), resuming from the newest checkpoint.

What it applies comes from the pure render functions of ``service.manifests``.
What it sees comes from one watch on the pods of this control plane (a list,
then a watch from the list's resourceVersion, a fresh list when the watch
expires): ``poll`` reads that cache and asks the API only for a pod the cache
has not seen yet. A pod's phase and its container's termination state become
an ``Observed``: Succeeded -> exit 0; Failed -> the container's exit code (a
code above 128 is the signal it died of), with Kubernetes' reason (OOMKilled,
Evicted and its message); a pod stuck on an image or container-config error
counts as failed, so a typo in an image ends in a clear FAILED rather than a
job PENDING forever; a pod that disappeared (deleted by hand, its node gone) is
lost.

The API calls it makes, and so the chart's Role (a test compares them): pods
create/get/list/watch/delete, pods/log get, services create/delete, configmaps
create/get. Every call has a timeout; every API error becomes a ``KubeError``
saying what was being done (``creating pod megamoe-job-x-g0-n1 in namespace ml:
403 Forbidden: ...``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from service._gen.megamoe.v1 import jobs_pb2 as pb
from service.executor import FAILURE_SCAN_LINES, NodeHandle, Observed, failure_line
from service.manifests import (
    ANNOTATION_JOB_ID,
    CONTAINER,
    LABEL_GENERATION,
    LABEL_JOB,
    LABEL_NODE,
    PodDefaults,
    job_label,
    job_name,
    owner_reference,
    render_config_map,
    render_pod,
    render_service,
    selector,
)
from trainer.errors import MegamoeError

log = logging.getLogger(__name__)

API_TIMEOUT = (5.0, 30.0)  # (connect, read) seconds of every API call
RETRIES = 3  # of a call the API server answered 429/5xx or did not answer at all
RETRY_PAUSE_S = 0.5  # before the first retry, doubled after each
TRANSIENT = {429, 500, 502, 503, 504}
ENDED = ("Succeeded", "Failed")  # pod phases of a container that will not run again
WATCH_S = 240  # the server ends each watch after this; the executor watches again
RELIST_BACKOFF_S = 2.0
LOG_READ_TIMEOUT_S = 60.0  # a silent followed log is asked again after this
FOLLOW_POLL_S = 1.0
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# Waiting reasons that do not resolve by themselves: the node has failed to start.
FATAL_WAITING = {
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
}


class KubeError(MegamoeError):
    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def observe_pod(pod: dict | None) -> Observed:
    """What a pod (as the API returns it, or None when it is gone) says about its node."""
    if pod is None:
        return Observed(running=False, lost=True, reason="pod deleted")
    status = pod.get("status") or {}
    phase = status.get("phase", "Pending")
    container = _container_status(pod)
    state = container.get("state") or {}
    if phase == "Succeeded":
        return Observed(running=False, exit_code=0)
    if phase == "Failed":
        terminated = state.get("terminated") or {}
        why = [_join(status.get("reason"), status.get("message"))]  # Evicted: the node ...
        if terminated.get("reason") not in (None, "Error", "Completed"):
            why.append(terminated["reason"])  # OOMKilled, DeadlineExceeded, ...
        reason = "; ".join(w for w in why if w)
        if not terminated:
            return Observed(running=False, reason=reason or "pod failed")
        code = int(terminated.get("exitCode", 0))
        sig = int(terminated.get("signal") or 0) or (code - 128 if code > 128 else 0)
        return Observed(running=False, exit_code=code, signal=sig or None, reason=reason)
    waiting = state.get("waiting") or {}
    if waiting.get("reason") in FATAL_WAITING:
        return Observed(running=False, reason=_join(waiting.get("reason"), waiting.get("message")))
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            # still a running node (the scheduler may place it yet), but one that says why
            # it does not train: "Unschedulable: 0/8 nodes are available: ..."
            return Observed(
                running=True, reason=_join(condition.get("reason"), condition.get("message"))
            )
    return Observed(running=True)


def _container_status(pod: dict) -> dict:
    for c in (pod.get("status") or {}).get("containerStatuses") or []:
        if c.get("name") == CONTAINER:
            return c
    return {}


def _join(reason: str | None, message: str | None) -> str:
    reason, message = (reason or "").strip(), (message or "").strip()
    if reason and message:
        return f"{reason}: {message}"
    return reason or message


def _header(pod: dict) -> str:
    return f"=== megamoe: pod {pod['metadata']['name']} (generation {_generation(pod)}) ===\n"


def _generation(pod: dict) -> int:
    return int(pod["metadata"].get("labels", {}).get(LABEL_GENERATION, -1))


class KubernetesExecutor:
    """Job nodes as pods in one namespace (see the module doc)."""

    def __init__(self, api_client, defaults: PodDefaults, namespace: str) -> None:
        from kubernetes import client

        self.api = api_client
        self.core = client.CoreV1Api(api_client)
        self.namespace = namespace
        self.defaults = dataclasses.replace(defaults, namespace=namespace)
        self._owners: dict[str, dict] = {}  # job -> ownerReference to its ConfigMap
        self._services: set[str] = set()  # jobs whose Service exists
        self._pods: dict[str, dict] = {}  # name -> pod, from the watch
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._resp = None
        self._watcher = threading.Thread(target=self._watch, name="megamoe-pods", daemon=True)
        self._watcher.start()

    @classmethod
    def connect(cls, defaults: PodDefaults, namespace: str | None = None) -> KubernetesExecutor:
        """In a pod: its service account; elsewhere: the kubeconfig ($KUBECONFIG or
        ~/.kube/config). The namespace: ``namespace``, the defaults', the pod's own,
        the kubeconfig context's, else "default"."""
        from kubernetes import client, config

        context_ns = None
        try:
            config.load_incluster_config()
            if IN_CLUSTER_NAMESPACE.exists():
                context_ns = IN_CLUSTER_NAMESPACE.read_text().strip()
        except config.ConfigException:
            try:
                config.load_kube_config()
                _, active = config.list_kube_config_contexts()
                context_ns = (active or {}).get("context", {}).get("namespace")
            except (config.ConfigException, OSError) as exc:
                raise KubeError(
                    "--executor kubernetes: no Kubernetes API to talk to: not in a pod, and "
                    f"no usable kubeconfig ({exc})"
                ) from None
        ns = namespace or defaults.namespace or context_ns or "default"
        return cls(client.ApiClient(), defaults, ns)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            if self._resp is not None:
                self._resp.shutdown()  # unblocks the watcher's read (close() would wait on it)
        self._watcher.join(timeout=5)

    # ------------------------------------------------------------------ API calls

    def _call(self, what: str, fn: Callable, *args, ok: tuple[int, ...] = (), **kwargs) -> dict:
        """One API call returning its JSON body; ``ok``: error statuses that are answers
        (404 of a delete, 409 of a create), returned as {"status": code}. A busy or briefly
        unreachable API server (429, 5xx, no connection) is asked again, RETRIES times with
        a doubling pause: every call the executor makes can be repeated (a create that did
        happen answers 409, a delete that did 404)."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        kwargs.setdefault("_request_timeout", API_TIMEOUT)
        for attempt in range(RETRIES + 1):
            pause = RETRY_PAUSE_S * 2**attempt
            try:
                resp = fn(*args, _preload_content=False, **kwargs)
                return json.loads(resp.data or b"{}")
            except ApiException as exc:
                if exc.status in ok:
                    return {"status": exc.status}
                error = _api_error(what, exc)
                if exc.status not in TRANSIENT or attempt == RETRIES:
                    raise error from None
            except HTTPError as exc:
                error = KubeError(
                    f"{what}: the Kubernetes API at {self.api.configuration.host} does not "
                    f"answer: {exc}"
                )
                if attempt == RETRIES:
                    raise error from None
            log.warning("%s; asking again in %.1f s", error, pause)
            time.sleep(pause)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ watch

    def _watch(self) -> None:
        """Keep ``self._pods`` equal to the API's pods of this control plane."""
        label = selector(self.defaults)
        while not self._stop.is_set():
            try:
                listed = self._call(
                    f"listing pods in namespace {self.namespace}",
                    self.core.list_namespaced_pod,
                    self.namespace,
                    label_selector=label,
                )
                with self._lock:
                    self._pods = {p["metadata"]["name"]: p for p in listed.get("items", [])}
                self._synced.set()
                version = listed.get("metadata", {}).get("resourceVersion", "")
                while not self._stop.is_set():
                    version = self._watch_from(label, version)
                    if not version:
                        break  # expired: list again
            except KubeError as exc:
                log.warning("watching pods: %s; listing again in %.0f s", exc, RELIST_BACKOFF_S)
            except Exception:
                if self._stop.is_set():
                    return
                log.exception("watching pods failed; listing again")
            self._stop.wait(RELIST_BACKOFF_S)

    def _watch_from(self, label: str, version: str) -> str:
        """Apply watch events after ``version``; the last version seen, "" when the watch
        expired (410) and the pods must be listed again."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            resp = self.core.list_namespaced_pod(
                self.namespace,
                label_selector=label,
                watch=True,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_S,
                _preload_content=False,
                _request_timeout=(API_TIMEOUT[0], WATCH_S + 30),
            )
        except ApiException as exc:
            if exc.status == 410:
                return ""
            raise _api_error("watching pods", exc) from None
        self._resp = resp
        try:
            for line in _lines(resp):
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    return "" if obj.get("code") == 410 else version
                version = obj.get("metadata", {}).get("resourceVersion", version)
                if kind == "BOOKMARK":
                    continue
                name = obj["metadata"]["name"]
                with self._lock:
                    if kind == "DELETED":
                        self._pods.pop(name, None)
                    else:
                        self._pods[name] = obj
        except HTTPError:
            if self._stop.is_set():
                return version
            raise
        finally:
            resp.release_conn()
        return version

    # ------------------------------------------------------------------ start

    def _owner(self, job_id: str, spec: pb.JobSpec) -> dict:
        owner = self._owners.get(job_id)
        if owner is not None:
            return owner
        name = job_name(job_id)
        body = render_config_map(job_id, spec, self.defaults)
        what = f"creating configmap {name} in namespace {self.namespace}"
        made = self._call(
            what, self.core.create_namespaced_config_map, self.namespace, body, ok=(409,)
        )
        if made.get("status") == 409:  # an earlier start (or control plane) made it
            made = self._call(
                f"reading configmap {name} in namespace {self.namespace}",
                self.core.read_namespaced_config_map,
                name,
                self.namespace,
            )
            annotations = made.get("metadata", {}).get("annotations") or {}
            if annotations.get(ANNOTATION_JOB_ID) != job_id:
                raise KubeError(
                    f"configmap {name} in namespace {self.namespace} exists and is not job "
                    f"{job_id}'s (annotation {ANNOTATION_JOB_ID} = "
                    f"{annotations.get(ANNOTATION_JOB_ID)!r}); megamoe will not adopt it"
                )
        owner = self._owners[job_id] = owner_reference(made)
        return owner

    def start_node(
        self,
        job_id: str,
        spec: pb.JobSpec,
        node: int,
        generation: int,
        skip_checkpoints: Sequence[str] = (),
    ) -> NodeHandle:
        owner = self._owner(job_id, spec)
        if job_id not in self._services:
            body = render_service(job_id, self.defaults, owner)
            self._call(
                f"creating service {job_name(job_id)} in namespace {self.namespace}",
                self.core.create_namespaced_service,
                self.namespace,
                body,
                ok=(409,),
            )
            self._services.add(job_id)
        pod = render_pod(job_id, spec, node, generation, self.defaults, owner, skip_checkpoints)
        name = pod["metadata"]["name"]
        made = self._call(
            f"creating pod {name} in namespace {self.namespace}",
            self.core.create_namespaced_pod,
            self.namespace,
            pod,
            ok=(409,),  # this start was made before (a control plane died after it)
        )
        if made.get("status") != 409:
            with self._lock:
                self._pods.setdefault(name, made)
        return NodeHandle(pod=name)

    # ------------------------------------------------------------------ observe

    def _pod(self, name: str) -> dict | None:
        """The pod from the watch's cache; from the API when the cache has not seen it (a
        pod deleted, or created by a control plane before this one)."""
        if not self._synced.wait(API_TIMEOUT[1]):
            raise KubeError(f"the pods of namespace {self.namespace} could not be listed yet")
        with self._lock:
            pod = self._pods.get(name)
        if pod is not None:
            return pod
        got = self._call(
            f"reading pod {name} in namespace {self.namespace}",
            self.core.read_namespaced_pod,
            name,
            self.namespace,
            ok=(404,),
        )
        return None if got.get("status") == 404 else got

    def poll(self, job_id: str, node: int, handle: NodeHandle) -> Observed:
        return observe_pod(self._pod(handle.pod))

    def adopt(self, job_id: str, node: int, handle: NodeHandle) -> bool:
        return bool(handle.pod) and self.poll(job_id, node, handle).running

    def _node_pods(self, job_id: str, node: int) -> list[dict]:
        """The node's pods the cache knows, oldest generation first."""
        want = {LABEL_JOB: job_label(job_id), LABEL_NODE: str(node)}
        with self._lock:
            pods = [
                p
                for p in self._pods.values()
                if want.items() <= p["metadata"].get("labels", {}).items()
            ]
        return sorted(pods, key=_generation)

    # ------------------------------------------------------------------ stop

    def stop_node(self, job_id: str, node: int, handle: NodeHandle, grace: float) -> None:
        """Delete the node's pods that still run (its pod, and any other: one started by a
        control plane that died before recording it). Kubernetes sends SIGTERM, waits
        ``grace`` seconds, then SIGKILL. A pod that has ended holds nothing and is kept for
        its log (why a node failed); deleting what is gone is not an error (cancel is
        idempotent)."""
        pods = {p["metadata"]["name"]: p for p in self._node_pods(job_id, node)}
        if handle.pod:
            pods.setdefault(handle.pod, {})
        for name, pod in sorted(pods.items()):
            if (pod.get("status") or {}).get("phase") in ENDED:
                continue
            self._call(
                f"deleting pod {name} in namespace {self.namespace}",
                self.core.delete_namespaced_pod,
                name,
                self.namespace,
                grace_period_seconds=max(0, int(grace)),
                ok=(404,),
            )

    def finish_job(self, job_id: str) -> None:
        """The job ended: delete its Service. Its pods stay (terminated, holding no GPU) for
        their logs, owned by its ConfigMap: deleting that ConfigMap removes them."""
        self._call(
            f"deleting service {job_name(job_id)} in namespace {self.namespace}",
            self.core.delete_namespaced_service,
            job_name(job_id),
            self.namespace,
            ok=(404,),
        )
        self._services.discard(job_id)
        self._owners.pop(job_id, None)

    # ------------------------------------------------------------------ logs

    def logs(
        self, job_id: str, node: int, tail_lines: int, follow: bool, active: Callable[[], bool]
    ) -> Iterator[str]:
        """The node's log. ``tail_lines`` N > 0: the last N lines of its newest pod that
        has one. 0: every pod of the node the cluster still has (the ended ones of earlier
        generations, each under a header line, then the newest). With ``follow``, the
        newest pod's new output until it ends or ``active()`` turns False; a pod that has
        not started yet is waited for."""
        pods = self._node_pods(job_id, node)
        if tail_lines > 0 and not follow:
            for pod in reversed(pods):
                text = self._log_text(pod, tail_lines)
                if text:
                    yield text
                    return
            return
        if tail_lines == 0:
            earlier = pods[:-1]
            for pod in earlier:
                text = self._log_text(pod, 0)
                if text:
                    yield f"{_header(pod)}{text}"
            if earlier and pods:
                yield _header(pods[-1])
            if not follow:
                text = self._log_text(pods[-1], 0) if pods else ""
                if text:
                    yield text
                return
        while True:
            pods = pods or self._node_pods(job_id, node)
            if pods:
                name = pods[-1]["metadata"]["name"]
                what = f"reading the log of pod {name} in namespace {self.namespace}"
                streamed = yield from self._follow(what, name, tail_lines, active)
                if streamed:
                    return
            if not active():
                return
            time.sleep(FOLLOW_POLL_S)
            pods = []

    def _log_text(self, pod: dict, tail_lines: int) -> str:
        name = pod["metadata"]["name"]
        kwargs: dict[str, Any] = {"container": CONTAINER}
        if tail_lines > 0:
            kwargs["tail_lines"] = tail_lines
        what = f"reading the log of pod {name} in namespace {self.namespace}"
        return self._raw(what, name, kwargs, API_TIMEOUT)

    def _follow(
        self, what: str, name: str, tail_lines: int, active: Callable[[], bool]
    ) -> Iterator[str]:
        """Follow a pod's log; returns False when its container has not started yet. Each
        line carries the kubelet's timestamp: when the stream has been silent for
        LOG_READ_TIMEOUT_S it is asked again from shortly before the last line seen, and
        lines up to that one are dropped."""
        from urllib3.exceptions import HTTPError

        last: tuple[dt.datetime, str] | None = None
        kwargs: dict[str, Any] = {"container": CONTAINER, "timestamps": True}
        if tail_lines > 0:
            kwargs["tail_lines"] = tail_lines
        while True:
            resp = self._open_log(what, name, kwargs)
            if resp is None:
                return last is not None
            try:
                for line in _lines(resp, keep_ends=True):
                    stamp, _, text = line.partition(" ")
                    when = _parse_time(stamp)
                    if when is not None:
                        if last is not None and (when, text) <= last:
                            continue
                        last = (when, text)
                    yield text
                    if not active():
                        return True
                return True  # the container ended: the kubelet closed the stream
            except HTTPError:
                if not active():
                    return True
                kwargs.pop("tail_lines", None)
                if last is not None:
                    age = (dt.datetime.now(dt.UTC) - last[0]).total_seconds()
                    kwargs["since_seconds"] = max(1, int(age) + 2)
            finally:
                resp.release_conn()

    def _raw(self, what: str, name: str, kwargs: dict, timeout) -> str:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            resp = self.core.read_namespaced_pod_log(
                name, self.namespace, _preload_content=False, _request_timeout=timeout, **kwargs
            )
            return resp.data.decode(errors="replace")
        except ApiException as exc:
            if exc.status in (400, 404):  # not started yet, or gone
                return ""
            raise _api_error(what, exc) from None
        except HTTPError as exc:
            raise KubeError(f"{what}: {exc}") from None

    def _open_log(self, what: str, name: str, kwargs: dict):
        from kubernetes.client.exceptions import ApiException

        try:
            return self.core.read_namespaced_pod_log(
                name,
                self.namespace,
                follow=True,
                _preload_content=False,
                _request_timeout=(API_TIMEOUT[0], LOG_READ_TIMEOUT_S),
                **kwargs,
            )
        except ApiException as exc:
            if exc.status in (400, 404):
                return None
            raise _api_error(what, exc) from None

    def failure_line(self, job_id: str, node: int) -> str:
        """Why the node's newest pod failed: Kubernetes' own reason (evicted, OOMKilled) is
        in the node's status already; this is the line of its output that says why."""
        pods = self._node_pods(job_id, node)
        if not pods:
            return ""
        pod = pods[-1]
        state = _container_status(pod).get("state") or {}
        message = (state.get("terminated") or {}).get("message", "")
        text = message or self._raw(
            f"reading the log of pod {pod['metadata']['name']}",
            pod["metadata"]["name"],
            {"container": CONTAINER, "tail_lines": FAILURE_SCAN_LINES},
            API_TIMEOUT,
        )
        return failure_line(text.splitlines())


def _api_error(what: str, exc) -> KubeError:
    """A KubeError saying what was being done and what the API server answered."""
    return KubeError(f"{what}: {exc.status} {exc.reason}: {_message(exc)}", exc.status)


def _message(exc) -> str:
    try:
        return json.loads(exc.body).get("message", "") or str(exc.body)
    except (TypeError, ValueError):
        return str(exc.body or "").strip()


def _lines(resp, keep_ends: bool = False) -> Iterator[str]:
    """Decoded lines of a streamed HTTP body, as they arrive."""
    pending = b""
    for chunk in resp.stream(64 * 1024, decode_content=True):
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            if line or keep_ends:
                yield line.decode(errors="replace") + ("\n" if keep_ends else "")
    if pending:
        yield pending.decode(errors="replace")


def _parse_time(stamp: str) -> dt.datetime | None:
    """RFC 3339 with up to nanoseconds (the kubelet's log timestamps) -> an aware datetime
    to the microsecond; None when ``stamp`` is not one."""
    try:
        head, _, frac = stamp.rstrip("Z").partition(".")
        base = dt.datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC)
        return base + dt.timedelta(microseconds=int((frac + "000000")[:6]) if frac else 0)
    except ValueError:
        return None
