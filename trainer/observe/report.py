"""``megamoe report``: a run summary drawn as PNG plots and one ``index.html``.

The input is the JSON that ``megamoe train --summary-json`` writes (README.md,
"Run summary"); nothing is re-measured, so a report can be made long after the
run, on any machine. Each plot is one small function of the summary that either
draws a figure or says which field the run did not record, and the page lists
those as "not recorded in this run" instead of showing an empty canvas: older
summaries lack ``expert_tokens`` and ``rank_step_times_s``, one-process runs make
no collectives.

Choices:

* matplotlib's object API on the Agg canvas (no pyplot): no display, no global
  figure state, and ``megamoe train`` never imports it.
* Steps on the x axis are the run's true step numbers: a resumed run's first
  recorded step is ``resumed_from.step + 1``.
* Per-step throughput and MFU use the same formulas as the summary's medians
  (tokens per step / step time; FLOPs per token * tokens/s / peak FLOP/s).
* The first step pays one-time costs (allocations, warm-up); the rank x step
  heatmap takes its colour scale from the later steps so it does not wash out
  the differences between ranks.
* The page is one file with inline CSS and relative links to the PNGs, so the
  directory can be copied or served as it is. A few lines of script mark
  ``<body data-images-ok="loaded/total">`` once the page has loaded, a check a
  headless browser (and the tests) can read.
"""

from __future__ import annotations

import html
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from trainer.atomic import write_bytes_atomic
from trainer.errors import MegamoeError

SUMMARY_NAME = "summary.json"
MARKERS_UP_TO = 60  # steps; with few points a line alone can hide them (one step draws nothing)
DPI = 110


@dataclass
class Plot:
    """One entry of the page: a drawn PNG, or the reason it was not drawn."""

    file: str
    title: str
    caption: str
    drawn: bool


# -- loading and checking ---------------------------------------------------------------


def find_summary(path: str | Path) -> Path:
    """The summary file for a RUN_DIR (its ``summary.json``) or a SUMMARY_JSON path."""
    given = Path(path)
    if given.is_dir():
        if not (given / SUMMARY_NAME).is_file():
            raise MegamoeError(f"{given}: no {SUMMARY_NAME} in this directory")
        return given / SUMMARY_NAME
    if not given.exists():
        raise MegamoeError(f"{given}: no such file or directory")
    return given


