"""FP8 collectives on real gloo ranks: a non-finite value is counted where it was met and
arrives as NaN, so the step is skipped and the run summary reports it (``fp8_nonfinite``)."""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from tests.distributed.helpers import run_ranks
from trainer.parallel.comm import Comm, DoneHandle
from trainer.parallel.fp8comm import reduce_scatter_fp8


def _nonfinite(rank, world):
    comm = Comm(dist.group.WORLD, rank, world)
    ctx = SimpleNamespace(comm=comm, n=world, issue=lambda f, *a: DoneHandle(f(*a)))
    full = torch.ones(4 * world, 8)
    if rank == 1:
        full[0, 3] = float("inf")  # a partial sum for rank 0's first token
    out = reduce_scatter_fp8(ctx, full, "ffn_rs").wait()
    return comm.stats.nonfinite, out


@pytest.mark.timeout(120)
def test_a_non_finite_partial_sum_is_counted_and_arrives_as_nan():
    (count0, out0), (count1, out1) = run_ranks(2, _nonfinite)
    assert (count0, count1) == (0, 1)
    assert torch.isnan(out0[0, 3]) and torch.isfinite(out0[1:]).all()
    torch.testing.assert_close(out1, torch.full_like(out1, 2.0), rtol=2**-4, atol=0)
