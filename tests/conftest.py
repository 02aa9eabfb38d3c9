"""Fixtures shared by every test directory: the demo corpus (prepared once per session) and
processes started in sessions of their own, killed by process group at teardown."""

import json

import pytest

from tests.e2e.conftest import megamoe
from tests.procs import kill_group, start


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "demo"
    res = megamoe("data", "prepare", "--stdlib", "--output", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    assert "prepared" in res.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_tokens"] > 5_000_000  # the stdlib is ~12 MB of source
    return out


@pytest.fixture
def sessions():
    """``spawn(command, log=None, **env)``: a process in its own session (tests.procs.start);
    every one is killed by process group when the test ends, pass or fail."""
    started = []

    def spawn(command, log=None, **env):
        started.append(start(command, log, **env))
        return started[-1]

    try:
        yield spawn
    finally:
        for proc in started:
            kill_group(proc)
