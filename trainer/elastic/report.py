"""A worker's reports to the control plane: progress under a lease, commits and the result.

The control plane starts workers with ``MEGAMOE_JOB_ID``, ``MEGAMOE_ETCD`` and
``MEGAMOE_ETCD_PREFIX`` in their environment; ``Reporter.from_env`` is None
without them (``megamoe train`` run by hand reports nothing). Each rank writes:

- ``jobs/<job>/ranks/<rank>``: its latest step, step time, and on rank 0 the
  batch-wide loss, tokens/s and MFU - JSON, under a lease the rank keeps alive,
  so a dead worker's record vanishes by itself. A publisher thread writes the
  newest record at most once per ``interval``: training never waits on etcd.
- rank 0 only, without a lease (facts that outlive the process):
  ``jobs/<job>/checkpoint`` when a checkpoint commits, ``jobs/<job>/result``
  when the run ends (final loss, summary path).

etcd being unreachable never stops training: the reporter warns once per
outage, keeps the newest values, and writes them when etcd answers again.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from trainer.elastic.etcd import Etcd, Lease, LeaseKeeper
from trainer.elastic.keys import DEFAULT_PREFIX, Keys
from trainer.errors import MegamoeError

ENV_JOB = "MEGAMOE_JOB_ID"
ENV_ETCD = "MEGAMOE_ETCD"
ENV_PREFIX = "MEGAMOE_ETCD_PREFIX"
ENV_GENERATION = "MEGAMOE_GENERATION"  # which start of the job's world this is
ENV_RANKS_PER_HOST = "MEGAMOE_RANKS_PER_HOST"  # ranks sharing this machine's cores (local executor)
LEASE_TTL_S = 15
FINAL_FLUSH_S = 10.0  # how long the last write may retry at exit
RECENT_COMMITS = 16  # checkpoint commits the checkpoint key lists (see Reporter.checkpoint)


class Reporter:
    def __init__(
        self,
        etcd: Etcd,
        keys: Keys,
        job_id: str,
        rank: int,
        interval: float = 1.0,
        out: TextIO | None = None,
        final_flush_s: float = FINAL_FLUSH_S,
        generation: int = 0,
    ) -> None:
        self.etcd, self.keys, self.job_id, self.rank = etcd, keys, job_id, rank
        self.generation = generation
        self.interval, self.final_flush_s = interval, final_flush_s
        self.out = out if out is not None else sys.stderr
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # one writer at a time: the thread or flush()
        self._latest: dict[str, Any] | None = None  # this rank's record, not yet written
        self._last: dict[str, Any] = {}  # the step record written last
        self._live_seen: dict[str, Any] = {}
        # () -> fields read afresh every interval, even without a new step: which
        # collective the rank entered last (a hang shows there, not in the steps)
        self.live: Callable[[], dict[str, Any]] | None = None
        self._durable: dict[str, bytes] = {}  # key -> value, not yet written
        self._commits: list[list] = []  # [step, path] of the newest checkpoint commits
        self._lease: Lease | None = None
        self._keeper: LeaseKeeper | None = None
        self._failing = False
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="megamoe-report", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls, rank: int) -> Reporter | None:
        job, endpoint = os.environ.get(ENV_JOB), os.environ.get(ENV_ETCD)
        if not (job and endpoint):
            return None
        keys = Keys(os.environ.get(ENV_PREFIX) or DEFAULT_PREFIX)
        generation = int(os.environ.get(ENV_GENERATION) or 0)
        return cls(Etcd(endpoint), keys, job, rank, generation=generation)

    # ---------------------------------------------------------------- what to report

    def step(self, record: dict[str, Any]) -> None:
        """This rank's newest progress (written by the publisher thread, latest wins)."""
        with self._lock:
            self._latest = {
                **record,
                "rank": self.rank,
                "node": int(os.environ.get("MEGAMOE_NODE", os.environ.get("GROUP_RANK", 0))),
                "generation": self.generation,
                "time": time.time(),
            }

    def checkpoint(self, step: int, path: str) -> None:
        """Rank 0: a checkpoint committed. The value carries this process's last
        ``RECENT_COMMITS`` commits too: several can commit between two writes of the key
        or two looks of the control plane, and each is an event of the job."""
        self._commits = [*self._commits, [step, path]][-RECENT_COMMITS:]
        value = {"step": step, "path": path, "generation": self.generation, "time": time.time()}
        self._durably(self.keys.checkpoint(self.job_id), {**value, "commits": self._commits})

    def restoring(self, path: str, commit: str) -> None:
        """Rank 0: the world is about to load this checkpoint (written before it does)."""
        value = {"path": path, "commit": commit, "generation": self.generation}
        self._durably(self.keys.restoring(self.job_id), {**value, "time": time.time()})
        self.flush(FINAL_FLUSH_S)

    def finished(self, result: dict[str, Any]) -> None:
        """Rank 0: the run ended (final loss, summary path, ...)."""
        value = {**result, "generation": self.generation, "time": time.time()}
        self._durably(self.keys.result(self.job_id), value)

    def _durably(self, key: str, value: dict[str, Any]) -> None:
        with self._lock:
            self._durable[key] = json.dumps(value).encode()
        self._wake.set()

    # ---------------------------------------------------------------- writing

    def _run(self) -> None:
        while not self._stopped.is_set():
            with self._flushing:
                self._flush()
            self._wake.wait(self.interval)
            self._wake.clear()

    def _flush(self) -> bool:
        """Write what is pending; True when nothing is left. The rank's record is written
        when a new step came, or when its live part (``live()``) moved without one."""
        with self._lock:
            pending, durable = self._latest, dict(self._durable)
        live = self.live() if self.live is not None else {}
        record = pending if pending is not None else self._last
        moved = pending is not None or (bool(record) and live != self._live_seen)
        try:
            for key, value in durable.items():
                self.etcd.put(key, value)
                with self._lock:
                    if self._durable.get(key) is value:
                        del self._durable[key]
            if moved:
                key = self.keys.rank(self.job_id, self.rank)
                self.etcd.put(key, json.dumps({**record, **live}), self._leased())
                with self._lock:
                    if self._latest is pending:
                        self._latest = None
                self._last, self._live_seen = record, live
        except MegamoeError as exc:
            if not self._failing:
                print(
                    f"warning: cannot report to the control plane, training goes on: {exc}",
                    file=self.out,
                    flush=True,
                )
            self._failing = True
            return False
        if self._failing:
            print("megamoe: reporting to the control plane again", file=self.out, flush=True)
            self._failing = False
        return True

    def _leased(self) -> Lease:
        """The lease of this rank's record: a new one if the old expired (a long outage)."""
        if self._keeper is None or self._keeper.expired:
            if self._keeper is not None:
                self._keeper.stop()
            self._lease = self.etcd.lease(LEASE_TTL_S)
            self._keeper = self._lease.keep_alive()
        return self._lease

    def flush(self, timeout: float) -> bool:
        """Write what is pending now, retrying up to ``timeout`` seconds; True if written."""
        deadline = time.monotonic() + timeout
        while True:
            with self._flushing:
                if self._flush():
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)

    def close(self) -> None:
        """Write what is pending (retrying up to ``final_flush_s``), then drop the lease."""
        self._stopped.set()
        self._wake.set()
        self._thread.join()
        self.flush(self.final_flush_s)
        if self._keeper is not None:
            self._keeper.stop()
            with contextlib.suppress(MegamoeError):  # else it lapses after its TTL
                self._lease.revoke()
