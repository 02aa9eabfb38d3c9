"""The Grafana dashboard of megamoe, generated from code (``python -m service.dashboard``).

The dashboard is built with Grafana's own Python SDK (``grafana-foundation-sdk``, a
development dependency) and committed as JSON under ``helm/megamoe/dashboards``, for the
helm chart to hand to Grafana's dashboard sidecar; a unit test regenerates it and fails
when the committed file is stale, and ``--check`` does the same from the command line.
Writing the panels in Python rather than editing JSON exported from a Grafana keeps
every query next to the metric contract of docs/OBSERVABILITY.md and reviewable as code.

Every query reads the contract's metrics only. Trainer queries (and the control plane's
per-job series) are filtered by ``job_id=~"$job_id"``; the variable's "All" value is
``.*``, which also matches the empty ``job_id`` of a run outside the service. Values the
trainer computes batch-wide (tokens, loss, expert counts, dropped assignments) are the
same on every rank, so they are deduplicated with ``max``/``avg`` rather than summed;
per-rank quantities (collective time and bytes) are averaged or summed over ranks.
Counters and step-time histograms use ``$__rate_interval``; checkpoints, recoveries and
rendezvous are rare, so their histograms use a fixed window (``EVENT_WINDOW``) that
holds a few events. ``queries()`` returns each expression with Grafana's variables still
in it: a caller that evaluates them on a Prometheus replaces ``$job_id`` (by ``.*``) and
``$__rate_interval`` (by a window such as ``1m``) first.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import heatmap, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.heatmap import HeatmapColorMode, HeatmapColorScale

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "helm" / "megamoe" / "dashboards" / "megamoe.json"
REGENERATE = "python -m service.dashboard"

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
JOB = 'job_id=~"$job_id"'
RATE = "$__rate_interval"
EVENT_WINDOW = "1h"

Target = tuple[str, str]  # (PromQL expression, legend template)


def _rate(metric: str, by: str, agg: str = "sum", window: str = RATE) -> str:
    return f"{agg} by ({by}) (rate({metric}{{{JOB}}}[{window}]))"


def _quantile(q: float, histogram: str, by: str, window: str, selector: str = "") -> str:
    """``q`` of a histogram over ``window``, one series per value of the ``by`` labels."""
    group = f"{by}, le" if by else "le"
    matchers = f"{{{selector}}}" if selector else ""
    inner = f"rate({histogram}_bucket{matchers}[{window}])"
    return f"histogram_quantile({q}, sum by ({group}) ({inner}))"


def _legend() -> common_builders.VizLegendOptions:
    return (
        common_builders.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.TABLE)
        .placement(common.LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(["mean", "max", "lastNotNull"])
    )


def _targets(panel: Any, targets: list[Target]) -> Any:
    assert len(targets) <= 26, "refIds run A..Z"
    for i, (expr, legend) in enumerate(targets):
        ref = chr(ord("A") + i)
        panel.with_target(
            prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).range()
        )
    return panel


def _series(
    title: str,
    description: str,
    unit: str,
    targets: list[Target],
    span: int = 12,
    min_val: float | None = 0,
    max_val: float | None = None,
    stepped: bool = False,
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(span)
        .height(8)
        .legend(_legend())
        .tooltip(
            common_builders.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
        .line_width(1)
        .fill_opacity(10)
        .show_points(common.VisibilityMode.NEVER)
    )
    if stepped:
        panel.line_interpolation(common.LineInterpolation.STEP_AFTER)
    if min_val is not None:
        panel.min(min_val)
    if max_val is not None:
        panel.max(max_val)
    return _targets(panel, targets)


def _training() -> list[Any]:
    step_p = [
        (_quantile(q, "megamoe_step_seconds", "job_id", RATE, JOB), f"{{{{job_id}}}} p{p}")
        for q, p in ((0.5, 50), (0.9, 90), (0.99, 99))
    ]
    return [
        _series(
            "Tokens/s",
            "Training throughput of each job: the ranks' gauge over the last 10 steps, and "
            "the rate of the token counter (both count the global batch on every rank).",
            "short",
            [
                (f"max by (job_id) (megamoe_tokens_per_second{{{JOB}}})", "{{job_id}}"),
                (_rate("megamoe_tokens_total", "job_id", "max"), "{{job_id}} (counter rate)"),
            ],
            span=8,
        ),
        _series(
            "MFU",
            "Model FLOPs utilisation against the device peak, mean over the ranks.",
            "percentunit",
            [(f"avg by (job_id) (megamoe_mfu_ratio{{{JOB}}})", "{{job_id}}")],
            max_val=1,
            span=8,
        ),
        _series(
            "Loss",
            "The last step's batch-wide loss, as rank 0 reports it.",
            "short",
            [(f'megamoe_loss{{{JOB}, rank="0"}}', "{{job_id}}")],
            min_val=None,
            span=8,
        ),
        _series(
            "Optimizer steps/s",
            "Optimizer steps finished per second (every rank counts the same steps).",
            "short",
            [(_rate("megamoe_steps_total", "job_id", "max"), "{{job_id}}")],
            span=8,
        ),
        _series(
            "Step time",
            "Wall time of the optimizer steps, quantiles over all ranks' steps.",
            "s",
            step_p,
            span=16,
        ),
    ]


def _communication() -> list[Any]:
    return [
        _series(
            "Exposed communication by operator",
            "Share of wall time the compute thread waited for each operator's collectives "
            "(not hidden by overlap), mean over the ranks.",
            "percentunit",
            [(_rate("megamoe_comm_exposed_seconds_total", "op", "avg"), "{{op}}")],
            span=8,
        ),
        _series(
            "Communication time by operator",
            "Share of wall time each operator's collectives ran, exposed or overlapped, "
            "mean over the ranks.",
            "percentunit",
            [(_rate("megamoe_comm_seconds_total", "op", "avg"), "{{op}}")],
            span=8,
        ),
        _series(
            "Communication bytes/s by operator",
            "Bytes the collectives of each operator moved per second, summed over the ranks.",
            "Bps",
            [(_rate("megamoe_comm_bytes_total", "op"), "{{op}}")],
            span=8,
        ),
    ]


def _experts() -> list[Any]:
    load = (
        heatmap.Panel()
        .title("Expert load")
        .description(
            "(token, slot) assignments routed to each expert per second, all layers, the "
            "whole batch (the same on every rank). An even load is one colour down a column."
        )
        .datasource(DATASOURCE)
        .span(16)
        .height(10)
        .calculate(False)
        .color(
            heatmap.HeatmapColorOptions()
            .mode(HeatmapColorMode.SCHEME)
            .scheme("Oranges")
            .scale(HeatmapColorScale.EXPONENTIAL)
            .exponent(0.5)
            .steps(64)
        )
        .y_axis(heatmap.YAxisConfig().axis_label("expert"))
        .cell_values(heatmap.CellValues().unit("short"))
        .show_legend()
        .show_tooltip()
    )
    _targets(load, [(_rate("megamoe_expert_tokens_total", "expert", "max"), "{{expert}}")])
    dropped = _series(
        "Dropped assignments/s",
        "(token, slot) assignments the capacity rule dropped per second, batch-wide.",
        "short",
        [(_rate("megamoe_tokens_dropped_total", "job_id", "max"), "{{job_id}}")],
        span=8,
    )
    dropped.height(10)
    return [load, dropped]


def _reliability() -> list[Any]:
    blocked_write = [
        (_quantile(q, "megamoe_checkpoint_seconds", "phase", EVENT_WINDOW, JOB), legend)
        for q, legend in ((0.5, "{{phase}} p50"), (1, "{{phase}} max"))
    ]
    return [
        _series(
            "Straggler score by rank",
            "How far each rank's step time lies from the others' (robust z-score, from the "
            "control plane); a rank that stays high is a straggler.",
            "short",
            [
                (
                    f"max by (job_id, rank, node) (megamoe_straggler_score{{{JOB}}})",
                    "{{job_id}} rank {{rank}} (node {{node}})",
                )
            ],
            min_val=None,
        ),
        _series(
            "Restarts",
            "Restarts of each job's world: the control plane's count, and the generation "
            "the trainer ranks run in.",
            "short",
            [
                (
                    f"max by (job_id) (megamoe_job_restarts_total{{{JOB}}})",
                    "{{job_id}} (control plane)",
                ),
                (f"max by (job_id) (megamoe_restarts_total{{{JOB}}})", "{{job_id}} (ranks)"),
            ],
            stepped=True,
        ),
        _series(
            "Checkpoint durations",
            f"Per save, over the last {EVENT_WINDOW}: how long the loop was blocked copying "
            "the shard to host, and how long the background write and commit took. 'max' is "
            "the upper bound of the slowest histogram bucket.",
            "s",
            blocked_write,
        ),
        _series(
            "Recovery and rendezvous",
            f"Over the last {EVENT_WINDOW}: failure seen -> first step of the restarted world "
            "(recovery), and nodes started -> first step reported (rendezvous). 'max' is the "
            "upper bound of the slowest histogram bucket.",
            "s",
            [
                (_quantile(q, f"megamoe_{name}_seconds", "", EVENT_WINDOW), f"{name} {stat}")
                for name in ("recovery", "rendezvous")
                for q, stat in ((0.5, "p50"), (1, "max"))
            ],
        ),
    ]


def _control_plane() -> list[Any]:
    api = "megamoe_api_request_seconds"
    return [
        _series(
            "API latency by method",
            "gRPC JobService latency by method, all status codes.",
            "s",
            [
                (_quantile(q, api, "method", RATE), f"{{{{method}}}} p{p}")
                for q, p in ((0.5, 50), (0.99, 99))
            ],
        ),
        _series(
            "API requests by method and code",
            "gRPC JobService requests per second by method and status code.",
            "reqps",
            [(f"sum by (method, code) (rate({api}_count[{RATE}]))", "{{method}} {{code}}")],
        ),
        _series(
            "Jobs by state",
            "Jobs the control plane holds in each state.",
            "short",
            [("sum by (state) (megamoe_jobs)", "{{state}}")],
            stepped=True,
        ),
        _series(
            "etcd errors/s",
            "etcd requests of the control plane that failed (unreachable or refused).",
            "reqps",
            [(f"sum(rate(megamoe_etcd_errors_total[{RATE}]))", "errors")],
        ),
    ]


ROWS: list[tuple[str, Callable[[], list[Any]]]] = [
    ("Training", _training),
    ("Communication", _communication),
    ("Experts", _experts),
    ("Reliability", _reliability),
    ("Control plane", _control_plane),
]


def _variables() -> list[Any]:
    return [
        dash.DatasourceVariable("datasource")
        .id("datasource")
        .label("Data source")
        .type("prometheus"),
        dash.QueryVariable("job_id")
        .id("job_id")
        .label("Job")
        .datasource(DATASOURCE)
        .query("label_values(megamoe_steps_total, job_id)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(VariableOption(selected=True, text="All", value="$__all")),
    ]


def build() -> dict[str, Any]:
    """The dashboard's JSON model, as Grafana loads it."""
    board = (
        dash.Dashboard("megamoe")
        .uid("megamoe")
        .description("Training throughput, communication, experts and the control plane.")
        .tags(["megamoe"])
        .refresh("10s")
        .time("now-1h", "now")
        .timezone("browser")
        .tooltip(DashboardCursorSync.CROSSHAIR)  # a spike lines up across panels
        .variables(_variables())
    )
    next_id = 1
    for title, panels in ROWS:
        board.with_row(dash.Row(title).id(next_id))
        next_id += 1
        for panel in panels():
            board.with_panel(panel.id(next_id))
            next_id += 1
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every target of every panel, in layout order."""
    return [
        (panel["title"], target["expr"])
        for panel in build()["panels"]
        for target in panel.get("targets", [])
    ]


def render() -> str:
    """The committed file's text: sorted keys, so a diff shows what changed."""
    return json.dumps(build(), sort_keys=True, indent=2) + "\n"


def main(argv: list[str] | None = None, output: Path = OUTPUT) -> int:
    parser = argparse.ArgumentParser(prog=REGENERATE, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 when the committed dashboard differs from the code",
    )
    args = parser.parse_args(argv)
    text = render()
    name = output.relative_to(ROOT) if output.is_relative_to(ROOT) else output
    if args.check:
        current = output.read_text() if output.exists() else None
        if current != text:
            print(f"{name} is stale: run `{REGENERATE}` and commit it", file=sys.stderr)
            return 1
        print(f"{name} is up to date")
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
