"""`megamoe report` as a user runs it: a real two-rank run's summary and synthetic ones turned
into PNGs and an index.html that headless Chromium loads with every image, plots that carry
data, the note for plots a run did not record, and one-line errors for bad input."""

import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread

from tests.e2e.conftest import megamoe, one_line_error
from tests.integration.conftest import running_serve
from trainer.observe.report import plot_loss

ALWAYS = ("loss.png", "tokens_per_s.png", "mfu.png")
NEW_FIELDS = {"expert_tokens": "expert_load.png", "rank_step_times_s": "rank_step_times.png"}
ALL = (*ALWAYS, *NEW_FIELDS.values(), "comm_exposed.png")


def images_loaded(index: Path, tmp_path: Path) -> tuple[int, int]:
    """(loaded, total) images of ``index`` in headless Chromium, from the page's self-check."""
    chromium = shutil.which("chromium")
    assert chromium, "these tests need headless Chromium: apt-get install -y chromium"
    res = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            index.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r'data-images-ok="(\d+)/(\d+)"', res.stdout)
    assert found, (res.returncode, res.stderr[-2000:])
    return int(found[1]), int(found[2])


def data_pixels(png: Path) -> tuple[int, float]:
    """(coloured pixels, share of image columns holding one). Axes, ticks and text are drawn in
    black and grey on white, so an empty axes, even with a legend, has (almost) none: only
    lines, bars and heatmap cells are coloured, and they run across the plotting area."""
    rgb = imread(png)[..., :3]
    coloured = (rgb.max(axis=2) - rgb.min(axis=2)) > 0.15
    return int(coloured.sum()), float(coloured.any(axis=0).mean())


def assert_has_data(png: Path) -> None:
    pixels, columns = data_pixels(png)
    assert pixels > 1000 and columns > 0.5, (png.name, pixels, columns)


def synthetic(steps=8, ranks=4, experts=8, resumed_at=100, new_fields=True, comm=True) -> dict:
    rng = np.random.default_rng(0)
    losses = list(5.5 * np.exp(-0.1 * np.arange(steps)) + 0.05 * rng.random(steps))
    summary = {
        "steps": steps,
        "tokens": steps * 2048,
        "losses": losses,
        "balance_losses": list(0.02 + 0.001 * rng.random(steps)),
        "final_loss": losses[-1],
        "tokens_per_s": 13000.0,
        "mfu": 0.5,
        "step_time_s": 2048 / 13000,
        "step_times_s": [0.6, *(2048 / (13000 + 500 * rng.standard_normal(steps - 1)))],
        "flops_per_token": 3.4e6,
        "peak_flops": 8.9e10,
        "comm_exposed_s_by_tag": {"ep_dispatch": 1.4, "attn_qkv": 2.0, "loss": 0.3} if comm else {},
        "comm_bytes_by_tag": {"ep_dispatch": 6.4e8, "attn_qkv": 4.2e8, "loss": 6400},
        "layout": {"n": 2, "dp": 2, "pp": 1, "world": ranks},
        "device": "cpu",
        "dtype": "fp32",
        "resumed_from": {"step": resumed_at, "path": "ckpt/step-00000100"},
        "config": {
            "train": {"global_batch": 16, "steps": resumed_at + steps},
            "model": {"seq_len": 128, "experts": experts},
        },
    }
    if new_fields:
        counts = rng.integers(400, 600, size=(steps, experts))
        counts[:, 3] *= 3  # one hot expert, the caption names it
        summary["expert_tokens"] = counts.tolist()
        times = 0.15 + 0.01 * rng.random((ranks, steps))
        times[:, 0] = 0.6  # warm-up
        times[2] += 0.05  # one slow rank
        summary["rank_step_times_s"] = times.tolist()
    return summary


def report(tmp_path: Path, summary: dict, *extra: str) -> tuple[Path, str]:
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    res = megamoe("report", str(tmp_path / "summary.json"), *extra, timeout=60)
    assert res.returncode == 0, res.stderr
    index = tmp_path / "report" / "index.html"
    assert res.stdout.strip().splitlines()[-1] == f"report: {index}"
    return index, index.read_text()


@pytest.mark.timeout(180)
def test_report_of_a_real_two_rank_run(demo_data, tmp_path):
    res = megamoe(
        *("train", "--config", "configs/tiny.toml", "--nproc", "2"),
        *("--set", "parallel.n=2", "--set", "train.steps=6", "--set", f"data.path={demo_data}"),
        *("--summary-json", str(tmp_path / "summary.json")),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())

    res = megamoe("report", str(tmp_path), timeout=60)
    assert res.returncode == 0, res.stderr
    index = tmp_path / "report" / "index.html"
    assert res.stdout.strip().splitlines()[-1] == f"report: {index}"
    page = index.read_text()
    # two ranks make collectives; the two newer fields are plotted once the trainer writes them
    expected = [*ALWAYS, "comm_exposed.png"]
    expected += [png for field, png in NEW_FIELDS.items() if summary.get(field) is not None]
    for png in expected:
        assert_has_data(tmp_path / "report" / png)
        assert f'src="{png}"' in page
    assert f"{summary['final_loss']:.4f}" in page
    assert "6 (steps 1 to 6 of 6)" in page
    assert images_loaded(index, tmp_path) == (len(expected), len(expected))


