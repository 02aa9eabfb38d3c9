"""Reads of device values on the host, kept out of the layer's hot path.

On a GPU, every read of a tensor's value by the host (``.tolist()``, ``.item()``,
``int(t)``, ``nonzero``, boolean-mask indexing, ``bincount``, ``repeat_interleave``
without ``output_size``) waits for every kernel queued before it: the CPU stops
running ahead, and the launch queue that keeps the GPU busy drains. The MoE
layer needs exactly one such read per forward: the all-to-all's split sizes
(or, for the gathered modes, the rows each local expert receives), which the
collective and the per-expert GEMM boundaries must know on the host. It goes
through :func:`host_ints`, which counts it. A capacity-bounded all-to-all
(``model.capacity_factor > 0``) reads once more: what the receiver kept.

:class:`SyncAudit` is a dispatch mode that records every operator that would
make such a read implicitly; the tests run the layers' forward and backward
under it on the CPU (where nothing actually waits) and require an empty list,
so a host synchronisation slipped into the hot path fails a test, not a GPU
profile months later.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

READS = {"count": 0}  # host_ints calls in this process (tests and benchmarks read it)


def host_ints(t: torch.Tensor) -> list[int]:
    """The integers of ``t`` on the host, in one device-to-host copy (counted)."""
    READS["count"] += 1
    return t.reshape(-1).tolist()


def counts_of(index: torch.Tensor, size: int) -> torch.Tensor:
    """How often each value in [0, size) occurs in ``index``, without a host read
    (``torch.bincount`` reads the maximum on CUDA)."""
    flat = index.reshape(-1)
    counts = torch.zeros(size, dtype=torch.long, device=flat.device)
    return counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.long))


_ALWAYS = {
    "aten::_local_scalar_dense",  # .item(), int(t), float(t), bool(t)
    "aten::nonzero",
    "aten::nonzero_static",
    "aten::bincount",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::unique_dim",
    "aten::is_nonzero",
    "aten::equal",
}


def _reads_host(func, args, kwargs) -> bool:
    name = func._schema.name
    if name in _ALWAYS:
        return True
    if name == "aten::repeat_interleave":
        # the .Tensor overload takes the repeats alone; the others (input, repeats, ...)
        repeats = args[0] if func._overloadname == "Tensor" else args[1]
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    if name in ("aten::index", "aten::index_put", "aten::index_put_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
    if name in ("aten::_to_copy", "aten::copy_"):
        src = args[1] if name == "aten::copy_" else args[0]
        dst = args[0] if name == "aten::copy_" else None
        to_cpu = (dst is not None and dst.device.type == "cpu") or (
            kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu"
        )
        return to_cpu and isinstance(src, torch.Tensor) and src.device.type != "cpu"
    return False


class SyncAudit(TorchDispatchMode):
    """Records (operator name) of every implicit host read dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _reads_host(func, args, kwargs):
            self.found.append(func._schema.name)
        return func(*args, **kwargs)
