"""The README's main command: scripts/demo.sh (what `make demo` runs) starts the service on
its embedded defaults, runs the tiny job through the API as 2 nodes x 1 process, reports
the final loss and the summary, and stops the service."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT
from tests.integration.conftest import pids_mentioning


@pytest.mark.timeout(300)
def test_the_demo_runs_a_job_through_the_service_and_stops_it(demo_data, tmp_path):
    state = tmp_path / "service"
    env = {
        **os.environ,
        "BIN": str(Path(sys.executable).parent),
        "STATE": str(state),
        "DEMO_ARGS": f"--set data.path={demo_data} --set train.steps=3",
    }
    try:
        res = subprocess.run(
            ["bash", "scripts/demo.sh"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=280,
            start_new_session=True,
        )
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        out = res.stdout
        assert "megamoe serve is up on 127.0.0.1:" in out
        loss = re.search(r"SUCCEEDED after 3 steps, final loss (\d+\.\d+)", out)
        summary_path = re.search(r"summary at (\S+)", out)
        assert loss and summary_path, out
        summary = json.loads(Path(summary_path.group(1)).read_text())
        assert summary["layout"]["world"] == 2
        assert f"{summary['final_loss']:.4f}" == loss.group(1)
        assert "service stopped" in out
        assert pids_mentioning(str(state)) == []  # the server, its etcd, the job: all gone
    finally:
        for pid in pids_mentioning(str(state)):
            os.kill(pid, 9)
