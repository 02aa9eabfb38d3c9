"""ZeRO-1: flat FP32 gradient buffers, sharded AdamW states, gradient sync, parameter all-gather.

Parameters fall into two sync classes (and each into decay / no-decay, since
AdamW decays matrices only):

* replicated over the n ranks of a node (embedding, norms, router, LM head, SP
  attention, shared experts): gradients are summed over n * dp hierarchically -
  reduce-scatter inside the node, then the DP sync across nodes - so each rank
  ends with 1/(n dp) of the buffer, steps AdamW on that shard only, and the
  parameters come back with an all-gather across nodes, then inside the node
  (MegaScale-MoE (arXiv 2505.11432), parallelism section).
* sharded over n (EP experts, TP slices): gradients are summed over dp only;
  each rank keeps 1/dp of its own buffer.

Parameters and their ``.grad`` are views into one flat FP32 buffer per group,
so backward accumulates straight into the main-gradient buffer and the
all-gather writes straight into the parameters.

The DP sync (``comm.grad_sync``):

* ``fp32_rs``: reduce-scatter of the FP32 buffer.
* ``bf16_a2a`` (MegaScale-MoE (arXiv 2505.11432), communication compression):
  cast once to BF16, all-to-all inside the DP group so each rank receives every
  peer's copy of its own shard, sum those copies locally in FP32. Half the bytes
  of ``fp32_rs`` and no BF16 accumulation. The BF16 copy is written into the
  first half of the FP32 buffer's own memory and the all-to-all lands in the
  second half, so no extra full-size buffer is allocated.

The hierarchical sync is pipelined in ``SYNC_CHUNKS`` chunks: the buffer is laid
out as [n, dp, chunks, c], so rank (i, d) owns the contiguous block [i, d]
and chunk k's inter-node step can run while chunk k + 1 is still reduced
inside the node (asynchronous collectives on both groups).

Optimizer-state bytes per rank therefore shrink as 1 / dp (1 / (n dp) for the
replicated class).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from trainer.config import TrainConfig
from trainer.optim import adamw
from trainer.parallel.comm import Comm

# Chunks of the hierarchical (intra-node, then inter-node) sync of replicated gradients.
SYNC_CHUNKS = 4


@dataclass
class FlatGroup:
    params: list[nn.Parameter]
    replicated: bool
    decay: bool
    data: torch.Tensor  # flat parameters (padded)
    grad: torch.Tensor  # flat FP32 main gradients (padded)
    shard: slice  # this rank's slice of the flat buffers
    master: nn.Parameter  # view of data[shard], what AdamW steps
    bucket: int = 0  # backward order: 0 = the last block
    inflight: list | None = None  # handles of the sync's first stage


def _pad_to(numel: int, multiple: int) -> int:
    return math.ceil(numel / multiple) * multiple


def bf16_a2a_sync(buf: torch.Tensor, comm: Comm, tag: str) -> torch.Tensor:
    """Sum ``buf`` (FP32, length divisible by comm.size) over the group via a BF16 all-to-all.

    Returns this rank's FP32 shard (length / size). ``buf`` is consumed: its
    memory holds the BF16 copy (first half) and the received copies (second half).
    """
    N, size = buf.numel(), comm.size
    halves = buf.view(torch.bfloat16)  # 2N bf16 slots over the same bytes
    send, recv = halves[:N], halves[N:]
    # In-place cast, front to back: bf16 chunk c lands on bytes fp32 elements
    # below c * step have already been read from, except for chunk 0 (via a copy).
    step = max(1, N // 16)
    send[:step].copy_(buf[:step].clone())
    for start in range(step, N, step):
        send[start : start + step].copy_(buf[start : start + step])
    comm.all_to_all(send, None, None, tag, out=recv)
    return recv.view(size, N // size).float().sum(0)


def _buckets(model: nn.Module) -> list[list[nn.Parameter]]:
    """Parameters in the order backward finishes them: last block first, the rest last."""
    blocks = list(getattr(model, "blocks", []))
    seen: set[int] = set()
    buckets = []
    for block in reversed(blocks):
        params = list(block.parameters())
        seen.update(id(p) for p in params)
        buckets.append(params)
    buckets.append([p for p in model.parameters() if id(p) not in seen])
    return [b for b in buckets if b]


def chunk_arming(optimizer: ZeroOptimizer, model: nn.Module):
    """A pipeline's ``on_last_backward``: before a chunk's last backward of the step, arm
    the buckets of that chunk's parameters (``model.chunk_parameters``)."""
    return lambda chunk: optimizer.arm(model.chunk_parameters(chunk))


