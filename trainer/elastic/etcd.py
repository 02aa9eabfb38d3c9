"""The one etcd client megamoe uses (trainer, control plane, tests), and a private etcd server.

It speaks etcd's v3 API through the server's JSON gateway (``/v3/...``) on an
``etcd3gw`` client: synchronous, no protobuf, works with any current grpcio.
On that wire keys and values are base64 and int64s are strings; here keys and
values go in as ``str`` (UTF-8) or ``bytes``, values come back as ``bytes``,
keys as ``str``, revisions as ``int``. No torch: the control plane imports it.

What it adds to etcd3gw's own helpers, which return too little for optimistic
concurrency (``put`` drops the revision, ``delete`` the count):

- Revisions everywhere. Reads return each key's ``mod_revision``; ``create``
  and ``compare_and_swap`` are one transaction comparing it (0 = absent), the
  primitive every single writer of a fact uses.
- Two errors. ``EtcdUnavailable`` when etcd cannot be reached (refused,
  timed out, 5xx), ``EtcdRequestError`` when it answered no (a lease that is
  gone, a compacted watch revision); both name the endpoint and the action.
- Leases with a keeper thread, so a process's keys vanish ``ttl`` seconds
  after it dies.
- Watches on a reader thread of our own: etcd3gw's watcher opens its stream
  without a timeout and loses stream errors in its thread, leaving a consumer
  blocked forever. Here creation is confirmed within the timeout, a dropped
  stream or a refused start revision is raised from the iterator, and
  ``cancel`` ends it from any thread.

Every request carries the client's timeout. An established watch stream has
none (an idle watch is normal): it ends on ``cancel()`` or when the connection
drops; ``Watch.next_event(timeout)`` bounds a wait for one event.

``start_etcd`` (from ``trainer.elastic.server``, re-exported here so one import
serves client and server) runs a private etcd for tests and ``megamoe serve``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import queue
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, NamedTuple
from urllib.parse import urlsplit

from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import (
    ConnectionFailedError,
    ConnectionTimeoutError,
    Etcd3Exception,
    InternalServerError,
)

from trainer.elastic.server import EtcdProcess, start_etcd
from trainer.errors import EtcdUnavailable, MegamoeError

if TYPE_CHECKING:  # etcd3gw's HTTP session is a requests.Session
    import requests

__all__ = [
    "Etcd",
    "EtcdProcess",
    "EtcdRequestError",
    "EtcdUnavailable",
    "Lease",
    "LeaseKeeper",
    "Watch",
    "WatchEvent",
    "start_etcd",
]

log = logging.getLogger("megamoe.etcd")

DEFAULT_PORT = 2379
DEFAULT_TIMEOUT_S = 5.0
GRPC_NOT_FOUND = 5  # the gateway's error body carries etcd's gRPC status code


class EtcdRequestError(MegamoeError):
    """etcd answered but refused the request; the message names the action and etcd's reason."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code  # gRPC status code, when etcd gave one


def _bytes(data: str | bytes) -> bytes:
    return data.encode() if isinstance(data, str) else data


def _text(data: str | bytes) -> str:
    return data if isinstance(data, str) else data.decode(errors="backslashreplace")


def _b64(data: str | bytes) -> str:
    return base64.b64encode(_bytes(data)).decode("ascii")


def _prefix_end(prefix: str | bytes) -> bytes:
    """The range end covering every key that starts with ``prefix`` (etcd's convention)."""
    end = bytearray(_bytes(prefix)).rstrip(b"\xff")
    if not end:
        raise ValueError(f"etcd prefix {prefix!r} must have a byte below 0xff")
    end[-1] += 1
    return bytes(end)


def _kv(kv: dict[str, Any]) -> tuple[str, bytes, int]:
    """(key, value, mod_revision) of one key-value of the gateway's JSON."""
    return (
        base64.b64decode(kv["key"]).decode(),
        base64.b64decode(kv.get("value", "")),
        int(kv["mod_revision"]),
    )


def _parse_endpoint(endpoint: str) -> tuple[str, str, int]:
    """(scheme, host, port) of ``host:port`` or ``http(s)://host:port``."""
    url = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    try:
        port = url.port or DEFAULT_PORT
        valid = url.scheme in ("http", "https") and bool(url.hostname) and url.path in ("", "/")
    except ValueError:  # a port that is not a number
        valid = False
    if not valid:
        raise ValueError(f"etcd endpoint {endpoint!r} must look like host:port or http://host:port")
    return url.scheme, url.hostname, port


def _reason(text: str) -> tuple[str, int | None]:
    """etcd's message and gRPC code from an error body, else the text as it is."""
    try:
        body = json.loads(text)
        return str(body.get("message") or body.get("error") or text), body.get("code")
    except (ValueError, AttributeError):
        return text, None


