"""The per-step progress display and the run summary.

One line per logged step (plain text, so it reads the same in a terminal, a
pod log or a CI transcript), and at the end the summary dict that
``--summary-json`` writes (DESIGN.md section 5). Summary fields for parts not
built yet are empty, never invented.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from trainer.runtime import StepResult


@dataclass
class StepRecord:
    step: int
    loss: float
    balance_loss: float
    lr: float
    grad_norm: float
    seconds: float
    tokens: int
    dropped: int
    assignments: int
    skipped: bool
    comm_s: float | None = None  # rank 0's collective seconds this step (multi-rank runs)
    exposed_s: float | None = None  # of which the compute thread waited
    expert_tokens: list[int] | None = None  # assignments per routed expert, all layers

    @classmethod
    def of(cls, step: int, r: StepResult, lr: float, seconds: float, tokens: int) -> StepRecord:
        """The record of optimizer step ``step`` from what the step function returned."""
        return cls(
            step,
            r.loss,
            r.balance_loss,
            lr,
            r.grad_norm,
            seconds,
            tokens,
            r.dropped,
            r.assignments,
            r.skipped,
            r.comm_s,
            r.exposed_s,
            r.expert_tokens,
        )


@dataclass
class RunLog:
    """Collects step records, prints progress lines, builds the summary."""

    total_steps: int
    flops_per_token: float
    peak_flops: float  # whole run: per-device peak * devices
    log_interval: int = 1
    out: TextIO = field(default=sys.stdout)
    records: list[StepRecord] = field(default_factory=list)

    def add(self, rec: StepRecord) -> None:
        self.records.append(rec)
        if rec.step % self.log_interval == 0 or rec.step in (1, self.total_steps):
            print(self.line(rec), file=self.out, flush=True)

    def mfu(self, tokens_per_s: float) -> float:
        return self.flops_per_token * tokens_per_s / self.peak_flops

    def line(self, rec: StepRecord) -> str:
        tps = rec.tokens / rec.seconds
        dropped = 100.0 * rec.dropped / max(rec.assignments, 1)
        width = len(str(self.total_steps))
        text = (
            f"step {rec.step:>{width}}/{self.total_steps} | loss {rec.loss:7.4f} "
            f"| balance {rec.balance_loss:.4f} | lr {rec.lr:.2e} | gnorm {rec.grad_norm:6.3f} "
            f"| {tps / 1e3:8.2f}k tok/s | MFU {100 * self.mfu(tps):5.2f}% "
            f"| dropped {dropped:5.2f}% | {rec.seconds * 1e3:7.1f} ms"
        )
        if rec.exposed_s is not None:
            overlap = 1.0 - rec.exposed_s / rec.comm_s if rec.comm_s else 0.0
            text += f" | comm exposed {rec.exposed_s * 1e3:6.1f} ms (overlap {100 * overlap:4.1f}%)"
        return text + (" | SKIPPED (non-finite gradient)" if rec.skipped else "")

    def summary(self, **extra: Any) -> dict[str, Any]:
        recs = self.records
        step_time = statistics.median(r.seconds for r in recs) if recs else 0.0
        tokens_per_step = recs[-1].tokens if recs else 0
        tokens_per_s = tokens_per_step / step_time if step_time else 0.0
        assignments = sum(r.assignments for r in recs)
        dropped = sum(r.dropped for r in recs)
        return {
            "steps": len(recs),
            "tokens": sum(r.tokens for r in recs),
            "losses": [r.loss for r in recs],
            "balance_losses": [r.balance_loss for r in recs],
            "final_loss": recs[-1].loss if recs else None,
            "tokens_per_s": tokens_per_s,
            "mfu": self.mfu(tokens_per_s) if recs else 0.0,
            "step_time_s": step_time,
            "step_times_s": [r.seconds for r in recs],
            "flops_per_token": self.flops_per_token,
            "peak_flops": self.peak_flops,
            "dropped_tokens": dropped,
            "dropped_fraction": dropped / assignments if assignments else 0.0,
            "skipped_steps": sum(r.skipped for r in recs),
            "comm_exposed_s_per_step": [r.exposed_s for r in recs if r.exposed_s is not None],
            "expert_tokens": [r.expert_tokens for r in recs if r.expert_tokens is not None],
            **extra,
        }
