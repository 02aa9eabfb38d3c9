"""Fixtures shared by every test directory: the demo corpus, prepared once per session."""

import json

import pytest

from tests.e2e.conftest import megamoe


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "demo"
    res = megamoe("data", "prepare", "--stdlib", "--output", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    assert "prepared" in res.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_tokens"] > 5_000_000  # the stdlib is ~12 MB of source
    return out