def load_summary(path: Path) -> dict[str, Any]:
    """Parse and check a summary file; every problem is a one-line MegamoeError naming it."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise MegamoeError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise MegamoeError(f"{path} is not a run summary (not text)") from None
    try:
        summary = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MegamoeError(
            f"{path} is not a run summary (not JSON: {exc.msg} at line {exc.lineno})"
        ) from None
    check_summary(summary, str(path))
    return summary


def check_summary(summary: Any, where: str = "summary") -> None:
    """The fields the report reads have the shapes README.md documents."""
    if not isinstance(summary, dict) or "losses" not in summary or "steps" not in summary:
        raise MegamoeError(
            f"{where} is not a run summary (no 'steps' and 'losses'; "
            "megamoe train --summary-json PATH writes one)"
        )
    _check_numbers(summary, "losses", where)
    if not summary["losses"]:
        raise MegamoeError(f"{where}: the run recorded no steps ('losses' is empty)")
    for key in ("balance_losses", "step_times_s"):
        if summary.get(key) is not None:
            _check_numbers(summary, key, where)
    for key in ("expert_tokens", "rank_step_times_s"):
        if summary.get(key) is not None:
            _check_matrix(summary, key, where)
    resumed = summary.get("resumed_from")
    if resumed is not None and not (isinstance(resumed, dict) and _is_int(resumed.get("step"))):
        raise MegamoeError(f"{where}: 'resumed_from' must be null or have an integer 'step'")
    for key in ("comm_exposed_s_by_tag", "comm_bytes_by_tag"):
        value = summary.get(key)
        if value is not None and not (
            isinstance(value, dict) and all(_is_number(v) for v in value.values())
        ):
            raise MegamoeError(f"{where}: '{key}' must map operator names to numbers")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_numbers(summary: dict, key: str, where: str) -> None:
    value = summary[key]
    if not isinstance(value, list) or not all(_is_number(v) for v in value):
        raise MegamoeError(f"{where}: '{key}' must be a list of numbers")


def _check_matrix(summary: dict, key: str, where: str) -> None:
    rows = summary[key]
    if (
        not isinstance(rows, list)
        or not rows
        or not all(isinstance(r, list) and all(_is_number(v) for v in r) for r in rows)
    ):
        raise MegamoeError(f"{where}: '{key}' must be a non-empty list of lists of numbers")
    if len({len(r) for r in rows}) != 1 or not rows[0]:
        lengths = sorted({len(r) for r in rows})
        raise MegamoeError(
            f"{where}: the rows of '{key}' must be non-empty and of one length (found {lengths})"
        )


# -- the plots ---------------------------------------------------------------------------


def _first_step(summary: dict) -> int:
    """The true number of the first recorded step (after a resume from step k: k + 1)."""
    resumed = summary.get("resumed_from") or {"step": 0}
    return resumed["step"] + 1


def _steps(summary: dict, count: int) -> np.ndarray:
    first = _first_step(summary)
    return np.arange(first, first + count)


def _tokens_per_step(summary: dict) -> float:
    cfg = summary.get("config") or {}
    try:
        return cfg["train"]["global_batch"] * cfg["model"]["seq_len"]
    except (KeyError, TypeError):
        return summary.get("tokens", 0) / max(summary.get("steps") or 1, 1)


def _per_step_tokens_per_s(summary: dict) -> np.ndarray:
    seconds = np.asarray(summary["step_times_s"], dtype=float)
    with np.errstate(divide="ignore"):
        return np.where(seconds > 0, _tokens_per_step(summary) / seconds, np.nan)


def _figure(height: float = 3.4) -> tuple[Figure, Any]:
    fig = Figure(figsize=(8.0, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _line(ax, x: np.ndarray, y, **kw) -> None:
    marker = "o" if len(x) <= MARKERS_UP_TO else None
    ax.plot(x, y, marker=marker, markersize=3, linewidth=1.5, **kw)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def _median_line(ax, value: float, label: str) -> None:
    ax.axhline(value, color="0.4", linestyle="--", linewidth=1, label=label)
    ax.legend(loc="lower right")


def plot_loss(s: dict) -> tuple[Figure | None, str]:
    losses = s["losses"]
    fig, ax = _figure()
    _line(ax, _steps(s, len(losses)), losses, color="C0", label="loss")
    ax.set_ylabel("loss (cross-entropy)")
    handles = ax.get_lines()
    if s.get("balance_losses"):
        # the balance loss is ~100x smaller than the loss: its own axis keeps it readable
        ax2 = ax.twinx()
        balance = s["balance_losses"]
        _line(ax2, _steps(s, len(balance)), balance, color="C1", label="balance loss")
        ax2.grid(False)
        ax2.set_ylabel("balance loss")
        handles = [*handles, *ax2.get_lines()]
    ax.legend(handles=handles, loc="upper right")
    first, last = losses[0], losses[-1]
    return fig, (
        "Training loss per step (left axis) and the device-level balance loss (right axis). "
        f"Loss {first:.4f} at the first recorded step, {last:.4f} at the last."
    )


def plot_tokens_per_s(s: dict) -> tuple[Figure | None, str]:
    if not s.get("step_times_s"):
        return None, "the summary has no per-step times ('step_times_s')"
    tps = _per_step_tokens_per_s(s)
    fig, ax = _figure()
    _line(ax, _steps(s, len(tps)), tps / 1e3, color="C2", label="tokens / s")
    ax.set_ylabel("thousand tokens / s")
    if s.get("tokens_per_s"):
        _median_line(ax, s["tokens_per_s"] / 1e3, "median step")
    return fig, (
        f"Throughput per step: {_tokens_per_step(s):,.0f} tokens per step / the step's wall "
        "time. The dashed line is the summary's figure (median step time)."
    )


def plot_mfu(s: dict) -> tuple[Figure | None, str]:
    if not s.get("step_times_s"):
        return None, "the summary has no per-step times ('step_times_s')"
    if not s.get("flops_per_token") or not s.get("peak_flops"):
        return None, "the summary has no 'flops_per_token' or 'peak_flops'"
    mfu = s["flops_per_token"] * _per_step_tokens_per_s(s) / s["peak_flops"]
    fig, ax = _figure()
    _line(ax, _steps(s, len(mfu)), 100 * mfu, color="C3", label="MFU")
    ax.set_ylabel("MFU (%)")
    if s.get("mfu"):
        _median_line(ax, 100 * s["mfu"], "median step")
    return fig, (
        f"Model FLOPs utilisation per step: {s['flops_per_token']:.4g} FLOPs per token x "
        f"tokens/s / peak {s['peak_flops']:.4g} FLOP/s (GEMMs and attention only, as README.md "
        "'MFU' explains)."
    )


def plot_expert_load(s: dict) -> tuple[Figure | None, str]:
    if s.get("expert_tokens") is None:
        return None, "the summary has no 'expert_tokens'"
    counts = np.asarray(s["expert_tokens"], dtype=float)  # step x expert
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(totals > 0, counts / totals, np.nan)
    if np.isnan(share).all():
        return None, "'expert_tokens' holds no assignments"
    steps, experts = share.shape
    first = _first_step(s)
    fig, ax = _figure(max(2.6, 1.2 + 0.22 * experts))
    image = ax.imshow(
        100 * share.T,
        aspect="auto",
        origin="lower",
        interpolation="nearest",
        cmap="viridis",
        extent=(first - 0.5, first + steps - 0.5, -0.5, experts - 0.5),
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("routed expert")
    fig.colorbar(image, ax=ax, label="% of the step's assignments")
    step, expert = np.unravel_index(np.nanargmax(share), share.shape)
    return fig, (
        f"Share of each step's (token, slot) assignments routed to each of the {experts} "
        f"experts, summed over layers. A perfectly balanced router gives every expert "
        f"{100 / experts:.1f}%; the largest share is {100 * share[step, expert]:.1f}% "
        f"(expert {expert} at step {first + step})."
    )


def plot_rank_step_times(s: dict) -> tuple[Figure | None, str]:
    if s.get("rank_step_times_s") is None:
        return None, "the summary has no 'rank_step_times_s'"
    ms = 1e3 * np.asarray(s["rank_step_times_s"], dtype=float)  # rank x step
    ranks, steps = ms.shape
    first = _first_step(s)
    # step 1 is slow on every rank (warm-up): scale the colours to the steps after it
    warm = ms[:, 1:] if steps > 1 else ms
    fig, ax = _figure(max(2.6, 1.2 + 0.22 * ranks))
    image = ax.imshow(
        ms,
        aspect="auto",
        origin="lower",
        interpolation="nearest",
        # plasma: its fastest cells are deep blue, not magma's near-black, which read as
        # empty (and failed the report test's data check when most steps were fast)
        cmap="plasma",
        vmin=warm.min(),
        vmax=warm.max(),
        extent=(first - 0.5, first + steps - 0.5, -0.5, ranks - 0.5),
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("rank")
    clipped = ms.max() > warm.max()
    fig.colorbar(image, ax=ax, label="step wall time (ms)", extend="max" if clipped else "neither")
    medians = np.median(ms, axis=1)
    slow = int(np.argmax(medians))
    caption = (
        f"Each rank's wall time per step, {ranks} ranks. Slowest rank by median: rank {slow}, "
        f"{medians[slow]:.1f} ms against {np.median(medians):.1f} ms for the median rank."
    )
    if clipped:
        caption += f" The first step ({ms[:, 0].max():.0f} ms, warm-up) is above the scale."
    return fig, caption


def plot_comm_exposed(s: dict) -> tuple[Figure | None, str]:
    exposed = s.get("comm_exposed_s_by_tag") or {}
    if not exposed:
        return None, (
            "no collectives were recorded ('comm_exposed_s_by_tag' is empty: a one-process "
            "run makes none)"
        )
    sizes = s.get("comm_bytes_by_tag") or {}
    tags = sorted(exposed, key=exposed.get)  # barh draws the first at the bottom
    fig, ax = _figure(1.2 + 0.3 * len(tags))
    bars = ax.barh(tags, [exposed[t] for t in tags], color="C0")
    labels = [f"{exposed[t]:.3f} s" + (f", {_size(sizes[t])}" if t in sizes else "") for t in tags]
    ax.bar_label(bars, labels, padding=3, fontsize=8)
    ax.set_xlim(0, 1.3 * max(max(exposed.values()), 1e-9))  # room for the labels
    ax.set_xlabel("exposed seconds (the compute thread waited), whole run, rank 0")
    ax.grid(axis="x", alpha=0.3)
    total = sum(exposed.values())
    return fig, (
        "Communication the computation waited for, per operator, on rank 0 over the whole "
        f"run: {total:.3f} s in all. The labels add the bytes each operator moved."
    )


PLOTS: list[tuple[str, str, Callable[[dict], tuple[Figure | None, str]]]] = [
    ("loss.png", "Loss", plot_loss),
    ("tokens_per_s.png", "Throughput", plot_tokens_per_s),
    ("mfu.png", "MFU", plot_mfu),
    ("expert_load.png", "Expert load", plot_expert_load),
    ("rank_step_times.png", "Step time per rank", plot_rank_step_times),
    ("comm_exposed.png", "Exposed communication per operator", plot_comm_exposed),
]


# -- the report --------------------------------------------------------------------------


def write_report(summary: dict, out_dir: Path, source: Path | None = None) -> Path:
    """Draw every plot the summary allows into ``out_dir`` and write ``index.html`` last;
    returns its path. ``source`` (the summary file) is named on the page."""
    check_summary(summary)
    plots = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for file, title, draw in PLOTS:
            fig, caption = draw(summary)
            if fig is None:
                (out_dir / file).unlink(missing_ok=True)  # a stale plot of an earlier report
                plots.append(Plot(file, title, caption, drawn=False))
                continue
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=DPI)
            write_bytes_atomic(out_dir / file, buf.getvalue())
            plots.append(Plot(file, title, caption, drawn=True))
        index = out_dir / "index.html"
        write_bytes_atomic(index, render_html(summary, plots, source).encode())
    except OSError as exc:
        raise MegamoeError(f"cannot write the report to {out_dir}: {exc.strerror}") from None
    return index


def key_numbers(s: dict) -> list[tuple[str, str]]:
    """(label, value) rows of the page's table; a field the run lacks shows as '?'."""
    first, count = _first_step(s), len(s["losses"])
    total = (s.get("config") or {}).get("train", {}).get("steps", "?")
    steps = f"{count} (steps {first} to {first + count - 1} of {total})"
    if s.get("resumed_from"):
        steps += f", resumed from step {first - 1}"
    layout = s.get("layout") or {}
    return [
        ("steps", steps),
        ("tokens", _fmt(s.get("tokens"), "{:,}")),
        ("final loss", _fmt(s.get("final_loss"), "{:.4f}")),
        ("tokens / s", _fmt(s.get("tokens_per_s"), "{:,.0f}") + " (median step)"),
        ("MFU", _fmt(s.get("mfu"), "{:.2%}")),
        ("step time", _fmt(s.get("step_time_s"), "{:.1f} ms", 1e3) + " (median)"),
        ("layout", " ".join(f"{k}={v}" for k, v in layout.items()) or "?"),
        ("device", f"{s.get('device', '?')}, {s.get('dtype', '?')}"),
    ]


