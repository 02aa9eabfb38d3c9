"""Points in time on the compute stream's timeline, for durations that mean something.

On the CPU a kernel runs when it is called, so the host clock measures it. On a
GPU the host only queues kernels and runs ahead: a host clock around a forward
measures its launches, not its work. :class:`Clock` gives both the same face: a
mark is ``time.perf_counter()`` on the CPU and a CUDA event recorded on the
current stream on a GPU, and :func:`seconds` turns two marks into elapsed
seconds. GPU marks can be read only once their work has run; callers keep them
and read them at the end of the step (which reads the host anyway), never in
the hot path.
"""

from __future__ import annotations

import time

import torch


class Clock:
    """Marks on this device's timeline: host seconds on the CPU, CUDA events on a GPU."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.gpu = torch.device(device or "cpu").type == "cuda"

    def mark(self):
        if not self.gpu:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event


def seconds(start, end) -> float:
    """Elapsed seconds between two marks of one Clock (waits for GPU marks to complete)."""
    if isinstance(start, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1000.0


def total_seconds(intervals) -> float:
    """The summed length of (start, end) mark pairs."""
    return sum(seconds(a, b) for a, b in intervals)
