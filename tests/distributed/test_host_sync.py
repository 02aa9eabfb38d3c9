"""No host synchronisation in the macro layer's hot path (trainer.parallel.hostsync).

Every layout's forward and backward run on 2 gloo ranks under ``SyncAudit``, which
records each operator that makes the host read a device value (``.item()``,
``nonzero``, ``bincount``, boolean-mask indexing, ...). On a GPU each of them would
stall the launch queue; here they are caught on the CPU. The only reads allowed are
the counted ``host_ints`` calls: one per layer forward (the split sizes), plus one
when a capacity-bounded all-to-all drops rows.
"""

import pytest
import torch

from tests.distributed.helpers import reference_and_parallel, run_ranks, small_config
from trainer.parallel.hostsync import READS, SyncAudit

LAYOUTS = [
    (attention, ffn, chunks, overlap, fp8)
    for attention in ("sp", "tp")
    for ffn in ("ep_a2a", "ep_agrs", "tp")
    for chunks, overlap, fp8 in ((1, False, False), (2, True, False), (1, True, True))
]


def _audit(rank, world):
    out = {}
    for attention, ffn, chunks, overlap, fp8 in LAYOUTS:
        for capacity in (0.0, 0.5):
            cfg = small_config(
                world,
                "model.shared_experts=1",
                f"parallel.attention={attention}",
                f"parallel.ffn={ffn}",
                f"comm.chunks={chunks}",
                f"comm.overlap={overlap}",
                f"comm.fp8={fp8}",
                f"model.capacity_factor={capacity}",
            )
            *_, model, _, x, y = reference_and_parallel(cfg, rank, world)
            before = READS["count"]
            with SyncAudit() as audit:
                logits, bal, stats = model(x)
                (model.local_loss(logits, y) + bal).backward()
            key = (attention, ffn, chunks, overlap, fp8, capacity)
            out[key] = {
                "found": audit.found,
                "reads": READS["count"] - before,
                "dropped": stats["dropped"],
            }
    return out


@pytest.fixture(scope="module")
def audits():
    return run_ranks(2, _audit)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "-".join(map(str, t)))
def test_layer_forward_and_backward_read_the_host_only_for_split_sizes(audits, layout):
    layers = 2  # helpers.SMALL
    for rank, by_layout in enumerate(audits):
        dropless = by_layout[(*layout, 0.0)]
        assert dropless["found"] == [], f"rank {rank}: implicit host reads {dropless['found']}"
        assert dropless["reads"] == layers, f"rank {rank}: {dropless['reads']} host reads"
        bounded = by_layout[(*layout, 0.5)]
        assert bounded["found"] == [], f"rank {rank}: implicit host reads {bounded['found']}"
        # the receiver-side capacity rule of ep_a2a needs one more read when it drops rows
        extra = layers if layout[1] == "ep_a2a" else 0
        assert bounded["reads"] <= layers + extra
    assert sum(r[(*layout, 0.5)]["dropped"] for r in audits) > 0  # capacity did bind


def test_audit_catches_the_reads_it_is_for():
    t = torch.tensor([0, 2, 1])
    with SyncAudit() as audit:
        t.nonzero()
        int(t[1])
        t[t > 0]
        torch.bincount(t)
        torch.repeat_interleave(t, t)
        torch.repeat_interleave(t, t, output_size=3)  # sized: no read
        torch.sort(t)
    assert audit.found == [
        "aten::nonzero",
        "aten::_local_scalar_dense",
        "aten::index",
        "aten::bincount",
        "aten::repeat_interleave",
    ], audit.found
