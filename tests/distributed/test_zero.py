"""ZeRO-1 pieces on real gloo ranks: the BF16 all-to-all sync, flat buffers, agreed skipping."""

import math

import pytest
import torch
import torch.distributed as dist

from tests.distributed.helpers import run_ranks, small_config
from trainer.parallel.comm import Comm, Comms
from trainer.parallel.dims import ParallelDims
from trainer.parallel.model import build_parallel_model
from trainer.parallel.pipeline import StageRunner
from trainer.parallel.step import parallel_train_step
from trainer.parallel.zero import ZeroOptimizer, bf16_a2a_sync


def _sync(rank, world):
    torch.manual_seed(rank)
    buf = torch.randn(64) * 10 ** torch.randint(-3, 3, (64,)).float()
    everyone = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(everyone, buf)
    comm = Comm(dist.group.WORLD, rank, world)
    shard = bf16_a2a_sync(buf.clone(), comm, "grad_dp")
    fp32 = Comm(dist.group.WORLD, rank, world)
    exact = fp32.reduce_scatter(buf.clone(), "grad_dp")
    mine = slice(rank * 64 // world, (rank + 1) * 64 // world)
    # What the method promises: each peer's value rounded once to bf16, summed in fp32.
    expected = torch.stack([b[mine].bfloat16().float() for b in everyone]).sum(0)
    return {
        "shard": shard,
        "expected": expected,
        "exact": exact,
        "magnitude": torch.stack([b[mine].abs() for b in everyone]).sum(0),
        "a2a_bytes": comm.stats.tags["grad_dp"],
        "rs_bytes": fp32.stats.tags["grad_dp"],
    }


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 4])
def test_bf16_all_to_all_sums_bf16_copies_in_fp32_with_half_the_bytes(world):
    for r in run_ranks(world, _sync):
        assert torch.equal(r["shard"], r["expected"])
        # One bf16 rounding per term: error bounded by 2^-8 of the summed magnitudes.
        assert torch.all((r["shard"] - r["exact"]).abs() <= 2**-8 * r["magnitude"] + 1e-12)
        assert r["a2a_bytes"] * 2 == r["rs_bytes"]


def _skip_worker(rank, world):
    cfg = small_config(2, "parallel.dp=2", "train.global_batch=4")
    dims = ParallelDims.build(cfg, rank, world)
    comms = Comms.from_dims(dims)
    model = build_parallel_model(cfg, comms.n, dims.n_index, torch.device("cpu"))
    opt = ZeroOptimizer(model, cfg.train, comms.n, comms.dp, cfg.comm.grad_sync)
    flat_ok = all(
        p.grad.untyped_storage().data_ptr()
        in {g.grad.untyped_storage().data_ptr() for g in opt.groups}
        for p in model.parameters()
    )
    before = [p.detach().clone() for p in model.parameters()]
    if rank == 3:  # one rank alone sees a non-finite gradient
        model.blocks[0].w1.register_hook(lambda g: g * math.nan)
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(rank // 2))
    L = 8
    batch = [
        (
            tokens[:, dims.n_index * L : (dims.n_index + 1) * L],
            tokens[:, dims.n_index * L + 1 : (dims.n_index + 1) * L + 1],
        )
    ]
    result = parallel_train_step(
        StageRunner(model, cfg, comms.pp, (None, None)), opt, batch, cfg, comms
    )
    unchanged = all(
        torch.equal(a, p.detach()) for a, p in zip(before, model.parameters(), strict=True)
    )
    grads_in_buffer = all(
        p.grad.untyped_storage().data_ptr()
        in {g.grad.untyped_storage().data_ptr() for g in opt.groups}
        for p in model.parameters()
    )
    return {"skipped": result.skipped, "unchanged": unchanged, "flat": flat_ok and grads_in_buffer}


@pytest.mark.timeout(120)
def test_a_non_finite_gradient_on_one_rank_skips_the_step_everywhere():
    results = run_ranks(4, _skip_worker)
    assert [r["skipped"] for r in results] == [True] * 4
    assert all(r["unchanged"] for r in results)
    assert all(r["flat"] for r in results)  # backward accumulated into the flat buffers


def _arm_worker(rank, world):
    """dp = 2 replicas of a 2-layer model; the sync armed for the last layer's parameters
    only, then one backward: which buckets started their sync during it."""
    cfg = small_config(1, "parallel.dp=2", "train.global_batch=2", "comm.overlap=true")
    dims = ParallelDims.build(cfg, rank, world)
    comms = Comms.from_dims(dims)
    model = build_parallel_model(cfg, comms.n, dims.n_index, torch.device("cpu"))
    opt = ZeroOptimizer(model, cfg.train, comms.n, comms.dp, cfg.comm.grad_sync, overlap=True)
    tokens = torch.randint(0, 64, (1, 17), generator=torch.Generator().manual_seed(rank))
    opt.arm(list(model.blocks[1].parameters()))
    logits, bal, _ = model(tokens[:, :-1])
    (model.local_loss(logits, tokens[:, 1:]) + bal).backward()
    started = sorted({g.bucket for g in opt.groups if g.inflight is not None})
    opt.reduce_gradients()  # finishes what started, starts and finishes the rest
    return {"started": started, "buckets": sorted({g.bucket for g in opt.groups})}


@pytest.mark.timeout(120)
def test_arming_some_parameters_starts_only_their_buckets_during_backward():
    for r in run_ranks(2, _arm_worker):
        # bucket 0 is the last block's (backward finishes it first); bucket 1 the first
        # block's, bucket 2 the embedding, final norm and head: not armed, not started
        assert r["buckets"] == [0, 1, 2]
        assert r["started"] == [0]
