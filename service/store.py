"""Jobs in etcd: specs, cancel requests, status, events. The control plane's only state.

Values are protobuf bytes (``JobSpec``, ``JobStatus``, ``JobEvent``); keys come
from ``trainer.elastic.keys``. One writer per fact: the API creates specs and
cancel requests, the reconciler writes status and events. Every status change
is a compare-and-swap on the key's revision, and an event's sequence number is
taken by a compare-and-swap on the job's ``event_seq`` counter, so two control
planes (or one restarted mid-write) can neither lose a transition nor number two
events alike.

``watch_events`` streams a job's history after a sequence number, then its live
events: it notes the store revision, reads the history, and watches from the
next revision, dropping what the history already gave (by seq) - no gap, no
duplicate.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from service._gen.megamoe.v1 import jobs_pb2 as pb
from trainer.elastic.keys import Keys


@dataclass
class IndexEntry:
    job_id: str
    state: int  # pb.JobState
    created_ns: int


@dataclass
class JobView:
    """Everything under ``jobs/<job>/``, from one range read."""

    job_id: str
    spec: pb.JobSpec
    cancel: bool = False
    status: pb.JobStatus | None = None
    status_revision: int = 0  # for put_status; 0 before the reconciler wrote one
    ranks: dict[int, dict[str, Any]] = field(default_factory=dict)  # leased worker reports
    checkpoint: dict[str, Any] | None = None  # newest commit (worker rank 0)
    result: dict[str, Any] | None = None  # the finished run (worker rank 0)
    restoring: dict[str, Any] | None = None  # the checkpoint a world began to load (rank 0)
    event_seq: int = 0  # the last event's seq
    event_seq_revision: int = 0


class JobStore:
    def __init__(self, etcd, keys: Keys) -> None:
        self.etcd, self.keys = etcd, keys

    # ------------------------------------------------------------ specs (API)

    def create(self, job_id: str, spec: pb.JobSpec) -> bool:
        """Store a new job's spec and its index entry; False if the id is taken."""
        spec_key = self.keys.spec(job_id)
        entry = _index_value(pb.PENDING, time.time_ns())
        return self.etcd.transaction(
            [(spec_key, 0)],
            [
                (spec_key, spec.SerializeToString(deterministic=True), None),
                (self.keys.index_entry(job_id), entry, None),
            ],
        )

    def spec(self, job_id: str) -> pb.JobSpec | None:
        got = self.etcd.get(self.keys.spec(job_id))
        return None if got is None else pb.JobSpec.FromString(got[0])

    def view(self, job_id: str) -> JobView | None:
        """The job's spec, cancel request, status and worker reports; None if no such job."""
        return self._view(job_id, self.etcd.get_prefix(self.keys.job(job_id)))

    def views(self, job_ids: list[str]) -> list[JobView | None]:
        """``view`` of several jobs, read in one round trip."""
        found = self.etcd.get_prefixes([self.keys.job(j) for j in job_ids])
        return [self._view(j, kvs) for j, kvs in zip(job_ids, found, strict=True)]

    def _view(self, job_id: str, kvs: list[tuple[str, bytes, int]]) -> JobView | None:
        head = self.keys.job(job_id)
        found = {key[len(head) :]: (value, rev) for key, value, rev in kvs}
        if "spec" not in found:
            return None
        view = JobView(job_id, pb.JobSpec.FromString(found["spec"][0]), "cancel" in found)
        if "status" in found:
            view.status = pb.JobStatus.FromString(found["status"][0])
            view.status_revision = found["status"][1]
        if "event_seq" in found:
            view.event_seq = int(found["event_seq"][0])
            view.event_seq_revision = found["event_seq"][1]
        for name, (value, _) in found.items():
            if name.startswith("ranks/"):
                view.ranks[int(name[len("ranks/") :])] = json.loads(value)
        for name in ("checkpoint", "result", "restoring"):
            if name in found:
                setattr(view, name, json.loads(found[name][0]))
        return view

    def index(self) -> list[IndexEntry]:
        """Every job's id, state and creation time (small values: no spec is read)."""
        head = self.keys.index()
        out = []
        for key, value, _ in self.etcd.get_prefix(head):
            entry = json.loads(value)
            out.append(
                IndexEntry(key[len(head) :], pb.JobState.Value(entry["state"]), entry["created_ns"])
            )
        return out

    def created_ns(self, job_id: str) -> int:
        got = self.etcd.get(self.keys.index_entry(job_id))
        return json.loads(got[0])["created_ns"] if got else time.time_ns()

    def request_cancel(self, job_id: str) -> None:
        self.etcd.put(self.keys.cancel(job_id), b"1")

    # -------------------------------------------------- status (reconciler)

    def status(self, job_id: str) -> tuple[pb.JobStatus, int] | None:
        """(status, revision for compare-and-swap), or None before the reconciler wrote one."""
        got = self.etcd.get(self.keys.status(job_id))
        return None if got is None else (pb.JobStatus.FromString(got[0]), got[1])

    def put_status(self, job_id: str, status: pb.JobStatus, revision: int) -> bool:
        """Replace the status written at ``revision`` (0: none yet) and the job's index
        entry, in one transaction; False if the status moved on meanwhile."""
        key = self.keys.status(job_id)
        entry = _index_value(status.state, status.create_time.ToNanoseconds())
        return self.etcd.transaction(
            [(key, revision)],
            [
                (key, status.SerializeToString(deterministic=True), None),
                (self.keys.index_entry(job_id), entry, None),
            ],
        )

    def commit(self, view: JobView, status: pb.JobStatus, events: list[pb.JobEvent]) -> bool:
        """Write the job's new status, its index entry and ``events`` (numbered on from
        ``view.event_seq``) in one transaction, if neither the status nor the event
        counter moved since ``view`` was read; False otherwise (nothing written)."""
        job_id = view.job_id
        status_key, seq_key = self.keys.status(job_id), self.keys.event_seq(job_id)
        entry = _index_value(status.state, status.create_time.ToNanoseconds())
        puts = [
            (status_key, status.SerializeToString(deterministic=True), None),
            (self.keys.index_entry(job_id), entry, None),
        ]
        seq = view.event_seq
        for event in events:
            seq += 1
            event.job_id, event.seq = job_id, seq
            if not event.HasField("time"):
                event.time.GetCurrentTime()
            puts.append(
                (self.keys.event(job_id, seq), event.SerializeToString(deterministic=True), None)
            )
        if events:
            puts.append((seq_key, str(seq).encode(), None))
        compares = [(status_key, view.status_revision), (seq_key, view.event_seq_revision)]
        return self.etcd.transaction(compares, puts)

    def append_event(self, job_id: str, event: pb.JobEvent) -> int:
        """Give the event the next sequence number and store it; returns the number."""
        key = self.keys.event_seq(job_id)
        while True:
            got = self.etcd.get(key)
            seq, rev = (int(got[0]), got[1]) if got else (0, 0)
            if self.etcd.compare_and_swap(key, str(seq + 1).encode(), rev):
                break
        event.job_id, event.seq = job_id, seq + 1
        if not event.HasField("time"):
            event.time.GetCurrentTime()
        self.etcd.put(self.keys.event(job_id, seq + 1), event.SerializeToString(deterministic=True))
        return seq + 1

    def events(self, job_id: str, after_seq: int = 0) -> list[pb.JobEvent]:
        out = [
            pb.JobEvent.FromString(v) for _, v, _ in self.etcd.get_prefix(self.keys.events(job_id))
        ]
        return [e for e in out if e.seq > after_seq]

    def watch_events(
        self, job_id: str, after_seq: int, until: Callable[[pb.JobEvent], bool]
    ) -> tuple[Iterator[pb.JobEvent], Callable[[], None]]:
        """(events, cancel): the history after ``after_seq``, then live events, in order,
        until ``until(event)`` holds for one; ``cancel()`` (from any thread) ends it."""
        revision = self.etcd.revision()
        history = self.events(job_id, after_seq)
        live, cancel = self.etcd.watch_prefix(self.keys.events(job_id), start_revision=revision + 1)

        def stream() -> Iterator[pb.JobEvent]:
            last = after_seq
            try:
                for event in history:
                    last = event.seq
                    yield event
                    if until(event):
                        return
                for kind, _key, value, _rev in live:
                    if kind != "put":
                        continue
                    event = pb.JobEvent.FromString(value)
                    if event.seq <= last:
                        continue  # already in the history
                    last = event.seq
                    yield event
                    if until(event):
                        return
            finally:
                cancel()

        return stream(), cancel


def _index_value(state: int, created_ns: int) -> bytes:
    return json.dumps({"state": pb.JobState.Name(state), "created_ns": created_ns}).encode()
