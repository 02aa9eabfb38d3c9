"""Checkpoints as a user meets them: a run killed with SIGKILL comes back bit for bit,
a checkpoint loads into another layout, and damaged checkpoints are reported, skipped or
refused - all through the real `megamoe` command."""

import json
import os
import re
import signal
import sys
import time

import pytest

from tests.e2e.conftest import megamoe, one_line_error
from tests.procs import kill_group, start

KILL_STEPS = 20  # long enough that the kill lands before the end, short enough for CI
INTERVAL = 4


def _args(demo_data, ckpt, nproc, steps, *overrides):
    args = ["train", "--config", "configs/tiny.toml", "--nproc", str(nproc)]
    sets = (
        f"data.path={demo_data}",
        f"train.steps={steps}",
        f"checkpoint.dir={ckpt}",
        f"checkpoint.interval={INTERVAL}",
        "checkpoint.keep=10",
        "observe.log_interval=1",
        *overrides,
    )
    for o in sets:
        args += ["--set", o]
    return args


def _run(args, summary, *extra, timeout=280):
    res = megamoe(*args, "--summary-json", str(summary), *extra, timeout=timeout)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    return res, json.loads(summary.read_text())


def _committed(ckpt):
    return sorted(int(p.parent.name[5:]) for p in ckpt.glob("step-*/manifest.json"))


def _run_and_kill(args, ckpt, after_step):
    """Start the run in its own session; SIGKILL the whole group once it has logged
    ``after_step`` and committed a checkpoint. Returns the steps it had logged."""
    proc = start([sys.executable, "-m", "service.cli", *args])
    logged, deadline = 0, time.monotonic() + 240
    try:
        for line in proc.stdout:
            m = re.match(r"step\s+(\d+)/", line)
            logged = int(m.group(1)) if m else logged
            if logged >= after_step and _committed(ckpt):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "the run did not reach the kill point in time"
        else:
            pytest.fail(f"the run ended at step {logged} before it could be killed")
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        kill_group(proc)
    return logged