def _fmt(value: Any, spec: str, scale: float = 1) -> str:
    if not _is_number(value) or not math.isfinite(value):
        return "?" if value is None else str(value)
    return spec.format(value * scale)


def _size(n: float) -> str:
    """Bytes in decimal units: 950 B, 13.2 MB."""
    if n < 1000:
        return f"{n:.0f} B"
    power = min(int(math.log10(n)) // 3, 3)
    return f"{n / 1000**power:.1f} {('kB', 'MB', 'GB')[power - 1]}"


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 960px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ text-align: left; padding: 0.2em 1em 0.2em 0; vertical-align: top; }}
th {{ font-weight: 600; color: #555; }}
figure {{ margin: 2em 0; }}
img {{ max-width: 100%; }}
figcaption {{ color: #444; font-size: 0.95em; }}
.source {{ color: #666; font-size: 0.9em; }}
</style>
</head>
<body>
<h1>{title}</h1>
{source}<table>
{rows}
</table>
{figures}{missing}<script>
// A self-check for headless browsers: how many images loaded, out of how many.
window.addEventListener("load", () => {{
  const images = Array.from(document.images);
  const ok = images.filter((img) => img.complete && img.naturalWidth > 0).length;
  document.body.setAttribute("data-images-ok", ok + "/" + images.length);
}});
</script>
</body>
</html>
"""


def render_html(summary: dict, plots: list[Plot], source: Path | None = None) -> str:
    esc = html.escape
    name = source.parent.name if source else ""
    title = "megamoe report" + (f": {name}" if name else "")
    numbers = key_numbers(summary)
    rows = "\n".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in numbers)
    figures = "".join(
        f'<figure>\n<h2>{esc(p.title)}</h2>\n<img src="{esc(p.file)}" alt="{esc(p.title)}">\n'
        f"<figcaption>{esc(p.caption)}</figcaption>\n</figure>\n"
        for p in plots
        if p.drawn
    )
    absent = [p for p in plots if not p.drawn]
    missing = ""
    if absent:
        items = "\n".join(
            f"<li>{esc(p.title)} ({esc(p.file)}): not recorded in this run; {esc(p.caption)}.</li>"
            for p in absent
        )
        missing = f"<h2>Not recorded in this run</h2>\n<ul>\n{items}\n</ul>\n"
    return PAGE.format(
        title=esc(title),
        source=f'<p class="source">summary: {esc(str(source))}</p>\n' if source else "",
        rows=rows,
        figures=figures,
        missing=missing,
    )
