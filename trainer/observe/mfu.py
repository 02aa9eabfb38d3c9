"""Peak FLOP/s of the training device, the denominator of MFU.

MFU = (model FLOPs per token, GEMMs + attention) * tokens/s / (devices * peak).

* GPUs: a table of known dense peaks (tensor-core BF16; TF32 for fp32 runs),
  matched against the CUDA device name. An unknown GPU needs
  ``observe.peak_tflops`` and says so. An fp32 run on a GPU runs its matmuls
  and convolutions in TF32 (``use_tensor_cores``), so the TF32 peak is the
  ceiling it can reach: fp32 storage and accumulation, 10-bit mantissa inputs.
* CPU: no datasheet number is meaningful, so the peak is measured once by a
  GEMM probe (the best of several square matmuls at the run's dtype and thread
  count) and cached under ``$XDG_CACHE_HOME/megamoe`` keyed by CPU model,
  threads, dtype and torch version. MFU on CPU is therefore "fraction of what
  this machine's BLAS reaches on a large GEMM".
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path

import torch

from trainer.atomic import write_json_atomic
from trainer.errors import ConfigError

# Dense peaks in TFLOP/s: (bf16, tf32) per GPU model.
GPU_PEAKS_TFLOPS: dict[str, tuple[float, float]] = {
    "H800": (989.0, 494.5),
    "H100": (989.0, 494.5),
    "H200": (989.0, 494.5),
    "H20": (148.0, 74.0),
    "A100": (312.0, 156.0),
    "A800": (312.0, 156.0),
    "B200": (2250.0, 1100.0),
    "L40S": (362.0, 183.0),
}


def gpu_peak_flops(device_name: str, dtype: str) -> float | None:
    """Peak FLOP/s of a known GPU, or None when the name is not in the table."""
    upper = device_name.upper()
    # Longest names first so "H200" is not taken for "H20".
    for model in sorted(GPU_PEAKS_TFLOPS, key=len, reverse=True):
        if model in upper:
            bf16, tf32 = GPU_PEAKS_TFLOPS[model]
            return (bf16 if dtype == "bf16" else tf32) * 1e12
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "megamoe"


def probe_gemm_flops(dtype: str, size: int = 1024, repeats: int = 5) -> float:
    """Best FLOP/s of a square [size x size] matmul on this CPU at the current thread count."""
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(size, size, dtype=torch_dtype)
    b = torch.randn(size, size, dtype=torch_dtype)
    torch.mm(a, b)  # warm up the BLAS kernels and thread pool
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def cpu_peak_flops(dtype: str) -> float:
    """The cached GEMM-probe peak for this CPU, threads and dtype (probing once if needed)."""
    threads = torch.get_num_threads()
    key = f"{_cpu_model()}|threads={threads}|{dtype}|torch={torch.__version__}"
    path = _cache_dir() / "cpu_peak.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return float(cache[key])
    peak = probe_gemm_flops(dtype)
    cache[key] = peak
    with contextlib.suppress(OSError):  # an unwritable cache only costs a re-probe next run
        write_json_atomic(path, cache)
    return peak


def use_tensor_cores(device: torch.device, dtype: str) -> None:
    """fp32 on a GPU: matmuls in TF32, the precision the MFU's peak assumes."""
    if device.type == "cuda" and dtype == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def peak_flops(device: torch.device, dtype: str, configured_tflops: float = 0.0) -> float:
    """Peak FLOP/s per device: the configured value, else the GPU table, else the CPU probe."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, dtype)
        if peak is None:
            raise ConfigError(
                f"no known peak FLOP/s for GPU {name!r}; set observe.peak_tflops "
                f"(known: {', '.join(GPU_PEAKS_TFLOPS)})"
            )
        return peak
    return cpu_peak_flops(dtype)