LAYOUTS = {
    "1proc": (1, ()),
    "n2dp2": (4, ("parallel.n=2", "parallel.dp=2")),
    "n2pp2": (4, ("parallel.n=2", "parallel.pp=2")),
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sigkill_then_resume_gives_the_uninterrupted_losses_bit_for_bit(
    demo_data, tmp_path, layout
):
    nproc, overrides = LAYOUTS[layout]
    _, full = _run(
        _args(demo_data, tmp_path / "full", nproc, KILL_STEPS, *overrides), tmp_path / "full.json"
    )
    assert full["checkpoint"]["committed_steps"] == [4, 8, 12, 16, 20]
    ckpt = tmp_path / "killed"
    args = _args(demo_data, ckpt, nproc, KILL_STEPS, *overrides)
    logged = _run_and_kill(args, ckpt, after_step=INTERVAL + 2)
    assert logged < KILL_STEPS
    res, resumed = _run(args, tmp_path / "resumed.json", "--resume")
    k = resumed["resumed_from"]["step"]
    assert k >= INTERVAL and k % INTERVAL == 0
    assert resumed["resumed_from"]["path"].endswith(f"step-{k:08d}")
    assert f"resumed from {ckpt}/step-{k:08d} at step {k}" in res.stdout
    assert resumed["steps"] == KILL_STEPS - k
    assert resumed["losses"] == full["losses"][k:]  # bit for bit, not approximately


# ------------------------------------------------------------------ resharding

STEPS = 8
AT = 4  # the checkpoint every continuation starts from
SOURCES = {  # name: (nproc, overrides)
    "n4": (4, ("parallel.n=4",)),
    "n2": (2, ("parallel.n=2",)),
    "n2pp2": (4, ("parallel.n=2", "parallel.pp=2")),
    "n2dp2": (4, ("parallel.n=2", "parallel.dp=2")),
}
CASES = {  # name: (source, nproc, overrides of the new layout, n of its reference)
    "n4->n2": ("n4", 2, ("parallel.n=2",), 2),
    "n2->n4": ("n2", 4, ("parallel.n=4",), 4),
    "pp2->pp1": ("n2pp2", 2, ("parallel.n=2",), 2),
    "dp2->dp1": ("n2dp2", 2, ("parallel.n=2",), 2),
    "sp+ep_a2a->tp+tp": ("n2", 2, ("parallel.n=2", "parallel.attention=tp", "parallel.ffn=tp"), 2),
    "ep_a2a->ep_agrs": ("n2", 2, ("parallel.n=2", "parallel.ffn=ep_agrs"), 2),
}


@pytest.fixture(scope="module")
def sources(demo_data, tmp_path_factory):
    out = {}
    for name, (nproc, overrides) in SOURCES.items():
        tmp = tmp_path_factory.mktemp(name)
        _, summary = _run(_args(demo_data, tmp / "ckpt", nproc, STEPS, *overrides), tmp / "s.json")
        out[name] = (tmp / "ckpt" / f"step-{AT:08d}", summary)
    return out


def _continue(demo_data, tmp_path, checkpoint, nproc, overrides, tag):
    args = _args(demo_data, tmp_path / f"ckpt-{tag}", nproc, STEPS, *overrides)
    _, s = _run(args, tmp_path / f"{tag}.json", "--resume-from", str(checkpoint))
    assert s["resumed_from"]["step"] == AT and s["steps"] == STEPS - AT
    return s


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", list(CASES))
def test_a_checkpoint_continues_on_another_layout_like_its_reference(
    demo_data, tmp_path, sources, case
):
    source, nproc, overrides, ref_n = CASES[case]
    checkpoint, _ = sources[source]
    moved = _continue(demo_data, tmp_path, checkpoint, nproc, overrides, "moved")
    assert moved["layout"]["world"] == nproc
    # The device-level balance loss depends on n, so the yardstick is the one-process
    # reference of the new n, resumed from the same checkpoint.
    ref = _continue(demo_data, tmp_path, checkpoint, 1, (f"parallel.n={ref_n}",), "ref")
    assert moved["losses"] == pytest.approx(ref["losses"], rel=1e-5)


@pytest.mark.timeout(600)
def test_four_ranks_to_one_process_continues_the_four_rank_run(demo_data, tmp_path, sources):
    checkpoint, four_ranks = sources["n4"]
    one = _continue(demo_data, tmp_path, checkpoint, 1, ("parallel.n=4",), "one")
    assert one["layout"]["world"] == 1
    assert one["losses"] == pytest.approx(four_ranks["losses"][AT:], rel=1e-5)


# ------------------------------------------------------------------ bad input


@pytest.fixture
def two_checkpoints(demo_data, tmp_path):
    """A one-process run of 8 steps with committed checkpoints at steps 4 and 8."""
    ckpt = tmp_path / "ckpt"
    args = _args(demo_data, ckpt, 1, STEPS)
    _run(args, tmp_path / "first.json")
    assert _committed(ckpt) == [4, 8]
    return args, ckpt


def _damage_and_resume(two_checkpoints, tmp_path, damage):
    args, ckpt = two_checkpoints
    newest = ckpt / "step-00000008"
    damage(newest)
    res, s = _run([*args, "--set", "train.steps=10"], tmp_path / "again.json", "--resume")
    warnings = [line for line in res.stdout.splitlines() if line.startswith("checkpoint ")]
    assert len(warnings) == 1, res.stdout
    assert str(newest) in warnings[0]
    assert s["resumed_from"]["step"] == 4  # the previous committed checkpoint
    return warnings[0]


@pytest.mark.timeout(300)
def test_a_truncated_shard_falls_back_to_the_previous_checkpoint(two_checkpoints, tmp_path):
    def truncate(d):
        with open(d / "__0_0.distcp", "r+b") as fh:
            fh.truncate(100)

    line = _damage_and_resume(two_checkpoints, tmp_path, truncate)
    assert "__0_0.distcp: 100 bytes" in line and "truncated" in line


@pytest.mark.timeout(300)
def test_a_checksum_mismatch_falls_back_to_the_previous_checkpoint(two_checkpoints, tmp_path):
    def flip(d):
        with open(d / "__0_0.distcp", "r+b") as fh:
            fh.seek(4096)
            byte = fh.read(1)
            fh.seek(4096)
            fh.write(bytes([byte[0] ^ 0xFF]))

    line = _damage_and_resume(two_checkpoints, tmp_path, flip)
    assert "__0_0.distcp: sha256 mismatch" in line


@pytest.mark.timeout(300)
def test_a_missing_manifest_falls_back_to_the_previous_checkpoint(two_checkpoints, tmp_path):
    line = _damage_and_resume(two_checkpoints, tmp_path, lambda d: (d / "manifest.json").unlink())
    assert "manifest.json missing" in line


@pytest.mark.timeout(300)
def test_a_checkpoint_of_another_model_shape_is_refused(two_checkpoints):
    args, _ = two_checkpoints
    res = megamoe(*args, "--set", "model.ffn_hidden=128", "--resume")
    line = one_line_error(res)
    assert "ffn.experts.w1" in line and "[8, 128, 256]" in line and "[8, 128, 128]" in line


@pytest.mark.timeout(300)
def test_resume_without_checkpoints_starts_fresh(demo_data, tmp_path):
    args = _args(demo_data, tmp_path / "empty", 1, 2, "checkpoint.interval=0")
    res, s = _run(args, tmp_path / "s.json", "--resume")
    assert f"no committed checkpoint in {tmp_path / 'empty'}: starting fresh" in res.stdout
    assert s["resumed_from"] is None and s["steps"] == 2


@pytest.mark.timeout(300)
def test_a_save_that_fails_midway_commits_nothing_and_training_goes_on(demo_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    # A directory where the save's data file must go: writing it fails with an I/O error
    # after DCP has planned the save (root ignores permissions, a directory it cannot).
    (ckpt / "step-00000004" / "__0_0.distcp").mkdir(parents=True)
    res, s = _run(_args(demo_data, ckpt, 1, STEPS), tmp_path / "s.json")
    warning = [line for line in res.stdout.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warning) == 1 and "step-00000004 failed, nothing committed" in warning[0]
    assert s["steps"] == STEPS
    saves = {r["step"]: r for r in s["checkpoint"]["saves"]}
    assert not saves[4]["committed"] and "error" in saves[4]
    assert saves[8]["committed"]
    assert _committed(ckpt) == [8]


@pytest.mark.timeout(300)
def test_checkpoint_list_and_verify(two_checkpoints):
    _, ckpt = two_checkpoints
    res = megamoe("checkpoint", "list", str(ckpt), "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["step"] for r in rows] == [8, 4]
    assert rows[0]["path"] == str(ckpt / "step-00000008") and rows[0]["bytes"] > 0
    human = megamoe("checkpoint", "list", str(ckpt))
    assert "step-00000004" in human.stdout and "n=1 dp=1 pp=1" in human.stdout
    good = megamoe("checkpoint", "verify", str(ckpt / "step-00000008"))
    assert good.returncode == 0 and "OK" in good.stdout
    with open(ckpt / "step-00000004" / ".metadata", "ab") as fh:
        fh.write(b"x")
    bad = megamoe("checkpoint", "verify", str(ckpt / "step-00000004"))
    assert bad.returncode == 1 and ".metadata" in bad.stderr
