"""1F1B pipeline schedule over ``parallel.pp`` stages (MegaScale-MoE (arXiv 2505.11432)).

Stage s of P runs its M micro-batches as: min(P - s - 1, M) warm-up forwards,
then alternating one forward / one backward, then the remaining backwards.
Activations go forward and their gradients backward with asynchronous
point-to-point sends (``isend``, waited only before the step ends) and
blocking receives, between the same n-index rank of neighbouring stages: the
residual stream stays sequence-sharded across the pipeline. Each stage's
balance loss joins its backward directly (``autograd.backward`` on the
activation and the scaled balance loss together), so no stage has to wait
for the loss of another.

With P = 1 the schedule is plain gradient accumulation: forward, backward,
micro-batch after micro-batch.

Why not torch.distributed.pipelining: its point-to-point transfers bypass the
instrumented collectives (every byte megamoe moves is recorded in
``trainer.parallel.comm``), its loss hook sees only the last stage (the MoE
balance loss comes from every stage), and measuring the bubble needs the
compute / wait split of each stage, which a hand-written schedule of ~100
lines exposes directly.

The bubble is measured per stage as 1 - (seconds computing) / (the pipeline's
makespan: the longest schedule time of any rank this step), averaged over
ranks; the theory for equal stages is (P - 1) / (M + P - 1). Both times are
marks of ``trainer.parallel.timing.Clock``: CUDA events on a GPU (a host clock
there would time the launches), read after the step. The losses stay on the
device until then too: no host read between micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.config import Config
from trainer.parallel.comm import Comm
from trainer.parallel.model import ParallelMoE
from trainer.parallel.timing import Clock, seconds, total_seconds


@dataclass
class PipelineTimes:
    compute: list = field(default_factory=list)  # (start, end) marks of forward/backward work
    span: tuple | None = None  # marks: the schedule's start, its last send completing

    @property
    def compute_s(self) -> float:
        """Forward and backward work, collectives inside a stage included."""
        return total_seconds(self.compute)

    @property
    def total_s(self) -> float:
        """From the schedule's start to its last send completing."""
        return seconds(*self.span) if self.span else 0.0


@dataclass
class PipelineResult:
    loss: torch.Tensor | float = 0.0  # this rank's share of the scaled LM loss (on the device)
    balance: torch.Tensor | float = 0.0  # this rank's scaled balance loss (on the device)
    dropped: int = 0
    expert_counts: torch.Tensor | None = None  # this stage's layers, its group's tokens
    times: PipelineTimes = field(default_factory=PipelineTimes)


def theoretical_bubble(stages: int, micro_batches: int) -> float:
    return (stages - 1) / (micro_batches + stages - 1)


class StageRunner:
    """Runs one stage's share of 1F1B for one optimizer step."""

    def __init__(
        self, model: ParallelMoE, cfg: Config, pp_comm: Comm, peers, on_last_backward=None
    ) -> None:
        self.model, self.cfg, self.pp = model, cfg, pp_comm
        self.clock = Clock(next(model.parameters()).device)
        self.on_last_backward = on_last_backward  # e.g. ZeroOptimizer.arm: DP buckets overlap
        self.prev_rank, self.next_rank = peers  # global ranks of neighbouring stages (or None)
        self.autocast = torch.autocast(
            next(model.parameters()).device.type,
            torch.bfloat16,
            enabled=cfg.train.dtype == "bf16",
        )

    def _act_shape(self, inputs: torch.Tensor) -> tuple[int, ...]:
        return (*inputs.shape, self.cfg.model.hidden)

    def run(self, micro_batches, scale: float) -> PipelineResult:
        stage, stages = self.pp.rank, self.pp.size
        M = len(micro_batches)
        warmup = min(stages - stage - 1, M)
        res, saved, sends = PipelineResult(), {}, []
        start = self.clock.mark()
        order = [("F", i) for i in range(warmup)]
        for i in range(M - warmup):
            order += [("F", warmup + i), ("B", i)]
        order += [("B", i) for i in range(M - warmup, M)]
        for step, (kind, i) in enumerate(order):
            if step == len(order) - 1 and self.on_last_backward:
                self.on_last_backward()
            if kind == "F":
                saved[i] = self._forward(micro_batches[i], scale, res, sends)
            else:
                self._backward(saved.pop(i), micro_batches[i], res, sends)
        for pending in sends:
            pending.wait()
        res.times.span = (start, self.clock.mark())
        return res

    def _forward(self, batch, scale, res, sends):
        inputs, targets = batch
        x = inputs
        if not self.model.first:
            x = self.pp.recv(self._act_shape(inputs), torch.float32, self.prev_rank, "pp_act")
            x.requires_grad_(True)
        t0 = self.clock.mark()
        with self.autocast:
            out, bal, stats = self.model(x)
            loss = self.model.local_loss(out, targets) if self.model.last else None
        res.times.compute.append((t0, self.clock.mark()))
        res.balance = res.balance + bal.detach().double() * scale
        res.dropped += stats["dropped"]
        if stats.get("expert_counts") is not None:
            c = stats["expert_counts"]
            res.expert_counts = c if res.expert_counts is None else res.expert_counts + c
        if loss is not None:
            res.loss = res.loss + loss.detach().double() * scale
        else:
            sends.append(self.pp.send(out.detach().float(), self.next_rank, "pp_act"))
        return x, out, bal, loss, scale

    def _backward(self, state, batch, res, sends):
        x, out, bal, loss, scale = state
        grad = None
        if not self.model.last:
            grad = self.pp.recv(out.shape, torch.float32, self.next_rank, "pp_grad")
        t0 = self.clock.mark()
        if loss is not None:
            ((loss + bal) * scale).backward()
        else:
            torch.autograd.backward([out, bal * scale], [grad.to(out.dtype), None])
        res.times.compute.append((t0, self.clock.mark()))
        if not self.model.first:
            sends.append(self.pp.send(x.grad, self.prev_rank, "pp_grad"))