class Etcd:
    """A client of one etcd endpoint; every call fails within ``timeout`` seconds."""

    def __init__(self, endpoint: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        scheme, host, port = _parse_endpoint(endpoint)
        if timeout <= 0:
            raise ValueError(f"etcd timeout {timeout!r} must be a positive number of seconds")
        self.endpoint = f"{host}:{port}"
        self.timeout = timeout
        # api_path fixed: etcd >= 3.4 serves /v3/, and discovery would cost a request.
        self._client = Etcd3Client(
            host=host, port=port, protocol=scheme, timeout=timeout, api_path="/v3/"
        )
        # etcd is cluster-internal: an HTTP(S)_PROXY meant for the internet must not capture it.
        self._client.session.trust_env = False
        self.on_error: Callable[[], None] | None = None  # called per failed request (metrics)

    def _post(self, path: str, payload: dict[str, Any], action: str) -> dict[str, Any]:
        try:
            return self._client.post(self._client.get_url(path), json=payload)
        except (ConnectionFailedError, ConnectionTimeoutError, InternalServerError) as exc:
            self._failed()
            raise self._unavailable(action, _reason(exc.detail_text or str(exc))[0]) from exc
        except Etcd3Exception as exc:  # any other HTTP status
            self._failed()
            raise self._refused(action, exc.detail_text or str(exc)) from exc

    def _failed(self) -> None:
        if self.on_error is not None:
            self.on_error()

    def _unavailable(self, action: str, reason: object) -> EtcdUnavailable:
        return EtcdUnavailable(f"etcd at {self.endpoint} unreachable while {action}: {reason}")

    def _refused(self, action: str, body: str) -> MegamoeError:
        message, code = _reason(body)
        if code is None:  # not etcd's answer (a proxy's error page): etcd itself was not reached
            return self._unavailable(action, message)
        return EtcdRequestError(f"etcd at {self.endpoint} refused {action}: {message}", code)

    def _range(self, key: str | bytes, action: str, **fields: Any) -> dict[str, Any]:
        return self._post("/kv/range", {"key": _b64(key), **fields}, action)

    def get(self, key: str | bytes) -> tuple[bytes, int] | None:
        """(value, mod_revision) of ``key``, or None when it does not exist."""
        kvs = self._range(key, f"reading {_text(key)}").get("kvs", [])
        if not kvs:
            return None
        return base64.b64decode(kvs[0].get("value", "")), int(kvs[0]["mod_revision"])

    def get_prefix(self, prefix: str | bytes) -> list[tuple[str, bytes, int]]:
        """(key, value, mod_revision) of every key under ``prefix``, sorted by key."""
        result = self._range(
            prefix, f"reading prefix {_text(prefix)}", range_end=_b64(_prefix_end(prefix))
        )
        return [_kv(kv) for kv in result.get("kvs", [])]  # etcd returns a range in key order

    def get_prefixes(self, prefixes: list[str]) -> list[list[tuple[str, bytes, int]]]:
        """``get_prefix`` of each prefix, all read in one transaction (one round trip,
        one consistent revision)."""
        if not prefixes:
            return []
        ranges = [
            {"request_range": {"key": _b64(p), "range_end": _b64(_prefix_end(p))}} for p in prefixes
        ]
        action = f"reading {len(prefixes)} prefixes from {_text(prefixes[0])}"
        result = self._post("/kv/txn", {"compare": [], "success": ranges}, action)
        out = []
        for response in result.get("responses", []):
            kvs = response.get("response_range", {}).get("kvs", [])
            out.append([_kv(kv) for kv in kvs])
        return out

    def revision(self) -> int:
        """The store's current revision (a linearizable read, so it also proves a leader)."""
        result = self._range(b"\0", "reading the store revision", count_only=True)
        return int(result["header"]["revision"])

    @staticmethod
    def _put_request(key: str | bytes, value: str | bytes, lease: Lease | None) -> dict[str, Any]:
        request: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease is not None:
            request["lease"] = lease.id
        return request

    def put(self, key: str | bytes, value: str | bytes, lease: Lease | None = None) -> int:
        """Write ``key``; returns the store revision of the write (the key's new mod_revision)."""
        result = self._post(
            "/kv/put", self._put_request(key, value, lease), f"writing {_text(key)}"
        )
        return int(result["header"]["revision"])

    def create(self, key: str | bytes, value: str | bytes, lease: Lease | None = None) -> bool:
        """Write ``key`` only if it does not exist; False when it does."""
        return self.compare_and_swap(key, value, 0, lease)

    def compare_and_swap(
        self,
        key: str | bytes,
        value: str | bytes,
        expected_mod_revision: int,
        lease: Lease | None = None,
    ) -> bool:
        """Write ``key`` only if its mod_revision is ``expected_mod_revision`` (0: absent)."""
        return self.transaction([(key, expected_mod_revision)], [(key, value, lease)])

    def transaction(
        self,
        compares: list[tuple[str | bytes, int]],
        puts: list[tuple[str | bytes, str | bytes, Lease | None]],
    ) -> bool:
        """Write every ``(key, value, lease)`` of ``puts`` at once, only if each
        ``(key, mod_revision)`` of ``compares`` holds (0: absent); False otherwise."""
        txn = {
            "compare": [
                {"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": rev}
                for key, rev in compares
            ],
            "success": [{"request_put": self._put_request(k, v, lease)} for k, v, lease in puts],
        }
        action = f"updating {_text(puts[0][0])}" + (
            f" and {len(puts) - 1} more" if puts[1:] else ""
        )
        return bool(self._post("/kv/txn", txn, action).get("succeeded", False))

    def delete(self, key: str | bytes) -> bool:
        """Delete ``key``; False when it did not exist."""
        return self._delete({"key": _b64(key)}, f"deleting {_text(key)}") > 0

    def delete_prefix(self, prefix: str | bytes) -> int:
        """Delete every key under ``prefix``; returns how many there were."""
        request = {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))}
        return self._delete(request, f"deleting prefix {_text(prefix)}")

    def _delete(self, request: dict[str, Any], action: str) -> int:
        return int(self._post("/kv/deleterange", request, action).get("deleted", 0))

    def lease(self, ttl_seconds: int, lease_id: int = 0) -> Lease:
        """Grant a lease (etcd raises a short TTL to its minimum, about 2 s by default).

        ``lease_id`` 0 lets etcd choose; a chosen id is refused (EtcdRequestError)
        while a lease with that id lives, which lets processes agree on one lease.
        """
        result = self._post(
            "/lease/grant", {"TTL": int(ttl_seconds), "ID": lease_id}, "granting a lease"
        )
        return Lease(self, int(result["ID"]), int(result["TTL"]))

    def watch_prefix(
        self, prefix: str | bytes, start_revision: int | None = None
    ) -> tuple[Watch, Callable[[], None]]:
        """(events, cancel): changes under ``prefix`` from ``start_revision`` (inclusive;
        default: from now). The watch is established when this returns."""
        watch = Watch(self, prefix, start_revision)
        return watch, watch.cancel


