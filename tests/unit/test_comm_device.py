"""Every collective's tensors must live on the device its group's backend serves (CUDA for
NCCL, CPU for gloo). The instrumented collectives check it before the backend sees the
tensor, so the mistake - a CPU scalar reduced over an NCCL group, a CPU index tensor meeting
device indices - fails loudly on CPU as on GPU; and the step's own buffers follow the device
they are given."""

from types import SimpleNamespace

import pytest
import torch

from trainer.config import loads
from trainer.parallel.comm import Comm, CommDeviceError
from trainer.parallel.pairs import piece_rows_index
from trainer.parallel.step import step_totals

CUDA = torch.device("cuda")  # declared only: the check raises before any tensor moves


def _collectives(comm: Comm, t: torch.Tensor):
    return {
        "all_to_all": lambda: comm.all_to_all(t, None, None, "ep_dispatch"),
        "all_gather": lambda: comm.all_gather(t, "attn_ag"),
        "reduce_scatter": lambda: comm.reduce_scatter(t, "ffn_rs"),
        "all_reduce": lambda: comm.all_reduce(t, "loss"),
        "send_recv": lambda: comm.send(t, 1, "pp_act"),
    }


@pytest.mark.parametrize("kind", list(_collectives(Comm(None, 0, 2), torch.zeros(1))))
def test_a_cpu_tensor_on_a_cuda_group_is_refused_naming_the_collective(kind):
    comm = Comm(None, 0, 2, device=CUDA)
    call = _collectives(comm, torch.zeros(4, 2, dtype=torch.float64))[kind]
    with pytest.raises(CommDeviceError) as err:
        call()
    message = str(err.value)
    assert message.startswith(f"{kind} ") and "torch.float64 tensor on cpu" in message
    assert "serves cuda tensors" in message
    assert comm.stats.entered == 0  # refused before it counted as entered


def test_a_tensor_on_another_device_than_a_cpu_group_is_refused_too():
    comm = Comm(None, 0, 2, device=torch.device("cpu"))
    with pytest.raises(CommDeviceError, match="on meta"):
        comm.all_reduce(torch.zeros(3, device="meta"), "grad_norm")


def test_the_steps_sums_are_built_on_the_device_they_are_reduced_on():
    cfg = loads("[model]\nexperts = 4\n", [])
    res = SimpleNamespace(loss=2.5, balance=0.5, dropped=3, expert_counts=torch.ones(4))
    totals = step_totals(res, 0.25, cfg, torch.device("meta"))
    assert totals.device.type == "meta" and totals.shape == (8,)
    on_cpu = step_totals(res, 0.25, cfg, torch.device("cpu"))
    assert on_cpu[:4].tolist() == [2.5, 0.5, 3.0, 0.25]


def test_the_chunked_ffn_row_index_lives_where_the_routing_does():
    rows = piece_rows_index(n=2, T_l=8, c=1, Tc=4, device=torch.device("meta"))
    assert rows.device.type == "meta"
    cpu = piece_rows_index(n=2, T_l=8, c=1, Tc=4, device=torch.device("cpu"))
    assert cpu.tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
