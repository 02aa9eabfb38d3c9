"""Processes and conditions in tests: every process a test starts runs in a session of its
own and is killed by process group when the test ends, pass or fail."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start(command: list[str], log: Path | None = None, **env: str) -> subprocess.Popen:
    """Start ``command`` in the repository, in its own session; its output goes to ``log``
    (a file) or to a text pipe (``proc.stdout``)."""
    kwargs = {
        "cwd": ROOT,
        "env": {**os.environ, "PYTHONPATH": str(ROOT), **env},
        "stdin": subprocess.DEVNULL,
        "stderr": subprocess.STDOUT,
        "start_new_session": True,
    }
    if log is None:
        return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, **kwargs)
    with open(log, "wb") as out:
        return subprocess.Popen(command, stdout=out, **kwargs)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process's whole group (it and everything it started) and reap it."""
    with contextlib.suppress(ProcessLookupError):  # the whole group is gone already
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition`` until it holds; AssertionError naming ``what`` after ``timeout`` s.
    Returns the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start
