"""The job manager: what JobService does, as a plain object over the store and executor.

It validates specs (``service.spec``), stores them, and answers from what is in
etcd; it never starts or stops processes itself - the reconciler does, seeing
specs and cancel requests appear. A job whose status the reconciler has not
written yet reads as PENDING.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator

from service._gen.megamoe.v1 import jobs_pb2 as pb
from service.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from service.spec import validate_job_id, validate_spec
from service.store import JobStore
from trainer.errors import EtcdUnavailable

DEFAULT_PAGE = 50
MAX_PAGE = 500
TERMINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)
LOG_RECHECK_S = 1.0


class JobManager:
    def __init__(self, store: JobStore, logs: Callable | None = None) -> None:
        self.store = store
        self._logs = logs  # (job_id, node, tail_lines, follow, active) -> Iterator[str]

    def create(self, spec: pb.JobSpec, job_id: str = "") -> pb.Job:
        validate_spec(spec)
        if job_id:
            validate_job_id(job_id)
        else:
            job_id = f"job-{secrets.token_hex(4)}"
        if self.store.create(job_id, spec):
            return self.get(job_id)
        existing = self.store.spec(job_id)
        same = existing is not None and existing.SerializeToString(
            deterministic=True
        ) == spec.SerializeToString(deterministic=True)
        if not same:
            raise AlreadyExists(f"job {job_id} exists with another spec")
        return self.get(job_id)

    def get(self, job_id: str) -> pb.Job:
        view = self.store.view(job_id) if job_id else None
        if view is None:
            raise NotFound(f"no job {job_id!r}")
        return self._job(job_id, view.spec, view.status)

    def list(self, page_size: int, page_token: str, state: int) -> tuple[list[pb.Job], str]:
        """Newest first; the page token is the last job's (creation time, id)."""
        if page_size < 0 or page_size > MAX_PAGE:
            raise InvalidArgument("page_size", f"{page_size} must be between 0 and {MAX_PAGE}")
        after = _parse_token(page_token)
        entries = sorted(self.store.index(), key=lambda e: (-e.created_ns, e.job_id))
        if after is not None:
            entries = [e for e in entries if (-e.created_ns, e.job_id) > after]
        if state:
            entries = [e for e in entries if e.state == state]
        size = page_size or DEFAULT_PAGE
        page = entries[:size]
        jobs = [
            self._job(v.job_id, v.spec, v.status, e.created_ns)
            for e, v in zip(page, self.store.views([e.job_id for e in page]), strict=True)
            if v is not None  # deleted between the index read and now
        ]
        more = len(entries) > size
        last = entries[size - 1] if more else None
        return jobs, f"{last.created_ns}.{last.job_id}" if last else ""

    def cancel(self, job_id: str) -> pb.Job:
        job = self.get(job_id)
        if job.status.state not in TERMINAL:
            self.store.request_cancel(job_id)
        return job

    def watch(self, job_id: str, after_seq: int, on_close: Callable) -> Iterator[pb.JobEvent]:
        if after_seq < 0:
            raise InvalidArgument("after_seq", f"{after_seq} must be >= 0")
        self.get(job_id)
        events, cancel = self.store.watch_events(job_id, after_seq, lambda e: e.state in TERMINAL)
        on_close(cancel)
        return events

    def logs(self, job_id: str, node: int, tail_lines: int, follow: bool, active) -> Iterator[str]:
        """Node ``node``'s log; with ``follow``, until the node ends or ``active()`` is False."""
        job = self.get(job_id)
        if not 0 <= node < job.spec.num_nodes:
            raise InvalidArgument(
                "node", f"{node} is not a node of {job_id} (0..{job.spec.num_nodes - 1})"
            )
        if tail_lines < 0:
            raise InvalidArgument("tail_lines", f"{tail_lines} must be >= 0")
        if self._logs is None:
            raise FailedPrecondition("this server runs no executor, so it has no logs")
        if not follow and not _started(job, node):
            raise FailedPrecondition(f"node {node} of {job_id} has not started: no log yet")
        checked = [time.monotonic(), True]

        def running() -> bool:
            """The client is there and the node may still write (etcd asked once a second)."""
            if not active():
                return False
            if time.monotonic() - checked[0] >= LOG_RECHECK_S:
                checked[0] = time.monotonic()
                try:
                    now = self.get(job_id)
                    checked[1] = now.status.state not in TERMINAL and not _ended(now, node)
                except EtcdUnavailable:
                    pass  # etcd is away: keep following
            return checked[1]

        return self._logs(job_id, node, tail_lines, follow, running)

    def _job(
        self, job_id: str, spec: pb.JobSpec, status: pb.JobStatus | None, created_ns: int = 0
    ) -> pb.Job:
        if status is None:
            status = pb.JobStatus(state=pb.PENDING, message="waiting for the reconciler")
            status.create_time.FromNanoseconds(created_ns or self.store.created_ns(job_id))
        return pb.Job(job_id=job_id, spec=spec, status=status)


def _started(job: pb.Job, node: int) -> bool:
    nodes = job.status.nodes
    return node < len(nodes) and nodes[node].state != pb.NODE_PENDING


def _ended(job: pb.Job, node: int) -> bool:
    nodes = job.status.nodes
    return node < len(nodes) and nodes[node].state not in (pb.NODE_PENDING, pb.NODE_RUNNING)


def _parse_token(token: str) -> tuple[int, str] | None:
    if not token:
        return None
    created, _, job_id = token.partition(".")
    if not created.isdigit() or not job_id:
        raise InvalidArgument("page_token", f"{token!r} is not a token from ListJobs")
    return -int(created), job_id
