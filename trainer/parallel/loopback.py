"""One process playing all n ranks of a group: collectives become local copies.

``LoopbackComm`` answers every collective as if each of the other n - 1 ranks
sent exactly what this rank sends: an all-to-all hands back its own input (so
the received split sizes equal the sent ones), an all-gather repeats the
input n times, a reduce-scatter keeps this rank's rows of the input, an
all-reduce leaves the tensor as it is. Shapes, split sizes, the bytes booked
and every operator of the macro module are those of an n-rank run; the values
are not (except at n = 1, where each of these is exactly the collective).

It serves the one-GPU checks (bench/gpu_slice.py): a 352B layer's n = 8 share
runs through the real macro module on a single device, and the macro module at
n = 1 is compared with the single-device reference. Pipeline point-to-point
transfers have no loopback meaning and raise.
"""

from __future__ import annotations

import torch

from trainer.parallel.comm import Comm, CommStats, _nbytes


class LoopbackComm(Comm):
    def __init__(
        self, size: int, device: torch.device | str = "cpu", stats: CommStats | None = None
    ) -> None:
        super().__init__(None, 0, size, stats, torch.device(device))

    def _local(self, kind: str, tag: str, nbytes: int, out: torch.Tensor, async_op: bool, *seen):
        start = self._book(kind, tag, nbytes, *seen)
        return self._run(kind, start, None, async_op, finish=lambda: out, tag=tag)

    def all_to_all(self, inp, in_splits, out_splits, tag, async_op=False, out=None):
        if in_splits is not None and out_splits is not None and in_splits != out_splits:
            raise ValueError(
                f"loopback all_to_all {tag!r}: receiving {out_splits} rows per rank but "
                f"sending {in_splits}; every peer sends what this rank sends"
            )
        rows = inp.shape[0]
        row_bytes = _nbytes(inp) // rows if rows else 0
        sent = (sum(in_splits) - in_splits[0]) if in_splits else rows * (self.size - 1) // self.size
        result = inp.clone() if out is None else out.copy_(inp)
        return self._local("all_to_all", tag, sent * row_bytes, result, async_op, inp)

    def all_gather(self, inp, tag, async_op=False):
        out = inp.repeat(self.size, *([1] * (inp.dim() - 1)))
        return self._local("all_gather", tag, _nbytes(inp) * (self.size - 1), out, async_op, inp)

    def reduce_scatter(self, inp, tag, async_op=False):
        out = inp[: inp.shape[0] // self.size].clone()
        nbytes = _nbytes(out) * (self.size - 1)
        return self._local("reduce_scatter", tag, nbytes, out, async_op, inp)

    def all_reduce(self, tensor, tag, async_op=False, op=None):
        nbytes = 2 * _nbytes(tensor) * (self.size - 1) // self.size
        return self._local("all_reduce", tag, nbytes, tensor, async_op, tensor)

    def send(self, tensor, dst, tag):
        raise NotImplementedError("a loopback group has no pipeline peers to send to")

    def recv(self, shape, dtype, src, tag):
        raise NotImplementedError("a loopback group has no pipeline peers to receive from")
