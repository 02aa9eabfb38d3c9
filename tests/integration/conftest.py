"""Shared parts of the integration tests: one real etcd per test module, a real `megamoe
serve` as a subprocess, and `megamoe train --nproc 4` as the reference a distributed job
must equal. Everything started here is stopped by PID or process group afterwards."""

import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import megamoe
from tests.procs import kill_group, start
from trainer.elastic.server import start_etcd

REFERENCE_STEPS = 4
# tiny.toml as a world of 4 (n=2 x dp=2), a few steps on the demo corpus
REFERENCE_SETS = ["parallel.n=2", "parallel.dp=2", f"train.steps={REFERENCE_STEPS}"]


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory):
    with start_etcd(tmp_path_factory.mktemp("etcd")) as running:
        yield running


def reference_run(sets: list[str], nproc: int, out_dir: Path) -> dict:
    """The summary of `megamoe train --nproc NPROC` on configs/tiny.toml with ``sets``:
    the uninterrupted run a job of the service must equal."""
    path = out_dir / "summary.json"
    args = ["train", "--config", "configs/tiny.toml", *[x for s in sets for x in ("--set", s)]]
    res = megamoe(*args, "--nproc", str(nproc), "--summary-json", str(path), timeout=280)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def reference_4(demo_data, tmp_path_factory):
    """``reference_run`` of 4 ranks with REFERENCE_SETS (and the demo data)."""
    sets = [*REFERENCE_SETS, f"data.path={demo_data}"]
    return reference_run(sets, 4, tmp_path_factory.mktemp("reference"))


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains ``text``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def start_serve(state: Path, *args: str, env: dict[str, str] | None = None):
    """`megamoe serve --port 0 --state-dir STATE ARGS` in a session of its own: (process,
    "127.0.0.1:PORT") once it prints its `serving on` line. The caller stops it. Its output
    keeps being read into ``process.lines`` (by ``process.drain``, a thread)."""
    command = [sys.executable, "-m", "service.cli", "serve", "--port", "0"]
    proc = start([*command, "--state-dir", str(state), *args], **(env or {}))
    deadline, lines = time.monotonic() + 60, []
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"serving on 127\.0\.0\.1:(\d+)", line)
        if m:
            proc.lines = lines
            proc.drain = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
            proc.drain.start()  # a full pipe would block the server
            return proc, f"127.0.0.1:{m.group(1)}"
        if time.monotonic() > deadline:
            kill_group(proc)
            pytest.fail("serve did not start: " + "".join(lines))
    kill_group(proc)
    pytest.fail("serve exited: " + "".join(lines))


@contextlib.contextmanager
def running_serve(state: Path, *args: str, env: dict[str, str] | None = None):
    """``start_serve``; afterwards the server's group is killed, and everything that still
    names the state directory (the embedded etcd, job nodes and workers, which live in
    sessions of their own) too."""
    proc = None
    try:
        proc, address = start_serve(state, *args, env=env)
        yield proc, address
    finally:
        if proc is not None:
            kill_group(proc)
        for pid in pids_mentioning(str(state)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
