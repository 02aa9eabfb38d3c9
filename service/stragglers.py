"""Straggler scores: how far each rank's compute time lies from the others'.

Each rank reports, about once a second, its last step's compute time (the step's
wall time minus the time it waited in collectives). In a synchronous world every
rank's *step* time is the slowest rank's, so step times cannot tell who is slow;
compute times can: the straggler computes longer and waits less, the others wait
for it.

Per rank, the median of its last ``WINDOW`` samples (one slow step moves a
median of 8 by at most one place: it is not a straggler). Then each rank
against the others (leave one out, so a straggler does not hide in the
reference it is compared with): score = (its median - the others' median) /
spread, where spread = 1.4826 x the others' MAD (their scatter, robust), but at
least ``MIN_SPREAD`` x the others' median (identical healthy ranks would
otherwise make any difference infinite). A rank 2x slower than the others
scores (2 - 1) / 0.1 = 10; healthy ranks whose compute times scatter by 20 %
score at most about 2; ``THRESHOLD`` = 5 lies between. Only a positive score
(slower than the others) can flag a rank. Pure functions; the reconciler keeps
the windows.
"""

from __future__ import annotations

import statistics
from collections import deque

WINDOW = 8  # samples per rank; one per new step seen
MIN_SAMPLES = 4  # a rank is scored once it has this many
MIN_SPREAD = 0.1  # of the others' median
THRESHOLD = 5.0


def _mad(values: list[float]) -> float:
    middle = statistics.median(values)
    return statistics.median(abs(v - middle) for v in values)


def scores(windows: dict[int, list[float]]) -> dict[int, float]:
    """Rank -> straggler score, for the ranks with at least MIN_SAMPLES samples (and at
    least two such ranks)."""
    medians = {r: statistics.median(w) for r, w in windows.items() if len(w) >= MIN_SAMPLES}
    if len(medians) < 2:
        return {}
    out = {}
    for rank, mine in medians.items():
        others = [m for r, m in medians.items() if r != rank]
        reference = statistics.median(others)
        spread = max(1.4826 * _mad(others), MIN_SPREAD * reference, 1e-9)
        out[rank] = (mine - reference) / spread
    return out


class Windows:
    """Per job: each rank's last WINDOW compute times, one sample per new step."""

    def __init__(self) -> None:
        self._samples: dict[int, deque[float]] = {}
        self._last_step: dict[int, int] = {}

    def add(self, rank: int, step: int, compute_s: float) -> None:
        if step <= self._last_step.get(rank, 0):
            return  # the same step seen again (reports come every second)
        self._last_step[rank] = step
        self._samples.setdefault(rank, deque(maxlen=WINDOW)).append(compute_s)

    def scores(self) -> dict[int, float]:
        return scores({r: list(w) for r, w in self._samples.items()})

    def clear(self) -> None:
        self._samples.clear()
        self._last_step.clear()