class ZeroOptimizer:
    """AdamW over this rank's shards, with the gradient sync and parameter gather around it.

    Buckets: one per transformer block (plus one for embedding, final norm and
    LM head), each split by sync class and weight decay into flat groups with
    their own shards. With ``overlap`` the first stage of a bucket's sync
    (the intra-node reduce-scatter, or the DP reduce-scatter) is issued
    asynchronously as soon as backward has finished that bucket's gradients
    in the step's last micro-batch (``arm()``), so it runs beside the
    backward of the layers before it; and after the update each bucket's
    parameter all-gather is only started, then waited for by a forward
    pre-hook just before its block runs in the next step (``wait_params()``
    completes every gather, e.g. before reading the parameters outside a
    forward).
    """

    def __init__(
        self,
        model: nn.Module,
        t: TrainConfig,
        n_comm: Comm,
        dp_comm: Comm,
        grad_sync: str,
        overlap: bool = False,
    ) -> None:
        self.n_comm, self.dp_comm, self.grad_sync = n_comm, dp_comm, grad_sync
        self.overlap = overlap
        self.groups: list[FlatGroup] = []
        for bucket, members in enumerate(_buckets(model)):
            for replicated in (True, False):
                for decay in (True, False):
                    params = [
                        p
                        for p in members
                        if p.megamoe_replicated == replicated and (p.dim() >= 2) == decay
                    ]
                    if params:
                        group = self._flatten(params, replicated, decay)
                        group.bucket = bucket
                        self.groups.append(group)
        self.adamw = adamw(
            [
                {
                    "params": [g.master for g in self.groups if g.decay],
                    "weight_decay": t.weight_decay,
                },
                {"params": [g.master for g in self.groups if not g.decay], "weight_decay": 0.0},
            ],
            t.lr,
            (t.beta1, t.beta2),
        )
        self.param_groups = self.adamw.param_groups
        self._members: dict[int, list[nn.Parameter]] = {}  # bucket -> its parameters
        for g in self.groups:
            self._members.setdefault(g.bucket, []).extend(g.params)
        self._armed: set[int] = set()  # buckets whose sync starts when backward finishes them
        self._waiting: dict[int, int] = {}
        self._gathering: dict[int, list] = {}  # bucket -> finishers of its parameter gather
        if overlap:
            for g in self.groups:
                for p in g.params:
                    p.register_post_accumulate_grad_hook(lambda _p, b=g.bucket: self._ready(b))
            # Prefetch: a block's updated parameters are gathered while the blocks before it
            # run the next forward; each block waits for its own bucket just before it runs.
            blocks = list(getattr(model, "blocks", []))
            for bucket, block in enumerate(reversed(blocks)):
                block.register_forward_pre_hook(lambda _m, _a, b=bucket: self.wait_params(b))
            rest = len(blocks)  # the bucket of embedding, final norm and head
            model.register_forward_pre_hook(lambda _m, _a: self.wait_params(rest))

    def arm(self, params=None) -> None:
        """The next backward is the last one through ``params`` (default: every parameter)
        this step: start the sync of each bucket made only of them as soon as it is done.

        An interleaved pipeline rank arms chunk by chunk, before each chunk's last backward
        (its chunks finish at different times). A bucket with parameters outside ``params``
        is not armed: some of its gradients may still be accumulating after this backward
        (``reduce_gradients`` starts it)."""
        ids = None if params is None else {id(p) for p in params}
        for bucket, members in self._members.items():
            if ids is None or all(id(p) in ids for p in members):
                self._armed.add(bucket)
                self._waiting[bucket] = len(members)

    def _ready(self, bucket: int) -> None:
        if bucket not in self._armed:
            return
        self._waiting[bucket] -= 1
        if self._waiting[bucket] == 0:
            for g in self.groups:
                if g.bucket == bucket:
                    self._start(g)

    def _shard_slice(self, numel: int, replicated: bool) -> slice:
        n, dp = self.n_comm, self.dp_comm
        if replicated:
            size = numel // (n.size * dp.size)
            start = n.rank * (numel // n.size) + dp.rank * size
        else:
            size = numel // dp.size
            start = dp.rank * size
        return slice(start, start + size)

    def _flatten(self, params: list[nn.Parameter], replicated: bool, decay: bool) -> FlatGroup:
        ways = (
            self.n_comm.size * self.dp_comm.size * SYNC_CHUNKS if replicated else self.dp_comm.size
        )
        total = _pad_to(sum(p.numel() for p in params), ways)
        device = params[0].device
        data = torch.zeros(total, dtype=torch.float32, device=device)
        grad = torch.zeros(total, dtype=torch.float32, device=device)
        offset = 0
        for p in params:
            numel = p.numel()
            data[offset : offset + numel].copy_(p.detach().reshape(-1))
            p.data = data[offset : offset + numel].view_as(p)
            p.grad = grad[offset : offset + numel].view_as(p)
            offset += numel
        shard = self._shard_slice(total, replicated)
        master = nn.Parameter(data[shard])
        return FlatGroup(params, replicated, decay, data, grad, shard, master)

    def zero_grad(self) -> None:
        for g in self.groups:
            g.grad.zero_()

    def _hierarchical(self, g: FlatGroup) -> bool:
        return g.replicated and self.n_comm.size > 1 and self.dp_comm.size > 1

    def _start(self, g: FlatGroup) -> None:
        """Issue the first stage of this group's gradient sync (asynchronously)."""
        if g.inflight is not None:
            return
        if self._hierarchical(g):
            blocks = self._blocks(g.grad)
            chunks = [blocks[:, :, k].reshape(-1) for k in range(SYNC_CHUNKS)]
            g.inflight = [
                self.n_comm.reduce_scatter(c, "grad_rs_node", async_op=True) for c in chunks
            ]
        elif g.replicated and self.n_comm.size > 1:
            g.inflight = [self.n_comm.reduce_scatter(g.grad, "grad_rs_node", async_op=True)]
        elif self.dp_comm.size > 1 and self.grad_sync == "fp32_rs":
            g.inflight = [self.dp_comm.reduce_scatter(g.grad, "grad_dp", async_op=True)]
        else:
            g.inflight = []

    def reduce_gradients(self) -> None:
        """Sum gradients over their sync class; leaves each group's shard in master.grad."""
        self._armed.clear()
        for g in self.groups:
            self._start(g)  # no-op for buckets already in flight
        for g in self.groups:
            g.master.grad = self._finish(g)
            g.inflight = None

    def _finish(self, g: FlatGroup) -> torch.Tensor:
        if self._hierarchical(g):
            # Chunk k crosses nodes while chunk k + 1 is still reduced inside the node.
            pieces = [
                self._dp_reduce(p.wait(), async_op=self.grad_sync == "fp32_rs") for p in g.inflight
            ]
            return torch.cat([p.wait() if hasattr(p, "wait") else p for p in pieces])
        if g.inflight:
            return g.inflight[0].wait()
        if self.dp_comm.size > 1:  # bf16_a2a: cast and exchange now
            return self._dp_reduce(g.grad)
        return g.grad[g.shard]

    def _dp_reduce(self, buf: torch.Tensor, async_op: bool = False):
        if self.grad_sync == "bf16_a2a":
            return bf16_a2a_sync(buf, self.dp_comm, "grad_dp")  # consumes buf
        return self.dp_comm.reduce_scatter(buf, "grad_dp", async_op=async_op)

    def _blocks(self, flat: torch.Tensor) -> torch.Tensor:
        """The buffer as [n, dp, K, c]: rank (i, d) owns [i, d], chunk k is [:, :, k]."""
        return flat.view(self.n_comm.size, self.dp_comm.size, SYNC_CHUNKS, -1)

    def shard_sq_norm(self) -> torch.Tensor:
        """Sum of squares of this rank's gradient shards (disjoint across all ranks)."""
        total = torch.zeros((), dtype=torch.float64, device=self.dp_comm.device)
        for g in self.groups:
            total += g.master.grad.double().pow(2).sum()
        return total

    def step(self, clip_coef: float) -> None:
        for g in self.groups:
            g.master.grad.mul_(clip_coef)
        self.adamw.step()
        self.gather_params()

    def gather_params(self) -> None:
        """All-gather the updated shards back into every replica's parameters.

        Without overlap this completes here. With overlap each bucket's gather is only
        started, in the order the next forward needs the buckets (embedding first, then
        block 0, 1, ...); ``wait_params`` (called by the forward pre-hooks) completes it.
        """
        for g in sorted(self.groups, key=lambda g: -g.bucket):
            finish = self._hierarchical_gather(g) if self._hierarchical(g) else self._gather(g)
            self._gathering.setdefault(g.bucket, []).append(finish)
        if not self.overlap:
            self.wait_params()

    def wait_params(self, bucket: int | None = None) -> None:
        """Complete the parameter gathers of ``bucket`` (all buckets when None)."""
        buckets = list(self._gathering) if bucket is None else [bucket]
        for b in buckets:
            for finish in self._gathering.pop(b, []):
                finish()

    def _gather(self, g: FlatGroup):
        shard = g.data[g.shard]
        if self.dp_comm.size > 1:  # experts, or replicated parameters on one-rank nodes
            pending = self.dp_comm.all_gather(shard, "param_ag_dp", async_op=True)
        elif g.replicated and self.n_comm.size > 1:
            pending = self.n_comm.all_gather(shard, "param_ag_node", async_op=True)
        else:
            return lambda: None
        return lambda: g.data.copy_(pending.wait())

    def _hierarchical_gather(self, g: FlatGroup):
        """Inter-node all-gather now, intra-node when finished, pipelined over the chunks."""
        blocks = self._blocks(g.data)
        mine = blocks[self.n_comm.rank, self.dp_comm.rank]  # [K, c]
        inter = [
            self.dp_comm.all_gather(mine[k].clone(), "param_ag_dp", async_op=True)
            for k in range(SYNC_CHUNKS)
        ]

        def finish():
            intra = [
                self.n_comm.all_gather(p.wait(), "param_ag_node", async_op=True) for p in inter
            ]
            for k, pending in enumerate(intra):
                blocks[:, :, k].copy_(pending.wait().view(self.n_comm.size, self.dp_comm.size, -1))

        return finish

    def state_bytes(self) -> int:
        """Bytes of AdamW state (exp_avg, exp_avg_sq, step) held by this rank."""
        return sum(
            t.numel() * t.element_size()
            for state in self.adamw.state.values()
            for t in state.values()
            if torch.is_tensor(t)
        )
