"""Where a training process sits, and what one optimizer step reports.

The leaf types shared by the training loop (``trainer.train``) and the
multi-rank step (``trainer.parallel``): keeping them here lets ``parallel/``
build a step without importing the loop that drives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from trainer.errors import ConfigError

if TYPE_CHECKING:
    from trainer.parallel.comm import Comms
    from trainer.parallel.dims import ParallelDims


def pick_device(choice: str) -> torch.device:
    """``train.device`` as a torch device (``auto``: CUDA when there is one)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


@dataclass
class Worker:
    """Where this process sits: rank, world size, device, and the run's total peak FLOP/s."""

    rank: int
    world: int
    device: torch.device
    peak_flops: float
    dims: ParallelDims | None = None  # when world > 1
    comms: Comms | None = None  # when world > 1
    resume_from: str | None = None  # the checkpoint to start from (checked by the launcher)
    reporter: Any = None  # trainer.elastic.report.Reporter when the control plane runs us


@dataclass
class StepResult:
    """One optimizer step as the loop logs it (batch-wide values on rank 0)."""

    loss: float
    balance_loss: float
    grad_norm: float
    dropped: int
    assignments: int
    skipped: bool
    bubble: float | None = None  # measured pipeline bubble fraction (pipelined runs)
    comm_s: float | None = None  # this rank's collective seconds in the step
    exposed_s: float | None = None  # of which the compute thread was blocked
    expert_tokens: list[int] | None = None  # assignments per routed expert, all layers, batch


@dataclass
class Progress:
    """Where training stands after ``step`` optimizer steps: what a checkpoint keeps
    besides the tensors."""

    step: int = 0
    tokens: int = 0
    skipped: int = 0  # steps skipped for a non-finite gradient, since step 1
    sampler: dict[str, Any] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)  # every step since step 1
    balance_losses: list[float] = field(default_factory=list)
    resumed_step: int | None = None  # the checkpoint's step, when this run resumed
    restore_s: float = 0.0  # seconds the restore took

    def advance(self, step: int, tokens: int, r: StepResult, sampler: dict[str, Any]) -> None:
        self.step = step
        self.tokens += tokens
        self.skipped += int(r.skipped)
        self.sampler = sampler
        self.losses.append(r.loss)
        self.balance_losses.append(r.balance_loss)
