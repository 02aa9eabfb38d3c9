"""torchrun's rendezvous over etcd v3: ``--rdzv-backend etcd-v3``.

torch's own etcd backends speak etcd's v2 API, which etcd 3.4 turned off and
3.6 removed. torch's ``DynamicRendezvousHandler`` does the rendezvous logic
(joins, last call, heartbeats, rounds) and needs two things from a backend:

- a ``RendezvousBackend``: get / set one opaque state blob, the set being a
  compare-and-set on a fencing token. Here the blob lives at
  ``Keys(prefix).rdzv_state(run)`` and the token is the key's etcd
  ``mod_revision``. The blob is torch's own serialisation (a pickle, written and
  read only by torch on the nodes of one run); megamoe never decodes it.
- a ``Store`` for the agents: the rank-0 agent's TCPStore address, the worker
  rank assignment and the exit barrier, under ``rdzv_store(run)``. A few dozen
  small operations per round; the workers' process groups use the TCPStore
  the rank-0 agent hosts, not this one. ``get`` / ``wait`` block up to the
  store's timeout by watching etcd (no polling) and then raise DistStoreError;
  ``add`` and ``compare_set`` are compare-and-swap loops on ``mod_revision``.

torchrun finds the handler through the entry point ``torchrun.handlers`` /
``etcd-v3`` (pyproject.toml). ``--rdzv-conf`` keys: ``prefix`` (/megamoe),
``request_timeout`` (10 s per etcd call), ``read_timeout`` (60 s, the store's
blocking wait, as in torch's c10d backend), ``lease_ttl`` (60 s), and torch's
``join_timeout``, ``last_call_timeout``, ``close_timeout``, ``heartbeat``,
``keep_alive_interval``, ``keep_alive_max_attempt``.

Liveness. torch already tracks members: each node writes a heartbeat into the
state every ``keep_alive_interval`` and the others drop a node that misses
``keep_alive_max_attempt`` of them. What it lacks is an end for a run whose
agents all died: torch's v2 backend gives the state a 2-hour TTL, and its store
keys never expire, so a run id used again may find a stale MASTER_ADDR under
the same round's key. Here every key of a run - state and store - is put
under ONE lease whose id is a hash of the run's key prefix: the first agent
to write grants it, the others find it granted and join it, and each agent
refreshes it from a daemon thread while it lives. When the last agent dies the
run's keys vanish together, ``lease_ttl`` seconds later; never the state
without its store or the other way round. Agents do not revoke it on exit: a
peer may still be reading the exit barrier's keys. The trade-offs: a run id
reused within ``lease_ttl`` of its end still sees the closed rendezvous (give
each attempt its own id), and if every agent loses etcd for longer than
``lease_ttl`` the run's keys lapse under live agents, which then fail their
next round (as they would with etcd gone anyway).

etcd failures reach torch as ``RendezvousConnectionError`` (backend) or
``DistNetworkError`` (store), each chained to the EtcdUnavailable that names
the endpoint and the key - except while a formed world trains: then the
backend answers from the last state it saw, so an etcd restart does not end
the run (see ``EtcdRendezvousBackend``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import (
    RendezvousConnectionError,
    RendezvousHandler,
    RendezvousParameters,
    dynamic_rendezvous,
)
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import RendezvousBackend, Token

from trainer.elastic.etcd import Etcd, EtcdRequestError, Lease, LeaseKeeper
from trainer.elastic.keys import DEFAULT_PREFIX, Keys
from trainer.errors import EtcdUnavailable, MegamoeError

log = logging.getLogger("megamoe.rendezvous")

DEFAULT_REQUEST_TIMEOUT_S = 10
DEFAULT_READ_TIMEOUT_S = 60
DEFAULT_LEASE_TTL_S = 60


def run_lease_id(keys: Keys, run: str) -> int:
    """The lease id every agent of ``run`` agrees on: 63 bits of a hash of its key prefix."""
    digest = hashlib.sha256(keys.rdzv(run).encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 1) or 1


class RunLease:
    """This agent's hold on its run's shared lease: joined on first write, refreshed after.

    If etcd reports the lease expired, the next write grants it afresh (the keys
    it held are gone by then, so nothing stale survives).
    """

    def __init__(self, etcd: Etcd, lease_id: int, ttl: int) -> None:
        self._etcd, self._id, self._ttl = etcd, lease_id, ttl
        self._lock = threading.Lock()
        self._keeper: LeaseKeeper | None = None

    def get(self) -> Lease:
        with self._lock:
            if self._keeper is None or self._keeper.expired:
                if self._keeper is not None:
                    self._keeper.stop()
                self._keeper = self._join().keep_alive()
            return self._keeper.lease

    def close(self) -> None:
        """Stop refreshing. The lease is shared by the run's agents, so it is not revoked:
        it lapses after its TTL unless another agent still refreshes it."""
        with self._lock:
            if self._keeper is not None:
                self._keeper.stop()
                self._keeper = None

    def _join(self) -> Lease:
        try:
            return self._etcd.lease(self._ttl, lease_id=self._id)
        except EtcdRequestError:
            # Refused because another agent of the run granted it first: refreshing
            # it joins it and proves it lives. If it does not, the refusal was real.
            ttl = Lease(self._etcd, self._id, self._ttl).refresh()
            if ttl <= 0:
                raise
            return Lease(self._etcd, self._id, ttl)  # the granter's TTL sets our pace


class EtcdRendezvousBackend(RendezvousBackend):
    """The rendezvous state at one key, set by compare-and-swap on its mod_revision.

    Once the world has formed, an etcd outage must not end it: torch's agent asks
    the backend for the state every few seconds while its workers train (are
    nodes waiting to join?) and dies if that raises. So while etcd is unreachable
    the backend answers with the last state it saw, and a write is answered as a
    lost race with that same state: the agent carries on, the workers train, and
    the heartbeats go through again when etcd is back. Before a state was ever
    read (no world yet) an outage is an error, as torch expects.
    """

    def __init__(self, etcd: Etcd, key: str, lease: RunLease) -> None:
        self._etcd, self._key, self._lease = etcd, key, lease
        self._last: tuple[bytes, Token] | None = None
        self._outage = False

    @property
    def name(self) -> str:
        return "etcd-v3"

    def get_state(self) -> tuple[bytes, Token] | None:
        try:
            return self._seen(self._etcd.get(self._key))
        except EtcdUnavailable as exc:
            return self._stale(exc)

    def _seen(self, current: tuple[bytes, Token] | None) -> tuple[bytes, Token] | None:
        if self._outage:
            log.warning("etcd is back at %s; the rendezvous is live again", self._etcd.endpoint)
            self._outage = False
        if current is not None:
            self._last = current
        return current

    def _stale(self, exc: EtcdUnavailable) -> tuple[bytes, Token]:
        if self._last is None:
            raise RendezvousConnectionError(str(exc)) from exc
        if not self._outage:
            log.warning("%s; going on with the last rendezvous state seen", exc)
            self._outage = True
        return self._last

    def set_state(
        self, state: bytes, token: Token | None = None
    ) -> tuple[bytes, Token, bool] | None:
        try:
            return self._set_state(state, token)
        except EtcdUnavailable as exc:
            return (*self._stale(exc), False)

    def _set_state(self, state: bytes, token: Token | None) -> tuple[bytes, Token, bool] | None:
        with _as_rendezvous_error():
            # A token we did not hand out cannot match; torch then gets the current state.
            written = isinstance(token, int | None) and self._etcd.compare_and_swap(
                self._key, state, token or 0, lease=self._lease.get()
            )
            # Read back either way: the (state, token) pair torch keeps is then always
            # one etcd holds, even if another node wrote right after us.
            current = self._seen(self._etcd.get(self._key))
        return None if current is None else (*current, written)


@contextlib.contextmanager
def _as_rendezvous_error() -> Iterator[None]:
    """etcd refusing a request becomes torch's error; etcd unreachable passes through
    (the backend answers from its last state then)."""
    try:
        yield
    except EtcdUnavailable:
        raise
    except MegamoeError as exc:
        raise RendezvousConnectionError(str(exc)) from exc


@contextlib.contextmanager
def _as_store_error() -> Iterator[None]:
    try:
        yield
    except MegamoeError as exc:
        raise dist.DistNetworkError(str(exc)) from exc


class EtcdStore(dist.Store):
    """A c10d Store in etcd keys under one prefix, with c10d's blocking semantics."""

    def __init__(self, etcd: Etcd, prefix: str, lease: RunLease, timeout: timedelta) -> None:
        super().__init__()  # the pybind trampoline needs it
        self._etcd, self._prefix, self._lease = etcd, prefix, lease
        self.set_timeout(timeout)

    def set(self, key: str, value: str | bytes) -> None:
        with _as_store_error():
            self._etcd.put(self._prefix + key, value, lease=self._lease.get())

    def get(self, key: str) -> bytes:
        return self._wait_for([key], self.timeout)[0]

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        self._wait_for(keys, self.timeout if timeout is None else timeout)

    def check(self, keys: list[str]) -> bool:
        with _as_store_error():
            return all(self._etcd.get(self._prefix + key) is not None for key in keys)

    def add(self, key: str, amount: int) -> int:
        """Add to the decimal integer at ``key`` (absent: 0); returns the new value."""
        with _as_store_error():
            while True:
                got = self._etcd.get(self._prefix + key)
                value, revision = (int(got[0]), got[1]) if got else (0, 0)
                if self._etcd.compare_and_swap(
                    self._prefix + key, str(value + amount), revision, lease=self._lease.get()
                ):
                    return value + amount

    def compare_set(self, key: str, expected: str | bytes, desired: str | bytes) -> bytes:
        """c10d's compare_set: set ``desired`` if ``key`` holds ``expected`` (empty:
        absent) and return it; otherwise return what ``key`` holds (absent: ``expected``)."""
        expected, desired = (v.encode() if isinstance(v, str) else v for v in (expected, desired))
        with _as_store_error():
            while True:
                got = self._etcd.get(self._prefix + key)
                if got is None and expected:
                    return expected
                if got is not None and got[0] != expected:
                    return got[0]
                revision = got[1] if got else 0
                if self._etcd.compare_and_swap(
                    self._prefix + key, desired, revision, lease=self._lease.get()
                ):
                    return desired

    def delete_key(self, key: str) -> bool:
        with _as_store_error():
            return self._etcd.delete(self._prefix + key)

    def num_keys(self) -> int:
        with _as_store_error():
            return len(self._etcd.get_prefix(self._prefix))

    # c10d's PrefixStore (which torch wraps this store in) reaches these two through
    # the pybind trampoline under their C++ names.
    deleteKey = delete_key
    getNumKeys = num_keys

    def _wait_for(self, keys: list[str], timeout: timedelta) -> list[bytes]:
        """The values of ``keys`` once all exist; DistStoreError after ``timeout``."""
        deadline = time.monotonic() + timeout.total_seconds()
        with _as_store_error():
            while True:
                # Note the revision before reading, then watch from just after it:
                # a key set between the read and the watch is still seen.
                revision = self._etcd.revision()
                got = [self._etcd.get(self._prefix + key) for key in keys]
                if all(item is not None for item in got):
                    return [item[0] for item in got]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = [key for key, item in zip(keys, got, strict=True) if item is None]
                    raise dist.DistStoreError(
                        f"keys {missing} not set in etcd store {self._prefix} within "
                        f"{timeout.total_seconds():g} s"
                    )
                changes, cancel = self._etcd.watch_prefix(self._prefix, revision + 1)
                try:
                    changes.next_event(remaining)
                finally:
                    cancel()


