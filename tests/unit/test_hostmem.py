"""train.host_memory: with ``keep`` a process reuses the host memory it freed (no page
faults when a step allocates the same tensors again); ``release`` leaves malloc as it was.

Each case runs in a fresh interpreter: malloc's policy is per process, and the test
process's own must not depend on which test ran first.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import hostmem
from trainer.config import loads
from trainer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

# A step's worth of allocation, thirty times: tensors of 48 MiB (above the 32 MiB cap of
# glibc's own adaptive threshold, as a large model's activations are) made, used and
# freed; the minor page faults of the last three rounds are what steady-state training
# steps would pay. With keep, the heap grows for the first 5 to 9 rounds (measured; the
# aligned blocks land at new addresses until the freed ones coalesce into a hole large
# enough) and then stays: ten rounds were once too few under the suite's load.
PROBE = """
import json, resource, sys
sys.path.insert(0, {root!r})
import torch
from trainer import hostmem
took = hostmem.apply({mode!r})

def step():
    ts = [torch.ones(12 << 20) for _ in range(2)]
    return sum(float(t[-1]) for t in ts)

faults = []
for _ in range(30):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({{"took": took, "faults": faults}}))
"""

PAGES_PER_STEP = 2 * (48 << 20) // 4096


def _faults(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(root=str(ROOT), mode=mode)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_keep_reuses_freed_memory_and_release_does_not():
    keep, release = _faults("keep"), _faults("release")
    assert keep["took"] and release["took"]
    # release: every step maps its tensors afresh and faults in each page again
    assert all(f > PAGES_PER_STEP // 2 for f in release["faults"][-3:]), release
    # keep: after the heap has grown to the step's size, the step touches only its own
    assert sum(keep["faults"][-3:]) < PAGES_PER_STEP // 10, keep


def test_a_bad_mode_is_named():
    with pytest.raises(ValueError, match="'forever' is not one of keep, release"):
        hostmem.apply("forever")


def test_the_config_key_takes_only_the_two_modes():
    assert loads("").train.host_memory == "keep"
    with pytest.raises(ConfigError, match=r"train\.host_memory = 'hoard' must be one of keep"):
        loads('[train]\nhost_memory = "hoard"\n')
