"""The Grafana dashboard (service/dashboard.py): the committed JSON is what the code generates,
Grafana's sidecar can load it, and every query reads the metric contract of
docs/OBSERVABILITY.md with the labels the contract gives each metric.

The PromQL checks are a small lint, not a parser: they strip string literals, check the
brackets, resolve every ``megamoe_`` series to a contract metric (histograms only through
``_bucket``/``_sum``/``_count``), and check each label a query matches or groups by. The
integration test evaluates the same expressions on a real Prometheus."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from service import dashboard

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "OBSERVABILITY.md"
TRAINER_LABELS = {"job_id", "rank", "node"}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def _contract() -> dict[str, tuple[str, set[str]]]:
    """metric -> (type, labels), from the tables under the doc's metric contract; metrics of
    the trainer's table also carry job_id, rank and node."""
    contract, base = {}, set()
    for line in DOC.read_text().splitlines():
        if line.startswith("### "):
            base = TRAINER_LABELS if line.startswith("### Trainer") else set()
        row = re.match(r"\|\s*`(megamoe_\w+)`\s*\|\s*(\w+)\s*\|([^|]*)\|", line)
        if row:
            # "`phase` (`blocked`, `write`)": the parenthesis lists values, not labels
            labels = set(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", row[3])))
            contract[row[1]] = (row[2], base | labels)
    return contract


CONTRACT = _contract()
BOARD = dashboard.build()
QUERIES = dashboard.queries()


def _family(series: str) -> tuple[str, str]:
    """(contract metric, type) of a series name a query reads; fails on anything else."""
    if series in CONTRACT:
        kind = CONTRACT[series][0]
        assert kind != "histogram", f"{series} is a histogram: read _bucket, _sum or _count"
        return series, kind
    for suffix in HISTOGRAM_SERIES:
        stem = series.removesuffix(suffix)
        if stem != series and CONTRACT.get(stem, ("",))[0] == "histogram":
            return stem, "histogram"
    raise AssertionError(f"{series} is not in the metric contract of {DOC.name}")


def test_the_contract_tables_were_read():
    assert len(CONTRACT) >= 20
    assert CONTRACT["megamoe_step_seconds"] == ("histogram", TRAINER_LABELS)
    assert CONTRACT["megamoe_checkpoint_seconds"] == ("histogram", TRAINER_LABELS | {"phase"})
    assert CONTRACT["megamoe_api_request_seconds"] == ("histogram", {"method", "code"})
    assert CONTRACT["megamoe_jobs"] == ("gauge", {"state"})


@pytest.mark.timeout(60)
def test_the_committed_dashboard_is_what_the_code_generates():
    committed = dashboard.OUTPUT.read_text() if dashboard.OUTPUT.exists() else ""
    assert committed == dashboard.render(), (
        f"{dashboard.OUTPUT.relative_to(ROOT)} is stale: run `{dashboard.REGENERATE}` and commit it"
    )


def test_check_fails_on_a_stale_file_and_names_it(tmp_path, capsys):
    out = tmp_path / "megamoe.json"
    assert dashboard.main([], output=out) == 0
    assert dashboard.main(["--check"], output=out) == 0
    out.write_text(out.read_text().replace('"megamoe"', '"renamed"', 1))
    assert dashboard.main(["--check"], output=out) == 1
    assert str(out) in capsys.readouterr().err
    out.unlink()
    assert dashboard.main(["--check"], output=out) == 1


def test_the_sidecar_can_load_it():
    for key in ("panels", "templating", "title", "uid", "schemaVersion"):
        assert key in BOARD, key
    assert BOARD["title"] == BOARD["uid"] == "megamoe"
    # a provisioned dashboard must not carry an instance's numeric id
    assert BOARD.get("id") is None
    assert BOARD["refresh"] == "10s"
    assert BOARD["time"] == {"from": "now-1h", "to": "now"}


def test_the_variables_select_a_prometheus_and_the_jobs():
    variables = {v["name"]: v for v in BOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    job = variables["job_id"]
    assert job["type"] == "query" and job["multi"] and job["includeAll"]
    # "All" must also match the empty job_id of a run outside the service
    assert job["allValue"] == ".*"
    metric = re.fullmatch(r"label_values\((\w+), job_id\)", job["query"])
    assert metric and "job_id" in CONTRACT[metric[1]][1]


def test_panel_ids_are_unique_and_every_panel_queries_the_chosen_prometheus():
    ids = [p["id"] for p in BOARD["panels"]]
    assert len(ids) == len(set(ids)), ids
    panels = [p for p in BOARD["panels"] if p["type"] != "row"]
    assert len(panels) >= 15
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no target"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert all(t["legendFormat"] for t in panel["targets"]), panel["title"]
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles)), titles


def test_every_contract_metric_is_on_the_dashboard():
    read = {_family(s)[0] for _, expr in QUERIES for s in re.findall(r"megamoe_\w+", expr)}
    assert sorted(set(CONTRACT) - read) == []


@pytest.mark.parametrize(
    "title, expr", QUERIES, ids=[f"{t}:{i}" for i, (t, _) in enumerate(QUERIES)]
)
def test_the_query_reads_the_contract(title, expr):
    assert re.search(r"megamoe_\w+", expr), "reads no megamoe_ metric"
    bare = re.sub(r'"[^"]*"', '""', expr)
    assert bare.count('"') % 2 == 0
    stack, pairs = [], {")": "(", "]": "[", "}": "{"}
    for ch in bare:
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            assert stack and stack.pop() == pairs[ch], f"unbalanced {ch!r}"
    assert not stack, f"unclosed {stack}"

    labels = {"le"} if "_bucket" in expr else set()
    for series, matchers in re.findall(r"(megamoe_\w+)(\{[^}]*\})?", expr):
        family, kind = _family(series)
        own = CONTRACT[family][1] | ({"le"} if series.endswith("_bucket") else set())
        labels |= own
        matched = re.findall(r'(\w+)\s*(?:=~|!~|!=|=)\s*"[^"]*"', matchers)
        assert set(matched) <= own, f"{series} has no label {set(matched) - own}"
        if "job_id" in own:
            assert 'job_id=~"$job_id"' in matchers, f"{series} is not filtered by $job_id"
    for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        unknown = {g.strip() for g in group.split(",")} - labels
        assert not unknown, f"groups by {unknown}, which no metric of the query has"

    rated = re.findall(r"\brate\(\s*(megamoe_\w+)[^()\[]*\[[^\]]+\]\s*\)", expr)
    assert len(rated) == expr.count("rate("), "every rate() takes one series and a window"
    for series in rated:
        family, kind = _family(series)
        assert kind in ("counter", "histogram"), f"rate() of the {kind} {family}"
    for q in re.findall(r"histogram_quantile\(([^,]+),", expr):
        assert 0 <= float(q) <= 1
        assert re.search(r"by \([^)]*\ble\b", expr), "histogram_quantile needs buckets by le"


@pytest.mark.timeout(60)
def test_generating_does_not_import_torch():
    code = "import sys, service.dashboard as d; d.build(); assert 'torch' not in sys.modules"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