def _seconds(params: RendezvousParameters, key: str, default: int) -> int:
    value = params.get_as_int(key, default)
    if value is None or value <= 0:
        raise ValueError(f"rendezvous config {key}={value!r} must be a positive number of seconds")
    return value


def create_handler(params: RendezvousParameters) -> RendezvousHandler:
    """torch's DynamicRendezvousHandler over etcd at ``params.endpoint`` (host:port)."""
    keys = Keys(params.get("prefix", DEFAULT_PREFIX))
    etcd = Etcd(params.endpoint, _seconds(params, "request_timeout", DEFAULT_REQUEST_TIMEOUT_S))
    lease = RunLease(
        etcd,
        run_lease_id(keys, params.run_id),
        _seconds(params, "lease_ttl", DEFAULT_LEASE_TTL_S),
    )
    backend = EtcdRendezvousBackend(etcd, keys.rdzv_state(params.run_id), lease)
    read_timeout = _seconds(params, "read_timeout", DEFAULT_READ_TIMEOUT_S)
    store = EtcdStore(etcd, keys.rdzv_store(params.run_id), lease, timedelta(seconds=read_timeout))
    return dynamic_rendezvous.create_handler(store, backend, params)


def torchrun_handler() -> Callable[[RendezvousParameters], RendezvousHandler]:
    """The entry point torchrun loads: it calls this and registers what it returns."""
    return create_handler
