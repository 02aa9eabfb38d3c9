"""The etcd key schema: every key megamoe reads or writes, under one prefix. No torch.

One writer per fact (docs/DESIGN of the control plane): the API writes specs and
cancel requests, the reconciler job state, node state and events, each worker
only its own progress and heartbeat (under a lease, so a dead worker's keys
vanish by themselves), torchrun's rendezvous its own state. Values are JSON or
protobuf bytes, never pickles.

    <prefix>/jobs/<job>/spec              JobSpec (API)
    <prefix>/jobs/<job>/cancel            cancel request (API)
    <prefix>/jobs/<job>/status            JobStatus (reconciler)
    <prefix>/jobs/<job>/events/<seq>      one event; seq zero-padded (reconciler)
    <prefix>/jobs/<job>/event_seq         the last event's seq, advanced by compare-and-swap
    <prefix>/jobs/<job>/nodes/<k>         node k's record: pid / pod, state (reconciler)
    <prefix>/jobs/<job>/ranks/<r>/progress   step, loss, tokens/s, ... (worker r, leased)
    <prefix>/rdzv/<run>/state             torchrun's rendezvous state (etcd-v3 backend)
    <prefix>/rdzv/<run>/store/<key>       torchrun's key-value store for that run
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

    def jobs(self) -> str:
        return f"{self.prefix}/jobs/"

    def job(self, job: str) -> str:
        return f"{self.prefix}/jobs/{job}/"

    def spec(self, job: str) -> str:
        return f"{self.job(job)}spec"

    def cancel(self, job: str) -> str:
        return f"{self.job(job)}cancel"

    def status(self, job: str) -> str:
        return f"{self.job(job)}status"

    def events(self, job: str) -> str:
        return f"{self.job(job)}events/"

    def event(self, job: str, seq: int) -> str:
        return f"{self.events(job)}{seq:0{SEQ_DIGITS}d}"

    def event_seq(self, job: str) -> str:
        return f"{self.job(job)}event_seq"

    def nodes(self, job: str) -> str:
        return f"{self.job(job)}nodes/"

    def node(self, job: str, index: int) -> str:
        return f"{self.nodes(job)}{index}"

    def ranks(self, job: str) -> str:
        return f"{self.job(job)}ranks/"

    def progress(self, job: str, rank: int) -> str:
        return f"{self.ranks(job)}{rank}/progress"

    def rdzv(self, run: str) -> str:
        return f"{self.prefix}/rdzv/{run}/"

    def rdzv_state(self, run: str) -> str:
        return f"{self.rdzv(run)}state"

    def rdzv_store(self, run: str) -> str:
        return f"{self.rdzv(run)}store/"

    @staticmethod
    def job_of(key: str, prefix: str) -> str | None:
        """The job id in a key under ``<prefix>/jobs/``, or None."""
        head = f"{prefix}/jobs/"
        if not key.startswith(head):
            return None
        return key[len(head) :].split("/", 1)[0] or None