class Lease:
    """A lease: keys put with it vanish once ``ttl`` seconds pass without a refresh."""

    def __init__(self, etcd: Etcd, lease_id: int, ttl: int) -> None:
        self.etcd, self.id, self.ttl = etcd, lease_id, ttl

    def refresh(self) -> int:
        """Restart the lease's clock; returns its TTL, or 0 when it had already expired."""
        result = self.etcd._post(
            "/lease/keepalive", {"ID": self.id}, f"refreshing lease {self.id:x}"
        )
        return int(result.get("result", {}).get("TTL", 0))

    def revoke(self) -> None:
        """End the lease now, deleting its keys; a lease that already expired is left as it is."""
        try:
            self.etcd._post("/lease/revoke", {"ID": self.id}, f"revoking lease {self.id:x}")
        except EtcdRequestError as exc:
            if exc.code != GRPC_NOT_FOUND:
                raise

    def keep_alive(self, interval: float | None = None) -> LeaseKeeper:
        """Refresh the lease on a daemon thread every ``interval`` s (default ttl / 3)."""
        return LeaseKeeper(self, interval if interval is not None else self.ttl / 3)


class LeaseKeeper:
    """Refreshes a lease until ``stop()`` or until etcd says it expired (``expired``).

    A refresh that cannot reach etcd is logged and tried again at the next tick,
    so the lease outlives an etcd outage shorter than its TTL. The thread is a
    daemon: when the process dies the refreshes stop and the lease lapses.
    """

    def __init__(self, lease: Lease, interval: float) -> None:
        self.lease = lease
        self._interval = interval
        self._stopped = threading.Event()
        self._expired = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"etcd-lease-{lease.id:x}", daemon=True
        )
        self._thread.start()

    @property
    def expired(self) -> bool:
        return self._expired.is_set()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                if self.lease.refresh() <= 0:
                    log.warning("etcd lease %x expired; its keys are gone", self.lease.id)
                    self._expired.set()
                    return
            except MegamoeError as exc:
                log.warning("could not refresh etcd lease %x: %s", self.lease.id, exc)

    def stop(self) -> None:
        """Stop refreshing (the lease then lapses after its TTL unless revoked)."""
        self._stopped.set()
        self._thread.join(timeout=self.lease.etcd.timeout + self._interval)


class WatchEvent(NamedTuple):
    type: Literal["put", "delete"]
    key: str
    value: bytes  # b"" for a delete
    mod_revision: int


