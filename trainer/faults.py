"""Fault injection for tests and drills (the ``[fault]`` config section; off by default).

A rank slowed by a factor sleeps, before each step's first collective, (factor -
1) x its previous step's compute time, so it computes ``factor`` x as long and the
others wait for it - what a throttled GPU looks like from outside. A hung rank
stops for good before its step (its reporting thread lives on, as a hung CUDA
kernel's process would). A killed rank SIGKILLs itself. Faults apply to one
generation of a job's world (``fault.generation``, default 0; -1 every one), so
the world a restart or a straggler replacement brings up runs clean.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from trainer.config import FaultConfig


class Faults:
    def __init__(self, fault: FaultConfig, rank: int) -> None:
        generation = int(os.environ.get("MEGAMOE_GENERATION", 0))
        active = fault.generation in (-1, generation)
        self.slow = active and fault.slow_rank == rank and fault.slow_factor > 1
        self.factor = fault.slow_factor
        self.hang_at = fault.hang_step if active and fault.hang_rank == rank else None
        self.kill_at = fault.kill_step if active and fault.kill_rank == rank else None
        self._compute_s = 0.0

    @property
    def any(self) -> bool:
        return self.slow or self.hang_at is not None or self.kill_at is not None

    def before_step(self, step: int) -> None:
        """Inside the step's timing, before its first collective."""
        if self.kill_at is not None and step >= self.kill_at:
            print(f"fault: killing this rank before step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.hang_at is not None and step >= self.hang_at:
            print(f"fault: hanging this rank before step {step}", file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)
        if self.slow and self._compute_s:
            time.sleep((self.factor - 1) * self._compute_s)

    def after_step(self, seconds: float, exposed_s: float | None) -> None:
        """Note this step's own compute time (the injected sleep excluded)."""
        if self.slow:
            compute = seconds - (exposed_s or 0.0)
            injected = (self.factor - 1) * self._compute_s
            self._compute_s = max(compute - injected, 1e-4)
