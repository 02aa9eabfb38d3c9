"""A rank of an Internal-352B slice built for real: its peak memory is its share's, not
the model's (bench/rank_memory.py in a fresh process; about 9 GiB and 35 s here)."""

import json
import subprocess
import sys

import pytest

from tests.e2e.conftest import ROOT


@pytest.mark.timeout(600)
def test_a_352b_rank_with_two_layers_peaks_near_its_share(tmp_path):
    out = tmp_path / "rank_memory.json"
    res = subprocess.run(
        [
            *(sys.executable, "bench/rank_memory.py", "--config", "configs/internal-352b.toml"),
            *("--layers", "2", "--pp", "1", "--alone-only", "--json", str(out)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    share, peak, whole = r["share_bytes"], r["alone"]["peak_bytes"], r["whole_model_bytes"]
    # n = 8: 4 of 32 experts per layer, the shared expert, SP attention, embedding and head
    assert 8.5 * 2**30 < share < 9.5 * 2**30
    assert whole > 45 * 2**30
    assert peak < 1.25 * share  # measured 1.12x: one drawn matrix above the share
