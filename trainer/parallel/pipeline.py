"""1F1B pipeline schedule over ``parallel.pp`` stages, plain or interleaved
(MegaScale-MoE (arXiv 2505.11432); the interleaved order is Megatron-LM's).

Plain (``parallel.virtual_stages`` = 1): pipeline rank s of P runs its M
micro-batches as min(P - s - 1, M) warm-up forwards, then alternating one
forward / one backward, then the remaining backwards.

Interleaved (v > 1): rank s holds v model chunks (its chunk j is model chunk
j P + s, see ``trainer.parallel.model``), so every micro-batch passes through
the ranks v times and there are v M (micro-batch, chunk) units per rank.
Forwards take the micro-batches in groups of P: the group through chunk 0,
then the same group through chunk 1, ..., then the next group; backwards
visit the chunks in reverse. The warm-up is 2 (P - s - 1) + (v - 1) P
forwards (at most v M); the second (P - s - 1) leaves each rank a forward in
hand while a transfer is in flight. Then one forward / one backward, then the
remaining backwards. The ranks idle at fill and drain for one chunk's time
instead of one stage's, so the bubble shrinks v-fold, at the price of v times
as many transfers and more warm-up activations; M must be a multiple of P.

Activations go forward and their gradients backward with asynchronous
point-to-point sends (``isend``, waited only before the step ends) and
blocking receives, between the same n-index rank of neighbouring stages (rank
P - 1's chunk j feeds rank 0's chunk j + 1): the residual stream stays
sequence-sharded across the pipeline. Messages between two ranks arrive in the
order they were sent (one channel, one tag; with P = 2 activations and
gradients share it both ways), and the schedule sends every channel's messages
in the order its receiver asks for them (``tests/unit/test_pipeline_schedule.py``
checks it for P <= 8, v <= 4), so a blocking receive in schedule order always
gets the message it wants. Each chunk's balance loss joins its backward directly
(``autograd.backward`` on the activation and the scaled balance loss
together), so no chunk has to wait for the loss of another.

With P = 1 the schedule is plain gradient accumulation: forward, backward,
micro-batch after micro-batch.

Why not torch.distributed.pipelining: its point-to-point transfers bypass the
instrumented collectives (every byte megamoe moves is recorded in
``trainer.parallel.comm``), its loss hook sees only the last stage (the MoE
balance loss comes from every stage), and measuring the bubble needs the
compute / wait split of each stage, which a hand-written schedule exposes
directly.

The bubble is measured per rank as 1 - (seconds computing) / (the pipeline's
makespan: the longest schedule time of any rank this step), averaged over
ranks; the theory for equal chunks is (P - 1) / (v M + P - 1). Both times are
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

Op = tuple[str, int, int]  # ("F" or "B", micro-batch, local chunk)


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


def theoretical_bubble(stages: int, micro_batches: int, virtual: int = 1) -> float:
    """(P - 1) / (v M + P - 1): fill and drain of one chunk's time against v M of work."""
    return (stages - 1) / (virtual * micro_batches + stages - 1)


def warmup_count(stage: int, stages: int, virtual: int, micro_batches: int) -> int:
    """Forwards pipeline rank ``stage`` runs before its first backward."""
    if virtual == 1:
        return min(stages - stage - 1, micro_batches)
    return min(2 * (stages - stage - 1) + (virtual - 1) * stages, virtual * micro_batches)


def _unit(k: int, stages: int, virtual: int, forward: bool) -> tuple[int, int]:
    """(micro-batch, local chunk) of a rank's k-th forward (or backward)."""
    group, within = divmod(k, stages * virtual)
    chunk = within // stages
    return group * stages + within % stages, chunk if forward else virtual - 1 - chunk


def schedule(stage: int, stages: int, virtual: int, micro_batches: int) -> list[Op]:
    """Pipeline rank ``stage``'s forwards and backwards for one step, in order."""
    if virtual > 1 and micro_batches % stages:
        raise ValueError(
            f"interleaved 1F1B needs the micro-batches ({micro_batches}) to be a multiple "
            f"of the pipeline stages ({stages})"
        )
    total = virtual * micro_batches
    warmup = warmup_count(stage, stages, virtual, micro_batches)
    forwards = [("F", *_unit(k, stages, virtual, True)) for k in range(total)]
    backwards = [("B", *_unit(k, stages, virtual, False)) for k in range(total)]
    order = forwards[:warmup]
    for i in range(total - warmup):
        order += [forwards[warmup + i], backwards[i]]
    return order + backwards[total - warmup :]


class StageRunner:
    """Runs one pipeline rank's share of (interleaved) 1F1B for one optimizer step."""

    def __init__(
        self, model: ParallelMoE, cfg: Config, pp_comm: Comm, peers, on_last_backward=None
    ) -> None:
        self.model, self.cfg, self.pp = model, cfg, pp_comm
        self.clock = Clock(next(model.parameters()).device)
        # on_last_backward(chunk): called before each chunk's last backward of the step
        # (e.g. to arm ZeroOptimizer with that chunk's parameters: DP buckets overlap)
        self.on_last_backward = on_last_backward
        # Global ranks of the pipeline ranks before and after this one (rank 0's "before"
        # is rank P - 1: interleaving wraps round); None where there is no neighbour.
        self.prev_rank, self.next_rank = peers
        self.autocast = torch.autocast(
            next(model.parameters()).device.type,
            torch.bfloat16,
            enabled=cfg.train.dtype == "bf16",
        )

    def run(self, micro_batches, scale: float) -> PipelineResult:
        order = schedule(self.pp.rank, self.pp.size, self.model.chunks, len(micro_batches))
        res, saved, sends = PipelineResult(), {}, []
        last_backward = {chunk: step for step, (kind, _, chunk) in enumerate(order) if kind == "B"}
        start = self.clock.mark()
        for step, (kind, i, chunk) in enumerate(order):
            if self.on_last_backward and last_backward[chunk] == step:
                self.on_last_backward(chunk)
            if kind == "F":
                saved[i, chunk] = self._forward(micro_batches[i], chunk, scale, res, sends)
            else:
                self._backward(saved.pop((i, chunk)), chunk, res, sends)
        for pending in sends:
            pending.wait()
        res.times.span = (start, self.clock.mark())
        return res

    def _act_shape(self, inputs: torch.Tensor) -> tuple[int, ...]:
        return (*inputs.shape, self.cfg.model.hidden)

    def _forward(self, batch, chunk, scale, res, sends):
        inputs, targets = batch
        x = inputs
        if not self.model.takes_tokens(chunk):
            x = self.pp.recv(self._act_shape(inputs), torch.float32, self.prev_rank, "pp_act")
            x.requires_grad_(True)
        t0 = self.clock.mark()
        with self.autocast:
            out, bal, stats = self.model(x, chunk)
            last = self.model.gives_logits(chunk)
            loss = self.model.local_loss(out, targets) if last else None
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

    def _backward(self, state, chunk, res, sends):
        x, out, bal, loss, scale = state
        grad = None
        if loss is None:
            grad = self.pp.recv(out.shape, torch.float32, self.next_rank, "pp_grad")
        t0 = self.clock.mark()
        if loss is not None:
            ((loss + bal) * scale).backward()
        else:
            torch.autograd.backward([out, bal * scale], [grad.to(out.dtype), None])
        res.times.compute.append((t0, self.clock.mark()))
        if not self.model.takes_tokens(chunk):
            sends.append(self.pp.send(x.grad, self.prev_rank, "pp_grad"))
