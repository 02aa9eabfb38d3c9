"""LoopbackComm: one process answering an n-rank group's collectives with local copies."""

import pytest
import torch

from trainer.parallel.loopback import LoopbackComm


def test_collectives_have_the_shapes_and_bytes_of_n_ranks():
    comm = LoopbackComm(4)
    x = torch.arange(8.0).view(8, 1)
    assert comm.all_gather(x, "g").shape == (32, 1)
    assert torch.equal(comm.reduce_scatter(x, "rs"), x[:2])
    out = comm.all_to_all(x, [2, 2, 2, 2], [2, 2, 2, 2], "a2a")
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    assert comm.all_reduce(x, "ar") is x
    handle = comm.all_gather(x, "g", async_op=True)
    assert handle.wait().shape == (32, 1)
    # bytes this rank would put on its links in a 4-rank group (trainer.parallel.comm)
    assert comm.stats.tags["g"] == 2 * 8 * 4 * 3
    assert comm.stats.tags["a2a"] == 6 * 4 and comm.stats.tags["rs"] == 2 * 4 * 3


def test_unequal_splits_and_pipeline_transfers_are_refused():
    comm = LoopbackComm(2)
    with pytest.raises(ValueError, match="receiving \\[1, 3\\] rows per rank but sending"):
        comm.all_to_all(torch.zeros(4, 1), [2, 2], [1, 3], "ep_dispatch")
    with pytest.raises(NotImplementedError, match="no pipeline peers"):
        comm.send(torch.zeros(1), 1, "pp_act")
