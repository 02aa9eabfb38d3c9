"""Pipelines, plain and interleaved, on 2 and 4 gloo ranks against the single-device reference.

Two pipeline ranks (pp = 2) of n = 1 or 2, four layers: with v = 1 rank s holds
layers [2s, 2s + 2); with v = 2 rank 0 holds layers 0 and 2, rank 1 layers 1
and 3, and every micro-batch crosses the ranks four times (0 -> 1 -> 0 -> 1).
The reference runs the same micro-batches one by one on the whole model; the
loss, the balance loss and every gradient must agree with the tolerances of
``test_equivalence.py`` (only the summation order differs).
"""

import pytest
import torch
import torch.distributed as dist

from tests.distributed.helpers import run_ranks, small_config, sync_replicated_grads

TOL = 1e-5
MICRO, ROWS = 4, 2  # micro-batches per step, rows per micro-batch


def _config(n: int, v: int):
    return small_config(
        n,
        "parallel.pp=2",
        f"parallel.virtual_stages={v}",
        "model.layers=4",
        "model.shared_experts=1",
        f"train.global_batch={MICRO * ROWS}",
        f"train.micro_batch={ROWS}",
    )


def _reference(cfg, tokens):
    """Loss, balance loss and gradients of the whole model over the same micro-batches."""
    from trainer.model import MoETransformer, lm_loss

    torch.manual_seed(cfg.train.seed)
    ref = MoETransformer(cfg.model, groups=cfg.parallel.n)
    loss = balance = 0.0
    for mb in tokens.split(ROWS):
        logits, stats = ref(mb[:, :-1])
        ce = lm_loss(logits, mb[:, 1:])
        ((ce + stats.balance_loss) / MICRO).backward()
        loss += ce.item() / MICRO
        balance += stats.balance_loss.item() / MICRO
    return ref, loss, balance


def _bump(counts: dict, key: str) -> None:
    counts[key] += 1


def _compare(rank, world, v):
    from trainer.parallel.comm import Comms
    from trainer.parallel.dims import ParallelDims
    from trainer.parallel.model import ParallelMoE
    from trainer.parallel.pipeline import StageRunner

    n = world // 2
    cfg = _config(n, v)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(
        0, cfg.model.vocab_size, (MICRO * ROWS, cfg.model.seq_len + 1), generator=g
    )
    ref, ref_loss, ref_balance = _reference(cfg, tokens)

    dims = ParallelDims.build(cfg, rank, world)
    comms = Comms.from_dims(dims)
    model = ParallelMoE(cfg, comms.n, dims.n_index, ref, dims.pp_index, dims.pp, virtual_stages=v)
    L = cfg.model.seq_len // n
    cols = slice(dims.n_index * L, (dims.n_index + 1) * L)
    batches = [(mb[:, :-1][:, cols], mb[:, 1:][:, cols]) for mb in tokens.split(ROWS)]
    peers = tuple(dims.rank_of(0, (dims.pp_index + k) % 2, dims.n_index) for k in (-1, 1))
    # backwards finished through the rank's first and last layer when the DP sync is armed
    done = {"first": 0, "last": 0}
    model.blocks[0].ln1_w.register_post_accumulate_grad_hook(lambda _: _bump(done, "first"))
    model.blocks[-1].ln1_w.register_post_accumulate_grad_hook(lambda _: _bump(done, "last"))
    armed = []
    runner = StageRunner(model, cfg, comms.pp, peers, lambda c: armed.append((c, dict(done))))
    res = runner.run(batches, 1.0 / MICRO)
    sync_replicated_grads(model, comms.n)

    totals = torch.stack(
        [torch.as_tensor(res.loss, dtype=torch.float64), torch.as_tensor(res.balance) / n]
    )
    dist.all_reduce(totals)
    ref_params = dict(ref.named_parameters())
    grad_err = {}
    for p in model.parameters():
        place = p.megamoe_place
        ref_grad = place.take(ref_params[place.name].grad)
        grad_err[place.name] = ((p.grad - ref_grad).abs().max() / ref_grad.abs().max()).item()
    return {
        "loss": totals[0].item(),
        "balance": totals[1].item(),
        "ref_loss": ref_loss,
        "ref_balance": ref_balance,
        "grad_err": grad_err,
        "layers": model.layers,
        "act_bytes": comms.pp.stats.tags["pp_act"],
        "grad_bytes": comms.pp.stats.tags["pp_grad"],
        "act_numel": ROWS * L * cfg.model.hidden,
        "units": len(res.times.compute),
        "armed": armed,
    }


@pytest.fixture(scope="module", params=[(2, 1), (2, 2), (4, 1), (4, 2)], ids=str)
def run(request):
    world, v = request.param
    return world, v, run_ranks(world, _compare, v)


@pytest.mark.timeout(300)
def test_loss_and_every_gradient_match_the_reference(run):
    world, v, by_rank = run
    layers_seen = set()
    for rank, r in enumerate(by_rank):
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=TOL)
        assert r["balance"] == pytest.approx(r["ref_balance"], rel=TOL)
        worst = max(r["grad_err"], key=r["grad_err"].get)
        assert r["grad_err"][worst] < TOL, f"rank {rank}/{world} v={v}: {worst} off"
        layers_seen |= {name.split(".")[1] for name in r["grad_err"] if name.startswith("blocks")}
    assert layers_seen == {"0", "1", "2", "3"}  # every layer's gradients were compared
    assert any("embed.weight" in r["grad_err"] for r in by_rank)
    assert any("head.weight" in r["grad_err"] for r in by_rank)


@pytest.mark.timeout(300)
def test_interleaving_places_the_chunks_round_robin_and_sends_v_times(run):
    world, v, by_rank = run
    n = world // 2
    for rank, r in enumerate(by_rank):
        stage = rank // n
        expected = [stage, stage + 2] if v == 2 else [2 * stage, 2 * stage + 1]
        assert r["layers"] == expected
        assert r["units"] == 2 * v * MICRO  # one forward and one backward per (micro-batch, chunk)
        # every chunk but the model's last passes its activations on (rank 1's chunk 0 to
        # rank 0's chunk 1), every chunk but the model's first sends gradients back
        per = 4 * r["act_numel"]  # fp32 bytes of one micro-batch's activations
        sending_chunks = v - (stage == 1)
        assert r["act_bytes"] == sending_chunks * MICRO * per
        assert r["grad_bytes"] == (v - (stage == 0)) * MICRO * per


@pytest.mark.timeout(300)
def test_the_dp_sync_is_armed_chunk_by_chunk_before_each_last_backward(run):
    _, v, by_rank = run
    for r in by_rank:
        if v == 1:  # once, before the step's last backward
            assert r["armed"] == [(0, {"first": MICRO - 1, "last": MICRO - 1})]
            continue
        # chunk 1 (the rank's last layer) first, when its own M - 1 backwards are done and
        # chunk 0 still has backwards to run; then chunk 0, chunk 1 finished by then
        (c1, at1), (c0, at0) = r["armed"]
        assert (c1, c0) == (1, 0)
        assert at1["last"] == MICRO - 1 and at1["first"] < MICRO - 1
        assert at0 == {"first": MICRO - 1, "last": MICRO}
