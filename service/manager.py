"""The job manager: what JobService does, as a plain object over the store and executor.

It validates specs (``service.spec``), stores them, and answers from what is in
etcd; it never starts or stops processes itself - the reconciler does, seeing
specs and cancel requests appear. A job whose status the reconciler has not
written yet reads as PENDING.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator

from service._gen.megamoe.v1 import jobs_pb2 as pb
from service.errors import AlreadyExists, InvalidArgument, NotFound
from service.spec import validate_job_id, validate_spec
from service.store import JobStore

DEFAULT_PAGE = 50
MAX_PAGE = 500
TERMINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)


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
            return self._job(job_id, spec)
        existing = self.store.spec(job_id)
        same = existing is not None and existing.SerializeToString(
            deterministic=True
        ) == spec.SerializeToString(deterministic=True)
        if not same:
            raise AlreadyExists(f"job {job_id} exists with another spec")
        return self._job(job_id, existing)

    def get(self, job_id: str) -> pb.Job:
        spec = self.store.spec(job_id) if job_id else None
        if spec is None:
            raise NotFound(f"no job {job_id!r}")
        return self._job(job_id, spec)

    def list(self, page_size: int, page_token: str, state: int) -> tuple[list[pb.Job], str]:
        if page_size < 0 or page_size > MAX_PAGE:
            raise InvalidArgument("page_size", f"{page_size} must be between 0 and {MAX_PAGE}")
        size = page_size or DEFAULT_PAGE
        jobs = []
        for job_id in self.store.job_ids():
            if page_token and job_id <= page_token:
                continue
            job = self.get(job_id)
            if state and job.status.state != state:
                continue
            jobs.append(job)
            if len(jobs) == size:
                return jobs, job_id
        return jobs, ""

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
        job = self.get(job_id)
        if not 0 <= node < job.spec.num_nodes:
            raise InvalidArgument(
                "node", f"{node} is not a node of {job_id} (0..{job.spec.num_nodes - 1})"
            )
        if tail_lines < 0:
            raise InvalidArgument("tail_lines", f"{tail_lines} must be >= 0")
        if self._logs is None:
            return iter(())
        return self._logs(job_id, node, tail_lines, follow, active)

    def _job(self, job_id: str, spec: pb.JobSpec) -> pb.Job:
        got = self.store.status(job_id)
        status = (
            got[0] if got else pb.JobStatus(state=pb.PENDING, message="waiting for the reconciler")
        )
        return pb.Job(job_id=job_id, spec=spec, status=status)
