"""Instrumented collectives: every collective of the trainer goes through here.

Per collective kind (all_to_all, all_gather, reduce_scatter, all_reduce,
send_recv) the recorder counts calls, bytes, wall seconds and exposed seconds,
and per ``tag`` (what the data is: "attn_qkv", "ep_dispatch", "grad_sync", ...)
it counts bytes, so tests can hold each operator to its closed-form volume,
and exposed seconds, so benchmarks can say which operator's traffic shows.

Bytes are what this rank puts on its links, the convention of the volumes in
MegaScale-MoE (arXiv 2505.11432): an all-to-all counts the rows sent to other
ranks (not the part that stays local), an all-gather or reduce-scatter over n
ranks counts (n - 1) / n of the full tensor (what a ring moves per rank), an
all-reduce twice that.

Every collective checks first that its tensors live on the device its group's
backend serves (``Comm.device``: CUDA for NCCL, CPU for gloo) and raises
``CommDeviceError`` otherwise, on CPU as on GPU.

Wall seconds run from issue to completion (for asynchronous work the first
moment it is seen complete - checked at every collective's issue and wait -
not when it is waited for); exposed seconds are
the time the compute thread spent blocked waiting. A synchronous call is all exposed; an
asynchronous one (``async_op=True``) returns a :class:`Pending` whose
``wait()`` records only the blocked part, which is how overlap shows up.

On a GPU the host does not block: NCCL runs every collective on its own
stream beside the compute stream, and ``wait()`` only makes the compute stream
wait for it. The times then come from CUDA events (``trainer.parallel.timing``):
exposed seconds are how long the compute stream stood still at the wait (an
event before it, one after), wall seconds NCCL's own measurement of the
collective (``TORCH_NCCL_ENABLE_TIMING``, which the launcher sets), else issue to
the end of the wait. They are read when the step ends (``CommStats.settle``,
called by every reader of the totals), not in the hot path.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from trainer.parallel.timing import Clock, seconds

if TYPE_CHECKING:
    from trainer.parallel.dims import ParallelDims


def _all_gather_tensor():
    # torch 2.13 renamed the tensor forms; keep working on either name.
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _reduce_scatter_tensor():
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class CommDeviceError(RuntimeError):
    """A collective's tensor lives on another device than the one its group's backend
    serves (a CPU tensor on an NCCL group): a bug in the caller, caught before the backend
    turns it into an obscure failure or a hang."""


@dataclass
class KindStats:
    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0
    exposed_seconds: float = 0.0


@dataclass
class CommStats:
    kinds: dict[str, KindStats] = field(default_factory=lambda: defaultdict(KindStats))
    tags: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    tag_exposed: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    tag_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    # non-finite values the FP8 codec met (sent as NaN; the step skips): a device count
    # summed without reading it, read by whoever reports it (int(stats.nonfinite))
    nonfinite: torch.Tensor | int = 0
    entered: int = 0  # collectives this rank has entered, in order (hang detection)
    last_tag: str = ""  # the operator of the last one
    # GPU collectives waited but not yet booked: [kind, tag, issue, blocked, done marks,
    # NCCL work or its measured seconds] (settle() books them)
    deferred: list[list] = field(default_factory=list)

    def add(self, kind: str, tag: str, wall: float, exposed: float) -> None:
        s = self.kinds[kind]
        s.seconds += wall
        s.exposed_seconds += exposed
        self.tag_seconds[tag] += wall
        self.tag_exposed[tag] += exposed

    def harvest(self) -> None:
        """Take NCCL's duration from the deferred works that have completed and drop the
        works (so their tensors are not held past completion)."""
        for entry in self.deferred:
            work = entry[5]
            if work is not None and not isinstance(work, float) and work.is_completed():
                entry[5] = _nccl_seconds(work)

    def settle(self) -> None:
        """Book the deferred GPU collectives (waits for their events; a no-op on CPU)."""
        self.harvest()
        for kind, tag, start, blocked, done, measured in self.deferred:
            exposed = seconds(blocked, done)
            if not isinstance(measured, float):
                measured = _nccl_seconds(measured) if measured is not None else None
            wall = measured if measured is not None else seconds(start, done)
            self.add(kind, tag, max(wall, exposed), exposed)
        self.deferred.clear()

    def totals(self) -> tuple[float, float]:
        """(wall seconds, exposed seconds) over every kind."""
        self.settle()
        kinds = self.kinds.values()
        return sum(k.seconds for k in kinds), sum(k.exposed_seconds for k in kinds)

    def overlap_ratio(self) -> float:
        """1 - exposed / total: the share of collective time hidden behind computation."""
        total, exposed = self.totals()
        return 1.0 - exposed / total if total else 0.0

    def to_dict(self) -> dict[str, dict[str, float]]:
        self.settle()
        out = {}
        for kind, s in sorted(self.kinds.items()):
            out[kind] = vars(s).copy()
            out[kind]["overlap_ratio"] = 1.0 - s.exposed_seconds / s.seconds if s.seconds else 0.0
        return out

    def per_step(self, steps: int) -> dict[str, dict[str, float]]:
        return {k: {f: v / steps for f, v in s.items()} for k, s in self.to_dict().items()}


_IN_FLIGHT: list[Pending] = []  # this process's async handles not yet seen complete


def _nccl_seconds(work) -> float | None:
    """NCCL's own measurement of a completed collective (CUDA events around its kernel),
    or None where timing is off or the backend has none."""
    try:
        return float(work._get_duration()) / 1000.0
    except (RuntimeError, AttributeError):
        return None


def poll_in_flight() -> None:
    """Stamp the in-flight handles (of every Comm in this process) that have completed.

    Called at every collective's issue and wait, so a handle waited long after its
    work finished (a prefetch) ends its wall time about when it finished, not when
    it was waited for.
    """
    now = time.perf_counter()
    _IN_FLIGHT[:] = [p for p in _IN_FLIGHT if not p.poll(now)]


class Pending:
    """An in-flight collective; ``wait()`` blocks and books the exposed time."""

    def __init__(self, comm: Comm, kind: str, work, start: float, finish=None, tag="") -> None:
        self.comm, self.kind, self.work, self.start, self.finish = comm, kind, work, start, finish
        self.tag = tag
        self._done, self._result = False, None
        self._completed: float | None = None
        if work is not None and hasattr(work, "is_completed") and not comm.clock.gpu:
            _IN_FLIGHT.append(self)

    def poll(self, now: float) -> bool:
        """Note the completion time if the work has finished; True once it has."""
        if self._completed is None and self.work.is_completed():
            self._completed = now
        return self._completed is not None

    def wait(self):
        """Block until done (booked once; later calls return the same result)."""
        if self._done:
            return self._result
        poll_in_flight()
        if self.comm.clock.gpu:
            return self._wait_gpu()
        # A synchronous call blocked the compute thread from its issue on.
        blocked = time.perf_counter() if self.work is not None else self.start
        if self.work is not None:
            self.work.wait()
        done = time.perf_counter()
        if self in _IN_FLIGHT:  # hold no gloo work past its wait (nor past the group's end)
            _IN_FLIGHT.remove(self)
        self.work = None
        end = done if self._completed is None else min(self._completed, done)
        self.comm.stats.add(self.kind, self.tag, end - self.start, done - blocked)
        self._done, self._result = True, self.finish() if self.finish else None
        return self._result

    def _wait_gpu(self):
        """The compute stream waits for NCCL's stream (the host does not); events before
        and after the wait measure how long it stood still, booked at settle()."""
        clock, stats = self.comm.clock, self.comm.stats
        blocked = self.start if self.work is None else clock.mark()
        if self.work is not None:
            self.work.wait()
        stats.deferred.append([self.kind, self.tag, self.start, blocked, clock.mark(), self.work])
        self.work = None
        self._done, self._result = True, self.finish() if self.finish else None
        return self._result


class DoneHandle:
    """The handle of a collective that already ran (synchronous mode).

    ``wait()`` returns its result, so callers treat synchronous and asynchronous
    collectives alike.
    """

    def __init__(self, value) -> None:
        self.value = value

    def wait(self):
        return self.value


class MappedHandle:
    """A handle whose result goes through ``post`` when waited on (e.g. a reshape)."""

    def __init__(self, handle, post) -> None:
        self.handle, self.post = handle, post

    def wait(self):
        return self.post(self.handle.wait())


class JoinedHandle:
    """Several handles waited together; ``post`` gets their results as a list."""

    def __init__(self, handles, post) -> None:
        self.handles, self.post = handles, post

    def wait(self):
        return self.post([h.wait() for h in self.handles])


class PiecesOneAhead:
    """A collective in ``count`` pieces, each issued when the previous one is waited.

    ``start(c)`` issues piece c and returns its handle; ``wait(c)`` waits for piece c
    and issues piece c + 1. Issuing every piece at once would let them share the link
    (gloo runs async work on two threads), so piece 0 would arrive no sooner than the
    whole; one ahead, each piece has the link to itself while the previous piece
    computes - the order a GPU communication stream gives for free.
    """

    def __init__(self, start, count: int) -> None:
        self.start, self.count = start, count
        self.handles = {0: start(0)} if count else {}

    def wait(self, c: int):
        result = self.handles.pop(c).wait()
        if c + 1 < self.count:
            self.handles[c + 1] = self.start(c + 1)
        return result


def issuer(ctx):
    """How an operator pair starts a collective: asynchronous when chunked
    (``ctx.chunks > 1``), else as ``comm.overlap`` says (``ctx.issue``)."""
    if ctx.chunks > 1:
        return lambda collective, *args: collective(*args, async_op=True)
    return ctx.issue


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Comm:
    """Collectives over one process group, recorded into ``stats``."""

    def __init__(
        self, group, rank: int, size: int, stats: CommStats | None = None, device=None
    ) -> None:
        self.group, self.rank, self.size = group, rank, size
        self.device = device or torch.device("cpu")
        self.clock = Clock(self.device)  # host clock on CPU, CUDA events on a GPU
        self.stats = stats if stats is not None else CommStats()  # shared by a rank's Comms

    def _book(self, kind: str, tag: str, nbytes: int, *tensors: torch.Tensor) -> float:
        for t in tensors:
            if t.device.type != self.device.type:
                raise CommDeviceError(
                    f"{kind} {tag!r}: a {t.dtype} tensor on {t.device}, but this group's "
                    f"backend ({self._backend()}) serves {self.device.type} tensors"
                )
        poll_in_flight()
        if self.stats.deferred:
            self.stats.harvest()
        s = self.stats.kinds[kind]
        s.calls += 1
        s.bytes += nbytes
        self.stats.tags[tag] += nbytes
        self.stats.entered += 1
        self.stats.last_tag = tag
        return self.clock.mark()

    def _backend(self) -> str:
        try:
            return str(dist.get_backend(self.group))
        except (RuntimeError, ValueError, AttributeError):
            return "no process group"

    def _run(self, kind, start, work, async_op, finish=None, tag=""):
        pending = Pending(self, kind, work, start, finish, tag)
        return pending if async_op else pending.wait()

    def all_to_all(
        self,
        inp: torch.Tensor,
        in_splits: list[int] | None,
        out_splits: list[int] | None,
        tag: str,
        async_op: bool = False,
        out: torch.Tensor | None = None,
    ):
        """all_to_all_single along dim 0; splits in rows (None = equal). Returns the output.

        ``out`` receives the result when given (it may share memory with nothing in ``inp``).
        """
        rows = inp.shape[0]
        row_bytes = _nbytes(inp) // rows if rows else 0
        sent_rows = (
            (sum(in_splits) - in_splits[self.rank])
            if in_splits
            else rows * (self.size - 1) // self.size
        )
        out_rows = sum(out_splits) if out_splits else rows
        if out is None:
            out = inp.new_empty((out_rows, *inp.shape[1:]))
        start = self._book("all_to_all", tag, sent_rows * row_bytes, inp, out)
        wire_in, wire_out = _wire(inp), _wire(out)
        work = dist.all_to_all_single(
            wire_out, wire_in, out_splits, in_splits, group=self.group, async_op=async_op
        )
        return self._run("all_to_all", start, work, async_op, finish=lambda: out, tag=tag)

    def all_gather(self, inp: torch.Tensor, tag: str, async_op: bool = False):
        """Concatenate every rank's ``inp`` along dim 0 (rank order)."""
        out = inp.new_empty((inp.shape[0] * self.size, *inp.shape[1:]))
        start = self._book("all_gather", tag, _nbytes(inp) * (self.size - 1), inp)
        work = _all_gather_tensor()(
            _wire(out), _wire(inp.contiguous()), group=self.group, async_op=async_op
        )
        return self._run("all_gather", start, work, async_op, finish=lambda: out, tag=tag)

    def reduce_scatter(self, inp: torch.Tensor, tag: str, async_op: bool = False):
        """Sum over ranks, rank r keeps rows [r * rows / n, (r + 1) * rows / n)."""
        out = inp.new_empty((inp.shape[0] // self.size, *inp.shape[1:]))
        start = self._book("reduce_scatter", tag, _nbytes(out) * (self.size - 1), inp)
        work = _reduce_scatter_tensor()(out, inp.contiguous(), group=self.group, async_op=async_op)
        return self._run("reduce_scatter", start, work, async_op, finish=lambda: out, tag=tag)

    def all_reduce(self, tensor: torch.Tensor, tag: str, async_op: bool = False, op=None):
        """In-place reduction over ranks (sum unless ``op``); returns the tensor."""
        nbytes = 2 * _nbytes(tensor) * (self.size - 1) // self.size
        start = self._book("all_reduce", tag, nbytes, tensor)
        op = dist.ReduceOp.SUM if op is None else op
        work = dist.all_reduce(tensor, op=op, group=self.group, async_op=async_op)
        return self._run("all_reduce", start, work, async_op, finish=lambda: tensor, tag=tag)

    def send(self, tensor: torch.Tensor, dst: int, tag: str) -> Pending:
        """Asynchronous point-to-point send to global rank ``dst``; wait() before reuse."""
        tensor = tensor.contiguous()
        start = self._book("send_recv", tag, _nbytes(tensor), tensor)
        work = dist.isend(_wire(tensor), dst)
        return Pending(self, "send_recv", work, start, finish=lambda: tensor, tag=tag)

    def recv(self, shape, dtype: torch.dtype, src: int, tag: str) -> torch.Tensor:
        """Blocking point-to-point receive from global rank ``src`` (all of it exposed)."""
        out = torch.empty(shape, dtype=dtype, device=self.device)
        start = self._book("send_recv", tag, 0)  # bytes are booked by the sender
        dist.recv(_wire(out), src)
        return self._run("send_recv", start, None, False, finish=lambda: out, tag=tag)


@dataclass
class Comms:
    """A rank's Comms over its n, dp, pp and world groups; they share one CommStats."""

    n: Comm
    dp: Comm
    pp: Comm
    world: Comm

    @classmethod
    def from_dims(cls, dims: ParallelDims, device: torch.device | None = None) -> Comms:
        stats = CommStats()
        return cls(
            n=Comm(dims.n_group, dims.n_index, dims.n, stats, device),
            dp=Comm(dims.dp_group, dims.dp_index, dims.dp, stats, device),
            pp=Comm(dims.pp_group, dims.pp_index, dims.pp, stats, device),
            world=Comm(dist.group.WORLD, dims.rank, dims.world, stats, device),
        )

    @property
    def stats(self) -> CommStats:
        return self.world.stats


def _wire(t: torch.Tensor) -> torch.Tensor:
    """float8 crosses gloo as uint8 (native float8 collectives fail there)."""
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return t.view(torch.uint8)
    return t
