"""AdamW as every training process builds it, without loading torch.compile's machinery.

``torch.optim.AdamW`` imports ``torch._dynamo`` the first time it is used: its
``add_param_group``, ``zero_grad``, ``state_dict`` and ``load_state_dict`` carry a
"do not trace" marker that loads it on first call, and ``step`` loads it to mark a
graph break. That import costs about 1.1 s of CPU (torch 2.13, measured on a 2-core
VM), paid by every rank at every start and every restart, for markers that matter
only while torch.compile traces the optimizer - which the trainer never does
(``train.fused_kernels`` compiles elementwise kernels only). So:

* ``AdamW.step`` runs torch's own update (the function inside the markers) under
  ``torch.no_grad()``, which is what the graph-break wrapper does outside compiled
  code; the update, its state and its ``state_dict`` are torch's.
* While ``torch._dynamo`` is not loaded, each marked method is handed itself as its
  "do not trace" version: the cache the marker fills on its first call. Once
  ``torch._dynamo`` is loaded (a compiled kernel ran first), nothing is touched.
"""

from __future__ import annotations

import inspect
import sys

import torch

_MARKED = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")
_CACHE = "__dynamo_disable"  # where torch._compile._disable_dynamo caches its version


def _skip_dynamo_import() -> None:
    if "torch._dynamo" in sys.modules:
        return
    for name in _MARKED:
        fn = getattr(getattr(torch.optim.Optimizer, name), "__wrapped__", None)
        if fn is not None and getattr(fn, _CACHE, None) is None:
            setattr(fn, _CACHE, fn)


_UPDATE = inspect.unwrap(torch.optim.AdamW.step)  # torch's update, without its wrappers


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose ``step`` does not import ``torch._dynamo``."""

    def __init__(self, *args, **kwargs) -> None:
        _skip_dynamo_import()
        super().__init__(*args, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        return _UPDATE(self, closure)


def adamw(groups: list[dict], lr: float, betas: tuple[float, float]) -> AdamW:
    """AdamW (multi-tensor) over ``groups``, each with its own weight decay."""
    return AdamW(groups, lr=lr, betas=betas, foreach=True)