_END = object()  # queued when the stream ends; stays at the head so every later read ends too


class Watch:
    """The events of one watch in revision order.

    Iterating blocks until the next event and stops after ``cancel()``;
    ``next_event(timeout)`` waits at most ``timeout`` seconds. A dropped stream
    raises EtcdUnavailable, a start revision etcd compacted away EtcdRequestError.
    """

    def __init__(self, etcd: Etcd, prefix: str | bytes, start_revision: int | None) -> None:
        self._etcd = etcd
        self._action = f"watching {_text(prefix)}"
        self._events: queue.Queue[Any] = queue.Queue()
        self._created = threading.Event()
        self._lock = threading.Lock()
        self._response: requests.Response | None = None
        self._cancelled = False
        self._failure: MegamoeError | None = None
        request: dict[str, Any] = {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))}
        if start_revision is not None:
            request["start_revision"] = start_revision
        threading.Thread(
            target=self._read, args=({"create_request": request},), name="etcd-watch", daemon=True
        ).start()
        if not self._created.wait(etcd.timeout):
            self.cancel()
            raise etcd._unavailable(self._action, f"no answer within {etcd.timeout} s")
        if self._failure is not None:
            raise self._failure

    def _read(self, payload: dict[str, Any]) -> None:
        client = self._etcd._client
        response = None
        try:
            # Connecting is bounded; reading is not (idle watches are normal): cancel() ends it.
            response = client.session.post(
                client.get_url("/watch"),
                json=payload,
                stream=True,
                timeout=(self._etcd.timeout, None),
            )
            with self._lock:
                self._response = response
                if self._cancelled:
                    return
            if response.status_code >= 500:
                raise self._etcd._unavailable(self._action, f"HTTP {response.status_code}")
            if response.status_code != 200:
                raise self._etcd._refused(self._action, response.text)
            for line in response.iter_lines(chunk_size=None):
                if line:
                    self._handle(json.loads(line))
            self._fail(self._etcd._unavailable(self._action, "the stream was closed"))
        except MegamoeError as exc:
            self._fail(exc)
        except Exception as exc:  # the thread must always report how the stream ended
            self._fail(self._etcd._unavailable(self._action, exc))
        finally:
            if response is not None:
                response.close()
            self._created.set()
            self._events.put(_END)

    def _handle(self, message: dict[str, Any]) -> None:
        if "error" in message:  # the gateway lost its stream to etcd, or etcd refused
            error = message["error"]
            reason = error.get("message", "stream error")
            if int(error.get("http_code", 500)) >= 500:
                raise self._etcd._unavailable(self._action, reason)
            raise EtcdRequestError(
                f"etcd at {self._etcd.endpoint} refused {self._action}: {reason}",
                error.get("grpc_code"),
            )
        result = message.get("result", {})
        if result.get("canceled"):
            reason = result.get("cancel_reason") or "canceled by etcd"
            if result.get("compact_revision"):
                reason = f"start revision compacted (oldest kept {result['compact_revision']})"
            raise EtcdRequestError(
                f"etcd at {self._etcd.endpoint} refused {self._action}: {reason}"
            )
        if result.get("created"):
            self._created.set()
        for event in result.get("events", []):
            kv = event["kv"]
            self._events.put(
                WatchEvent(
                    "delete" if event.get("type") == "DELETE" else "put",
                    base64.b64decode(kv["key"]).decode(),
                    base64.b64decode(kv.get("value", "")),
                    int(kv["mod_revision"]),
                )
            )

    def _fail(self, error: MegamoeError) -> None:
        if not self._cancelled and self._failure is None:
            self._failure = error

    def cancel(self) -> None:
        """End the watch (idempotent, any thread); iteration then stops."""
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            response = self._response
        if response is not None:
            _shutdown(response)
        self._events.put(_END)

    def _take(self, item: Any) -> WatchEvent:
        if item is _END or self._cancelled:
            self._events.put(_END)
            if self._failure is not None and not self._cancelled:
                raise self._failure
            raise StopIteration
        return item

    def __iter__(self) -> Watch:
        return self

    def __next__(self) -> WatchEvent:
        return self._take(self._events.get())

    def next_event(self, timeout: float) -> WatchEvent | None:
        """The next event, or None if none came within ``timeout`` s or the watch was cancelled."""
        try:
            return self._take(self._events.get(timeout=timeout))
        except (queue.Empty, StopIteration):
            return None


def _shutdown(response: requests.Response) -> None:
    """Wake a thread blocked reading ``response``: shut its socket down (closing does not)."""
    try:
        sock = socket.socket(fileno=os.dup(response.raw.fileno()))
    except (OSError, ValueError, AttributeError):
        return  # already closed
    with sock, contextlib.suppress(OSError):  # already shut down by the peer
        sock.shutdown(socket.SHUT_RDWR)
