"""`megamoe train --set parallel.virtual_stages=2`: interleaved 1F1B trains the same model.

Two pipeline ranks (n = 1) of a 4-layer tiny model, 4 micro-batches per step.
Interleaving changes which rank runs which layer and when, not the math: the
losses equal the plain 1F1B run's step for step (that one is held to the
single-device reference in ``test_parallel_cli.py``), and a checkpoint written
by either continues on the other.
"""

import json

import pytest

from tests.e2e.conftest import megamoe, one_line_error

STEPS, AT = 4, 2  # steps per run; the checkpoint the continuations start from
LAYOUT = ("model.layers=4", "parallel.pp=2", "train.micro_batch=4")


def _train(demo_data, tmp_path, tag, v, *extra, nproc=2, sets=()):
    args = ["train", "--config", "configs/tiny.toml", "--nproc", str(nproc)]
    sets = (
        f"data.path={demo_data}",
        f"train.steps={STEPS}",
        f"checkpoint.dir={tmp_path / f'ckpt-{tag}'}",
        f"checkpoint.interval={AT}",
        "checkpoint.keep=10",
        *LAYOUT,
        f"parallel.virtual_stages={v}",
        *sets,
    )
    for o in sets:
        args += ["--set", o]
    summary = tmp_path / f"{tag}.json"
    res = megamoe(*args, "--summary-json", str(summary), *extra, timeout=280)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(summary.read_text()), tmp_path / f"ckpt-{tag}" / f"step-{AT:08d}"


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interleaved")
    return {v: _train(demo_data, tmp, f"v{v}", v) for v in (1, 2)}


@pytest.mark.timeout(300)
def test_two_virtual_stages_give_the_plain_pipeline_losses_step_for_step(runs):
    (plain, _), (inter, _) = runs[1], runs[2]
    assert inter["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    assert inter["losses"][-1] < inter["losses"][0]  # it is learning
    pipe = inter["pipeline"]
    assert pipe["schedule"] == "interleaved-1f1b" and pipe["virtual_stages"] == 2
    assert pipe["bubble_theory"] == pytest.approx((2 - 1) / (2 * 4 + 2 - 1))
    assert plain["pipeline"]["bubble_theory"] == pytest.approx((2 - 1) / (4 + 2 - 1))
    # rank 0 passes on the activations [4, 128, 128] fp32 of both its chunks (layers 0 and
    # 2) for every micro-batch: twice what it sends without interleaving
    act = STEPS * 4 * 4 * 128 * 128 * 4
    assert plain["comm_bytes_by_tag"]["pp_act"] == act
    assert inter["comm_bytes_by_tag"]["pp_act"] == 2 * act


@pytest.mark.timeout(300)
@pytest.mark.parametrize("source,target", [(2, 1), (1, 2)], ids=["v2->v1", "v1->v2"])
def test_a_checkpoint_continues_under_the_other_interleaving(
    demo_data, tmp_path, runs, source, target
):
    full, checkpoint = runs[source]
    moved, _ = _train(demo_data, tmp_path, "moved", target, "--resume-from", str(checkpoint))
    assert moved["resumed_from"]["step"] == AT
    assert moved["losses"] == pytest.approx(full["losses"][AT:], rel=1e-5)


@pytest.mark.timeout(300)
def test_dp_buckets_synchronised_during_backward_with_two_virtual_stages(demo_data, tmp_path):
    # dp = 2 replicas of the pipeline, ZeRO's gradient sync issued during the last backward
    # and the parameter gathers waited per block: the plain pipeline's losses still.
    dp = ("parallel.dp=2", "train.micro_batch=2", "comm.overlap=true")
    plain, _ = _train(demo_data, tmp_path, "dp-v1", 1, nproc=4, sets=dp)
    inter, _ = _train(demo_data, tmp_path, "dp-v2", 2, nproc=4, sets=dp)
    assert inter["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    assert inter["comm"]["reduce_scatter"]["overlap_ratio"] > 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ("parallel.pp=2", "parallel.virtual_stages=2"),
            "model.layers = 2 must be divisible by parallel.pp * parallel.virtual_stages "
            "= 2 * 2 = 4",
        ),
        (
            (
                "model.layers=4",
                "parallel.pp=2",
                "parallel.virtual_stages=2",
                "train.micro_batch=16",
            ),
            "needs the micro-batches per replica, train.global_batch / (parallel.dp * "
            "micro-batch) = 16 / (1 * 16) = 1, to be a multiple of parallel.pp = 2",
        ),
    ],
    ids=["layers", "micro-batches"],
)
def test_bad_interleaving_is_refused_before_training_with_the_numbers(overrides, message):
    args = ["train", "--config", "configs/tiny.toml", "--nproc", "2"]
    for o in overrides:
        args += ["--set", o]
    assert message in one_line_error(megamoe(*args))