@pytest.mark.timeout(60)
def test_every_plot_of_a_resumed_run_with_expert_load_and_rank_times(tmp_path):
    summary = synthetic()
    index, page = report(tmp_path, summary)
    for png in ALL:
        assert_has_data(tmp_path / "report" / png)
    assert images_loaded(index, tmp_path) == (6, 6)
    assert "not recorded" not in page
    assert "8 (steps 101 to 108 of 108), resumed from step 100" in page
    assert "(expert 3 at step" in page  # the hot expert
    assert "Slowest rank by median: rank 2" in page
    fig, _ = plot_loss(summary)  # x is the true step number
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == list(range(101, 109))

    # the checks above can fail: a missing image and an empty axes are caught
    (tmp_path / "report" / "mfu.png").unlink()
    assert images_loaded(index, tmp_path) == (5, 6)
    blank = Figure(figsize=(8, 3.4))
    FigureCanvasAgg(blank)
    ax = blank.add_subplot()
    ax.plot([], [], color="C0", label="loss")
    ax.legend()
    blank.savefig(tmp_path / "blank.png")
    with pytest.raises(AssertionError):
        assert_has_data(tmp_path / "blank.png")


@pytest.mark.timeout(60)
def test_plots_a_run_did_not_record_are_named_not_drawn(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "expert_load.png").write_bytes(b"stale, from an earlier report")
    index, page = report(tmp_path, synthetic(new_fields=False, comm=False, resumed_at=0))
    assert "<h2>Not recorded in this run</h2>" in page
    for title, field in (
        ("Expert load", "expert_tokens"),
        ("Step time per rank", "rank_step_times_s"),
        ("Exposed communication per operator", "comm_exposed_s_by_tag"),
    ):
        assert re.search(f"<li>{title} .*not recorded in this run.*{field}", page), title
    for png in ALWAYS:
        assert_has_data(out / png)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(ALWAYS)
    assert images_loaded(index, tmp_path) == (3, 3)


@pytest.mark.timeout(90)
def test_job_lookup_names_an_unknown_job_and_one_without_a_summary(tmp_path):
    # a real control plane that runs nothing (--executor none): a job stays PENDING
    with running_serve(tmp_path / "state", "--executor", "none") as (_, address):
        server = ("--server", address)
        res = megamoe("job", "submit", *server, "--config", "configs/tiny.toml", "--id", "waits")
        assert res.returncode == 0, res.stderr
        line = one_line_error(megamoe("report", "--job", "waits", *server, timeout=60))
        assert line == "megamoe: error: job waits has no run summary yet (it is PENDING)"
        line = one_line_error(megamoe("report", "--job", "nobody", *server, timeout=60))
        assert line.startswith(f"megamoe: error: job nobody on {address}: NOT_FOUND"), line


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "case", ["missing", "dir-without-summary", "not-json", "not-a-summary", "no-steps", "no-server"]
)
def test_bad_input_is_one_line_naming_it(case, tmp_path):
    target = tmp_path / "input.json"
    if case == "dir-without-summary":
        target = tmp_path
    elif case == "not-json":
        target.write_text("[model]\nhidden = 128\n")
    elif case == "not-a-summary":
        target.write_text(json.dumps({"model": {"hidden": 128}}))
    elif case == "no-steps":
        target.write_text(json.dumps({**synthetic(), "steps": 0, "losses": []}))
    args = [str(target)]
    if case == "no-server":
        args = ["--job", "job-1234", "--server", f"127.0.0.1:{closed_port()}"]
    line = one_line_error(megamoe("report", *args, timeout=60))
    assert ("job-1234" if case == "no-server" else str(target)) in line
    assert not (tmp_path / "report").exists()


@pytest.mark.timeout(60)
def test_rank_times_at_the_fastest_step_time_are_drawn_visibly(tmp_path):
    # Two ranks, one warm-up step, then every step as fast as the fastest but one: most
    # cells sit at the bottom of the colour scale. They must read as data (a colour), not
    # as blank (the near-black of a dark colour map's low end, as the CI run once saw).
    summary = synthetic(steps=6)
    summary["rank_step_times_s"] = [[0.9, 0.1, 0.1, 0.1, 0.3, 0.1], [0.8, 0.1, 0.1, 0.1, 0.1, 0.1]]
    report(tmp_path, summary)
    assert_has_data(tmp_path / "report" / "rank_step_times.png")
