"""Prometheus metrics of one training rank (docs/OBSERVABILITY.md holds the contract).

With ``observe.metrics_port`` set, every rank serves its own ``/metrics`` on
``observe.metrics_host`` at ``metrics_port + local index``: the local rank under
torchrun or ``--nproc``, or, when the local executor runs all of a job's nodes
on one machine (``MEGAMOE_RANKS_PER_HOST``), ``node * procs_per_node +
local_rank`` so no two ranks of the machine collide. One port per rank (not one
exporter per node) keeps each rank's numbers its own process's: no gathering
in the hot path, and a hung rank's exporter still answers for it.

The exporter uses a registry of its own (not prometheus-client's global one),
so several ranks in one process (tests) do not collide. Values are updated
once per optimizer step from what the loop already measured; nothing here
synchronises a device or talks to another rank.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

if TYPE_CHECKING:
    from trainer.observe.progress import StepRecord

disable_created_metrics()  # no *_created series: they double every counter for nothing

# Step times from 10 ms (tiny CPU runs) to 2 minutes (352B-scale steps).
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120)
CHECKPOINT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def metrics_port(base: int, local: int) -> int:
    """This rank's port (see the module doc); ``local``: its index among the local ranks."""
    if os.environ.get("MEGAMOE_RANKS_PER_HOST"):  # all nodes of a local job on one machine
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        local += int(os.environ.get("MEGAMOE_NODE", 0)) * per_node
    return base + local


class RankMetrics:
    """One rank's exporter; ``step()`` after every optimizer step."""

    def __init__(
        self, port: int, host: str, job_id: str, rank: int, node: int, generation: int = 0
    ) -> None:
        self.registry = CollectorRegistry()
        labels = {"job_id": job_id, "rank": str(rank), "node": str(node)}
        names = list(labels)
        r = self.registry

        def gauge(name, doc):
            return Gauge(name, doc, names, registry=r).labels(**labels)

        def counter(name, doc, extra=()):
            metric = Counter(name, doc, [*names, *extra], registry=r)
            return metric if extra else metric.labels(**labels)

        self.labels = labels
        self.steps = counter("megamoe_steps", "Optimizer steps this rank finished")
        self.tokens = counter("megamoe_tokens", "Tokens of those steps (the global batch)")
        self.tokens_per_second = gauge(
            "megamoe_tokens_per_second", "Tokens per second over the last 10 steps"
        )
        self.mfu = gauge("megamoe_mfu_ratio", "Model FLOPs utilisation against the device peak")
        self.loss = gauge("megamoe_loss", "The last step's batch-wide loss")
        self.step_seconds = Histogram(
            "megamoe_step_seconds",
            "Wall time of each optimizer step",
            names,
            buckets=STEP_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.comm_bytes = counter(
            "megamoe_comm_bytes", "Bytes this rank's collectives moved", ["op"]
        )
        self.comm_seconds = counter(
            "megamoe_comm_seconds", "Seconds in this rank's collectives", ["op"]
        )
        self.comm_exposed = counter(
            "megamoe_comm_exposed_seconds",
            "Seconds the compute thread waited for collectives (not hidden by overlap)",
            ["op"],
        )
        self.expert_tokens = counter(
            "megamoe_expert_tokens",
            "(token, slot) assignments routed to each expert, all layers, the whole batch",
            ["expert"],
        )
        self.dropped = counter("megamoe_tokens_dropped", "Assignments dropped by the capacity rule")
        self.checkpoint_seconds = Histogram(
            "megamoe_checkpoint_seconds",
            "Per checkpoint save: seconds the loop was blocked, seconds to write and commit",
            [*names, "phase"],
            buckets=CHECKPOINT_BUCKETS,
            registry=r,
        )
        self.restarts = counter(
            "megamoe_restarts", "Restarts of the job's world before this process"
        )
        self.restarts.inc(generation)
        self._comm_seen: dict[str, dict[str, float]] = {"bytes": {}, "seconds": {}, "exposed": {}}
        self.server, self._thread = start_http_server(port, host, registry=r)
        self.port = self.server.server_port

    def step(
        self,
        rec: StepRecord,
        tokens_per_s: float,
        mfu: float,
        comm: dict[str, dict[str, float]] | None,
    ) -> None:
        """One optimizer step; ``comm``: this rank's cumulative bytes / seconds / exposed
        seconds per operator (the counters take the increase)."""
        self.steps.inc()
        self.tokens.inc(rec.tokens)
        self.tokens_per_second.set(tokens_per_s)
        self.mfu.set(mfu)
        self.loss.set(rec.loss)
        self.step_seconds.observe(rec.seconds)
        self.dropped.inc(rec.dropped)
        for expert, count in enumerate(rec.expert_tokens or ()):
            self.expert_tokens.labels(**self.labels, expert=str(expert)).inc(count)
        for field, metric in (
            ("bytes", self.comm_bytes),
            ("seconds", self.comm_seconds),
            ("exposed", self.comm_exposed),
        ):
            seen = self._comm_seen[field]
            for op, total in (comm or {}).get(field, {}).items():
                grown = total - seen.get(op, 0.0)
                if grown > 0:
                    metric.labels(**self.labels, op=op or "untagged").inc(grown)
                seen[op] = total

    def checkpoint(self, record: dict[str, Any]) -> None:
        """One finished save (the checkpointer's record: blocked_s, write_s)."""
        for phase, key in (("blocked", "blocked_s"), ("write", "write_s")):
            if record.get(key) is not None:
                self.checkpoint_seconds.labels(**self.labels, phase=phase).observe(record[key])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
