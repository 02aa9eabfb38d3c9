"""A worker's reports in a real etcd: progress under a lease that vanishes with the worker,
checkpoint commits and the result that outlive it, and training that goes on when etcd is
unreachable."""

import io
import json

from tests.procs import wait_until
from trainer.elastic.etcd import Etcd
from trainer.elastic.keys import Keys
from trainer.elastic.report import Reporter

KEYS = Keys("/test-report")


def test_progress_is_leased_and_commits_and_results_are_not(etcd_server):
    etcd = Etcd(etcd_server.endpoint)
    reporter = Reporter(etcd, KEYS, "job-a", rank=0, interval=0.05)
    reporter.step({"step": 3, "loss": 2.5})
    reporter.step({"step": 4, "loss": 2.25})  # latest wins
    wait_until(lambda: etcd.get(KEYS.rank("job-a", 0)) is not None, 10, "the rank's report")
    wait_until(lambda: json.loads(etcd.get(KEYS.rank("job-a", 0))[0])["step"] == 4, 10, "step 4")
    reporter.checkpoint(2, "/c/step-00000002")
    reporter.checkpoint(4, "/c/step-00000004")  # before the first was written, perhaps
    reporter.finished({"final_loss": 2.25, "summary_path": "/s.json"})
    reporter.close()
    assert etcd.get(KEYS.rank("job-a", 0)) is None  # the lease went with the worker
    commit = json.loads(etcd.get(KEYS.checkpoint("job-a"))[0])
    assert commit["step"] == 4
    assert commit["commits"] == [[2, "/c/step-00000002"], [4, "/c/step-00000004"]]
    assert json.loads(etcd.get(KEYS.result("job-a"))[0])["final_loss"] == 2.25


def test_an_unreachable_etcd_warns_once_and_never_raises():
    out = io.StringIO()
    dead = Etcd("127.0.0.1:9", timeout=0.2)  # the discard port: nothing answers
    reporter = Reporter(dead, KEYS, "job-b", rank=1, interval=0.05, out=out, final_flush_s=1)
    for step in range(20):
        reporter.step({"step": step})
    wait_until(lambda: "cannot report" in out.getvalue(), 10, "the warning")
    reporter.close()  # gives up after its final flush window, without raising
    assert out.getvalue().count("cannot report to the control plane") == 1
