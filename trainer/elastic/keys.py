"""The etcd key schema: every key megamoe reads or writes, under one prefix. No torch.

One writer per fact: the API writes specs, index entries of new jobs and
cancel requests; the reconciler job status, node records, index states and
events; each worker only its own progress (under a lease, so a dead worker's
keys vanish by themselves) and rank 0 the run's checkpoint commits and
result; torchrun's rendezvous its own state. Values are JSON or protobuf bytes,
never pickles.

    <prefix>/index/<job>                  {"state", "created_ns"}: ListJobs reads only these
    <prefix>/jobs/<job>/spec              JobSpec (API)
    <prefix>/jobs/<job>/cancel            cancel request (API)
    <prefix>/jobs/<job>/status            JobStatus (reconciler)
    <prefix>/jobs/<job>/event_seq         the last event's seq, advanced by compare-and-swap
    <prefix>/jobs/<job>/ranks/<r>         step, loss, tokens/s, ... JSON (worker r, leased)
    <prefix>/jobs/<job>/checkpoint        newest committed checkpoint JSON (worker rank 0)
    <prefix>/jobs/<job>/restoring         the checkpoint the world is loading JSON (worker rank 0)
    <prefix>/jobs/<job>/result            final loss, summary path JSON (worker rank 0)
    <prefix>/events/<job>/<seq>           one JobEvent; seq zero-padded (reconciler)
    <prefix>/rdzv/<run>/state             torchrun's rendezvous state (etcd-v3 backend)
    <prefix>/rdzv/<run>/store/<key>       torchrun's key-value store for that run

Everything the reconciler needs about a job is under ``jobs/<job>/``, one range
read; the events, which grow, live apart so that read stays small.
"""

from __future__ import annotations

DEFAULT_PREFIX = "/megamoe"
SEQ_DIGITS = 12  # events sort by key: seq 7 is ...000000000007


class Keys:
    """Key builder under one prefix (``/megamoe`` unless configured)."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not prefix.startswith("/") or prefix.endswith("/") or "//" in prefix:
            raise ValueError(f"etcd prefix {prefix!r} must look like /name (no trailing slash)")
        self.prefix = prefix

    def index(self) -> str:
        return f"{self.prefix}/index/"

    def index_entry(self, job: str) -> str:
        return f"{self.index()}{job}"

    def job(self, job: str) -> str:
        return f"{self.prefix}/jobs/{job}/"

    def spec(self, job: str) -> str:
        return f"{self.job(job)}spec"

    def cancel(self, job: str) -> str:
        return f"{self.job(job)}cancel"

    def status(self, job: str) -> str:
        return f"{self.job(job)}status"

    def event_seq(self, job: str) -> str:
        return f"{self.job(job)}event_seq"

    def ranks(self, job: str) -> str:
        return f"{self.job(job)}ranks/"

    def rank(self, job: str, rank: int) -> str:
        return f"{self.ranks(job)}{rank}"

    def checkpoint(self, job: str) -> str:
        return f"{self.job(job)}checkpoint"

    def restoring(self, job: str) -> str:
        return f"{self.job(job)}restoring"

    def result(self, job: str) -> str:
        return f"{self.job(job)}result"

    def events(self, job: str) -> str:
        return f"{self.prefix}/events/{job}/"

    def event(self, job: str, seq: int) -> str:
        return f"{self.events(job)}{seq:0{SEQ_DIGITS}d}"

    def rdzv(self, run: str) -> str:
        return f"{self.prefix}/rdzv/{run}/"

    def rdzv_state(self, run: str) -> str:
        return f"{self.rdzv(run)}state"

    def rdzv_store(self, run: str) -> str:
        return f"{self.rdzv(run)}store/"
