"""GPU timing of collectives, the pipeline and the step (trainer.parallel.timing).

No GPU here: CUDA events are stood in for by marks with known timestamps (the three
methods ``seconds`` uses: ``synchronize``, ``elapsed_time``) and an NCCL work by an
object with ``wait``/``is_completed``/``_get_duration``. What is tested is the
bookkeeping the GPU path runs: which marks bound the exposed time, where the wall time
comes from, when works are let go. The CPU path (host clock) runs for real.
"""

import time

import torch

from trainer.parallel.comm import Comm, CommStats, Pending
from trainer.parallel.pipeline import PipelineTimes
from trainer.parallel.timing import Clock, seconds, total_seconds


class Mark:
    """A recorded CUDA event at a known time (ms)."""

    def __init__(self, ms: float) -> None:
        self.ms = ms

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "Mark") -> float:
        return end.ms - self.ms


class ScriptedClock:
    """A GPU clock whose marks come at the given times, in order."""

    gpu = True

    def __init__(self, *times_ms: float) -> None:
        self.times = list(times_ms)

    def mark(self) -> Mark:
        return Mark(self.times.pop(0))


class NcclWork:
    def __init__(self, duration_ms: float | None, completed: bool = True) -> None:
        self.duration_ms, self.completed, self.waited = duration_ms, completed, False

    def wait(self) -> None:
        self.waited = True  # on a GPU: the compute stream waits, the host does not

    def is_completed(self) -> bool:
        return self.completed

    def _get_duration(self) -> float:
        if self.duration_ms is None:
            raise RuntimeError("timing is not enabled")
        return self.duration_ms


def _gpu_comm(*times_ms) -> Comm:
    comm = Comm(None, 0, 2, CommStats(), torch.device("cpu"))
    comm.clock = ScriptedClock(*times_ms)
    return comm


def test_async_collective_on_gpu_books_the_stalled_stream_as_exposed_and_nccl_time_as_wall():
    comm = _gpu_comm(5.0, 8.0)  # the compute stream reaches the wait at 5 ms, resumes at 8
    work = NcclWork(duration_ms=6.0)
    Pending(comm, "all_to_all", work, Mark(0.0), tag="ep_dispatch").wait()
    assert work.waited
    assert comm.stats.kinds["all_to_all"].seconds == 0  # nothing booked before the step ends
    wall, exposed = comm.stats.totals()  # settles
    assert abs(exposed - 0.003) < 1e-12 and abs(wall - 0.006) < 1e-12
    assert abs(comm.stats.tag_exposed["ep_dispatch"] - 0.003) < 1e-12
    assert comm.stats.deferred == []


def test_without_nccl_timing_the_wall_time_runs_from_issue_to_the_end_of_the_wait():
    comm = _gpu_comm(5.0, 8.0)
    Pending(comm, "all_gather", NcclWork(duration_ms=None), Mark(1.0), tag="attn_kv").wait()
    wall, exposed = comm.stats.totals()
    assert abs(wall - 0.007) < 1e-12 and abs(exposed - 0.003) < 1e-12


def test_a_synchronous_gpu_collective_is_all_exposed():
    comm = _gpu_comm(4.0)  # dist returned at once (no work handle); the stream resumed at 4
    Pending(comm, "all_reduce", None, Mark(1.0), tag="router_stats").wait()
    wall, exposed = comm.stats.totals()
    assert abs(wall - 0.003) < 1e-12 and abs(exposed - 0.003) < 1e-12


def test_completed_works_are_let_go_at_the_next_collective():
    stats = CommStats()
    done, running = NcclWork(2.0), NcclWork(3.0, completed=False)
    stats.deferred += [
        ["all_to_all", "a", Mark(0), Mark(1), Mark(2), done],
        ["all_to_all", "b", Mark(0), Mark(1), Mark(4), running],
    ]
    stats.harvest()
    assert stats.deferred[0][5] == 0.002  # its duration, not the work (its tensors are free)
    assert stats.deferred[1][5] is running
    running.completed = True
    assert abs(stats.totals()[0] - 0.005) < 1e-12


def test_pipeline_times_sum_gpu_intervals():
    times = PipelineTimes(
        compute=[(Mark(0), Mark(3)), (Mark(5), Mark(6))], span=(Mark(0), Mark(10))
    )
    assert abs(times.compute_s - 0.004) < 1e-12 and abs(times.total_s - 0.010) < 1e-12


def test_cpu_clock_is_the_host_clock():
    clock = Clock("cpu")
    assert not clock.gpu
    a = clock.mark()
    time.sleep(0.01)
    b = clock.mark()
    assert 0.009 < seconds(a, b) < 1.0
    assert total_seconds([(a, b), (a, b)]) == 2 * seconds(a, b)
    assert Clock(torch.device("cuda", 0)).gpu  # no CUDA needed to know what it would use
