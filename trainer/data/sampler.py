"""Which windows of the corpus go into each batch: deterministic and resumable.

The corpus is cut into non-overlapping training windows of ``seq_len + 1``
tokens (inputs plus the one-token-shifted targets) starting at multiples of
``seq_len``, so consecutive windows share exactly one boundary token and every
token is a target at most once per epoch. Each epoch visits every window once,
in a permutation drawn from a generator seeded by ``(seed, epoch)`` alone.

Trade-off: because an epoch's order is a pure function of ``(seed, epoch)``,
the whole sampler state is three small integers (epoch, position, seed) that
survive a JSON round trip, and a resumed run yields exactly the batches the
original would have - no RNG state to pickle. The price is one permutation of
``num_windows`` int64s held in memory (8 bytes per window, e.g. 40 MB for 10B
tokens at seq_len 2048), regenerated once per epoch. Windows are fixed, not
randomly offset, and documents are packed across window boundaries (separated
by the end-of-document id), which wastes no tokens on padding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from trainer.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

_STATE_KEYS = ("seed", "epoch", "position", "seq_len", "batch_size", "num_tokens")
# A resumed run must cut and shuffle the corpus identically, or "position" means nothing.
_MUST_MATCH = ("seq_len", "num_tokens", "seed")


class BatchSampler:
    """Yields batches of window start offsets; ``state_dict`` captures where it is."""

    def __init__(self, num_tokens: int, seq_len: int, batch_size: int, seed: int) -> None:
        for name, value, low in (
            ("seq_len", seq_len, 1),
            ("batch_size", batch_size, 1),
            ("seed", seed, 0),
            ("num_tokens", num_tokens, 0),
        ):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ConfigError(f"sampler {name} must be an integer >= {low}, got {value!r}")
        if num_tokens < seq_len + 1:
            raise DataError(
                f"corpus has {num_tokens} tokens; need at least seq_len+1 = {seq_len + 1}"
            )
        self.num_tokens = int(num_tokens)
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_windows = (self.num_tokens - 1) // self.seq_len
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Window indices of ``epoch`` in visiting order (a permutation of all windows)."""
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.permutation(self.num_windows).astype(np.int64)
            self._order_epoch = epoch
        return self._order

    def next_starts(self) -> np.ndarray:
        """The next ``batch_size`` window start offsets (int64), crossing epochs seamlessly."""
        out = np.empty(self.batch_size, dtype=np.int64)
        filled = 0
        while filled < self.batch_size:
            order = self.epoch_order(self.epoch)
            take = min(self.batch_size - filled, self.num_windows - self.position)
            out[filled : filled + take] = order[self.position : self.position + take]
            filled += take
            self.position += take
            # Rolling over eagerly keeps the saved state canonical (position < num_windows).
            if self.position == self.num_windows:
                self.epoch += 1
                self.position = 0
        return out * self.seq_len

    def state_dict(self) -> dict[str, int]:
        return {key: int(getattr(self, key)) for key in _STATE_KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state``; batch_size may differ (position counts windows, not batches)."""
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise DataError(f"sampler state is missing {', '.join(missing)}")
        mismatched = [
            f"{key} {state[key]} (saved) != {getattr(self, key)} (now)"
            for key in _MUST_MATCH
            if state[key] != getattr(self, key)
        ]
        if mismatched:
            raise DataError(
                "sampler state does not match this corpus/config: " + "; ".join(mismatched)
            )
        epoch, position = state["epoch"], state["position"]
        if not (isinstance(epoch, int) and epoch >= 0):
            raise DataError(f"sampler state epoch must be an integer >= 0, got {epoch!r}")
        if not (isinstance(position, int) and 0 <= position <= self.num_windows):
            raise DataError(f"sampler state position {position!r} is outside 0..{self.num_windows}")
        self.epoch, self.position = epoch, position
        if self.position == self.num_windows:
            self.epoch, self.position = self.epoch + 1, 0


def batch_from_starts(
    tokens: np.ndarray, starts: np.ndarray | list[int], seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [B, seq_len] and targets [B, seq_len] (shifted by one) as int64 tensors."""
    # Imported here so preparing data (and the control plane) never pays torch's import.
    import torch

    starts_arr = np.asarray(starts, dtype=np.int64).reshape(-1)
    if starts_arr.size and (starts_arr.min() < 0 or starts_arr.max() + seq_len + 1 > len(tokens)):
        raise DataError(
            f"window starts {starts_arr.min()}..{starts_arr.max()} with seq_len {seq_len} "
            f"run past the corpus of {len(tokens)} tokens"
        )
    index = starts_arr[:, None] + np.arange(seq_len + 1, dtype=np.int64)
    windows = torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
