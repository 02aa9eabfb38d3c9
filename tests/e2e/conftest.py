"""Shared fixtures for whole-command tests: run `megamoe` as a subprocess, the demo corpus."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def megamoe(*args, cwd=ROOT, timeout=240):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "demo"
    res = megamoe("data", "prepare", "--stdlib", "--output", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    assert "prepared" in res.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_tokens"] > 5_000_000  # the stdlib is ~12 MB of source
    return out


def one_line_error(res):
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("megamoe: error: ")
    return lines[0]
