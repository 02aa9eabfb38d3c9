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

import time
from collections.abc import Callable, Iterator

from service._gen.megamoe.v1 import jobs_pb2 as pb
from trainer.elastic.keys import Keys


class JobStore:
    def __init__(self, etcd, keys: Keys) -> None:
        self.etcd, self.keys = etcd, keys

    # ------------------------------------------------------------ specs (API)

    def create(self, job_id: str, spec: pb.JobSpec) -> bool:
        """Store a new job's spec; False if the id is taken."""
        return self.etcd.create(self.keys.spec(job_id), spec.SerializeToString(deterministic=True))

    def spec(self, job_id: str) -> pb.JobSpec | None:
        got = self.etcd.get(self.keys.spec(job_id))
        return None if got is None else pb.JobSpec.FromString(got[0])

    def job_ids(self) -> list[str]:
        """Every job id, sorted."""
        head = self.keys.jobs()
        ids = set()
        for key, _, _ in self.etcd.get_prefix(head):
            if key.endswith("/spec"):
                ids.add(key[len(head) : -len("/spec")])
        return sorted(ids)

    def request_cancel(self, job_id: str) -> None:
        self.etcd.put(self.keys.cancel(job_id), b"1")

    def cancel_requested(self, job_id: str) -> bool:
        return self.etcd.get(self.keys.cancel(job_id)) is not None

    # -------------------------------------------------- status (reconciler)

    def status(self, job_id: str) -> tuple[pb.JobStatus, int] | None:
        """(status, revision for compare-and-swap), or None before the reconciler wrote one."""
        got = self.etcd.get(self.keys.status(job_id))
        return None if got is None else (pb.JobStatus.FromString(got[0]), got[1])

    def put_status(self, job_id: str, status: pb.JobStatus, revision: int) -> bool:
        """Replace the status written at ``revision`` (0: none yet); False if it moved on."""
        data = status.SerializeToString(deterministic=True)
        return self.etcd.compare_and_swap(self.keys.status(job_id), data, revision)

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


def now_timestamp(msg) -> None:
    """Set a Timestamp field to now."""
    msg.FromNanoseconds(time.time_ns())
