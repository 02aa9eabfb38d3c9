"""Every physical parameter of the performance model, in one place.

A hardware profile is what one accelerator and its node look like from the
model's point of view: dense peak FLOP/s, memory and its bandwidth, the
per-direction NVLink bandwidth inside a node, the per-GPU NIC bandwidth
across nodes, and how close real kernels and collectives get to those peaks.

Sources of the datasheet numbers (dense, no sparsity):

* Peaks (BF16, TF32): the MFU table of ``trainer.observe.mfu`` (NVIDIA
  datasheets: H100/H800/H200 SXM 989, A100 312, H20 148, B200 2250 TFLOP/s).
* Memory and HBM bandwidth: NVIDIA datasheets (H100/H800 SXM 80 GB 3.35 TB/s,
  H200 141 GB 4.8 TB/s, A100 SXM 80 GB 2.04 TB/s, H20 96 GB 4.0 TB/s,
  B200 180 GB 8 TB/s as in DGX B200).
* NVLink: datasheet totals are bidirectional; a collective's bytes leave a
  GPU in one direction, so the model uses half (H800 400 -> 200 GB/s,
  H100/H200/H20 900 -> 450, A100 600 -> 300, B200 1800 -> 900).
* NIC: one NIC per GPU on a rail-optimised fabric: 400 Gb/s = 50 GB/s
  (ConnectX-7 in HGX/DGX H100, H800 and B200 systems; the "50 GB/s NIC" of
  the H800 cluster in MegaScale-MoE, arXiv 2505.11432); A100 (DGX A100)
  200 Gb/s = 25 GB/s.

The efficiencies (:class:`Efficiency`) are global constants, the same for
every NVIDIA profile, chosen once (see docs/PLANNER.md for the reasoning);
nothing is fitted per model, GPU count or table row.

Nothing here measures anything. ``"cpu"`` is this machine, built by
:func:`cpu_profile` from one-thread rates (:class:`CpuRates`) and a loopback
gloo link that bench/probes.py measured and recorded
(:func:`cached_cpu_profile` reads the record). For the calibration against
bench/ablation.py (bench/calibrate.py, docs/PLANNER.md "Calibration on this
machine"), :func:`cpu_ranks` describes N one-thread ranks sharing this
machine's cores from the same one-thread rates and loopback gloo measured
among N ranks (:class:`GlooRates`), and :func:`over_fabric` holds every
rank's link to bench/fabric.py's rate. Two fields exist for such CPU ranks
only: ``comm_cpu_share`` (the part of a collective that occupies the compute
cores, which no overlap hides) and ``fp8_codec_rate`` (the FP8 codec as
separate kernels on those cores); both are 0 on GPUs.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError

GiB = 1024**3


@dataclass(frozen=True)
class Efficiency:
    """How close real kernels and collectives get to the datasheet peaks."""

    gemm_dense: float  # large, well-shaped BF16 GEMM (cuBLAS) / peak
    gemm_grouped: float  # grouped GEMM over several local experts / peak
    gemm_half_dim: int  # a GEMM dimension of this size halves its share of the tile grid
    attention: float  # causal flash attention, forward + backward / peak
    hbm: float  # element-wise kernels: achieved / datasheet HBM bandwidth
    all_to_all: float  # NVLink all-to-all (send/recv pairs) / per-direction link
    gather_scatter: float  # NVLink all-gather / reduce-scatter / per-direction link
    nic: float  # inter-node collectives and pipeline sends / NIC line rate
    latency_s: float  # fixed cost of one collective call (launch + handshake)
    chunk_latency_s: float  # extra cost per intra-operator piece (0: fused kernels signal tiles)
    framework: float  # kernel time / total time: launch gaps, host jitter, sync skew
    reserved_bytes: float  # per device: runtime context, communicator buffers, allocator slack
    # reduce-scatter / per-direction link, when it differs from all-gather's `gather_scatter`
    # (None: the same; gloo runs a reduce-scatter as a whole all-reduce: twice the bytes)
    reduce_scatter: float | None = None


# The global constants for NVIDIA GPUs. Why these values: docs/PLANNER.md, "Parameters".
GPU_EFFICIENCY = Efficiency(
    gemm_dense=0.75,
    gemm_grouped=0.62,
    gemm_half_dim=128,
    attention=0.45,
    hbm=0.85,
    all_to_all=0.45,
    gather_scatter=0.85,
    nic=0.85,
    latency_s=25e-6,
    chunk_latency_s=0.0,
    framework=0.76,
    reserved_bytes=4 * GiB,
)


@dataclass(frozen=True)
class Hardware:
    """One accelerator type and its node; bandwidths in bytes/s per GPU and direction."""

    name: str
    peak_flops: float  # dense BF16 (the MFU denominator)
    peak_flops_fp32: float  # TF32 tensor cores on GPUs; the probed rate on CPU
    memory_bytes: float
    hbm_bw: float
    nvlink_bw: float  # intra-node, per direction
    gpus_per_node: int
    nic_bw: float  # inter-node, per GPU, per direction
    efficiency: Efficiency
    source: str = ""
    # Share of a collective's time during which it keeps the compute cores busy, so that
    # no overlap can hide it: 0 on GPUs (copy engines and NICs move the data), 1 for CPU
    # ranks with no spare core (the kernel's socket copies are the transfer).
    comm_cpu_share: float = 0.0
    # Elements/s of one FP8 round trip (trainer.compress.fp8: scale + cast, then decode) when
    # the codec runs as separate kernels on the compute cores; 0: fused into the
    # communication kernels, free (GPUs).
    fp8_codec_rate: float = 0.0

    def peak(self, dtype: str) -> float:
        return self.peak_flops if dtype == "bf16" else self.peak_flops_fp32


def _tflops(name: str) -> tuple[float, float]:
    from trainer.observe.mfu import GPU_PEAKS_TFLOPS

    bf16, tf32 = GPU_PEAKS_TFLOPS[name]
    return bf16 * 1e12, tf32 * 1e12


def _gpu(name: str, memory_gb: float, hbm_tbs: float, nvlink_bidir_gbs: float, nic_gbit: float):
    bf16, tf32 = _tflops(name)
    return Hardware(
        name=name,
        peak_flops=bf16,
        peak_flops_fp32=tf32,
        memory_bytes=memory_gb * GiB,
        hbm_bw=hbm_tbs * 1e12,
        nvlink_bw=nvlink_bidir_gbs / 2 * 1e9,
        gpus_per_node=8,
        nic_bw=nic_gbit / 8 * 1e9,
        efficiency=GPU_EFFICIENCY,
        source="NVIDIA datasheets; NVLink halved to one direction; one NIC per GPU",
    )


GPUS: dict[str, Hardware] = {
    "H800": _gpu("H800", 80, 3.35, 400, 400),
    "H100": _gpu("H100", 80, 3.35, 900, 400),
    "H200": _gpu("H200", 141, 4.8, 900, 400),
    "A100": _gpu("A100", 80, 2.039, 600, 200),
    "H20": _gpu("H20", 96, 4.0, 900, 400),
    "B200": _gpu("B200", 180, 8.0, 1800, 400),
}

CPU_NAMES = ("CPU", "THIS", "LOCAL")


def known_names() -> list[str]:
    return [*GPUS, "cpu"]


def hardware_profile(name: str) -> Hardware:
    """The profile called ``name`` (case-insensitive); ``cpu``: this machine's recorded probes."""
    key = name.strip().upper()
    if key in GPUS:
        return GPUS[key]
    if key in CPU_NAMES:
        return cached_cpu_profile()
    raise ConfigError(f"unknown --gpu {name!r} (known: {', '.join(known_names())})")


# ---------------------------------------------------------------- this machine

# On CPU the probes measure the rates directly, so the efficiencies are 1
# except where a kernel is known to do worse than the probe's 1024^3 GEMM.
# `framework` stays 1 until a calibration against a CPU benchmark sets it.
CPU_EFFICIENCY = Efficiency(
    gemm_dense=1.0,
    gemm_grouped=0.9,
    gemm_half_dim=32,
    attention=0.5,
    hbm=1.0,
    all_to_all=1.0,
    gather_scatter=1.0,
    nic=1.0,
    latency_s=0.0,  # replaced by the measured round trip
    chunk_latency_s=0.0,  # likewise: chunked collectives are separate gloo calls
    framework=1.0,
    reserved_bytes=0.5 * GiB,
)


@dataclass(frozen=True)
class CpuRates:
    """This machine measured with one thread: what one rank with a core to itself reaches."""

    cores: int
    gemm_fp32: float  # FLOP/s of a 1024^3 GEMM (trainer.observe.mfu's probe)
    gemm_bf16: float
    memory_bw: float  # bytes/s of a large tensor copy, read + write
    fp8_codec_rate: float  # elements/s of an FP8 round trip (encode_rows + decode)
    memory_bytes: float  # the machine's RAM


def cpu_profile(rates: CpuRates, link_bw: float, latency_s: float) -> Hardware:
    """This machine as a "node" of one-thread ranks (how the trainer runs ``--nproc`` on CPU).

    One rank per core, each with the one-thread GEMM rate and its share of the copy
    bandwidth and the RAM; links (the intra-node group and "inter-node" traffic alike:
    there is no second node) at ``link_bw`` bytes/s each way with ``latency_s`` per call,
    as a 2-rank loopback gloo all-to-all measures them.
    """
    return Hardware(
        name="cpu",
        peak_flops=rates.gemm_bf16,
        peak_flops_fp32=rates.gemm_fp32,
        memory_bytes=rates.memory_bytes / rates.cores,
        hbm_bw=rates.memory_bw / rates.cores,
        nvlink_bw=link_bw,
        gpus_per_node=rates.cores,
        nic_bw=link_bw,
        efficiency=replace(CPU_EFFICIENCY, latency_s=latency_s, chunk_latency_s=latency_s),
        source="measured on this machine: 1-thread GEMM probe, tensor copy, 2-rank loopback gloo",
    )


# The probes themselves live in bench/probes.py (``python bench/probes.py`` writes this
# record); the planner only reads what they measured.


def cpu_probes_path() -> Path:
    """Where bench/probes.py leaves this machine's probes (beside trainer.observe.mfu's cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "megamoe" / "cpu_probes.json"


def this_machine() -> str:
    """What a probe record must have been measured on: the CPU model and the core count."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count() or 1} cores"


def cpu_probes_record(rates: CpuRates, link_bw: float, latency_s: float) -> dict[str, Any]:
    """The JSON record :func:`cached_cpu_profile` reads."""
    return {
        "machine": this_machine(),
        "rates": asdict(rates),
        "loopback": {"bandwidth": link_bw, "latency_s": latency_s},
    }


def cached_cpu_profile(path: Path | None = None) -> Hardware:
    """:func:`cpu_profile` from the probes bench/probes.py recorded on this machine."""
    path = path or cpu_probes_path()
    hint = "run `python bench/probes.py` to probe this machine (under a minute)"
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--gpu cpu needs this machine's probes: no {path}; {hint}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path} ({e}); {hint}") from None
    machine = this_machine()
    if not isinstance(record, dict) or record.get("machine") != machine:
        found = record.get("machine") if isinstance(record, dict) else None
        raise ConfigError(f"{path} holds probes of {found!r}, not of this {machine!r}; {hint}")
    try:
        link = record["loopback"]
        return cpu_profile(
            CpuRates(**record["rates"]), float(link["bandwidth"]), float(link["latency_s"])
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path} is not a probe record ({e!r}); {hint}") from None


# ------------------------------------------- CPU ranks sharing cores (bench/calibrate.py)

# TCP over a 1500-byte MTU with timestamps carries 1448 payload bytes in each 1514-byte
# frame a tc qdisc counts (Ethernet header included, preamble and FCS not).
TCP_PAYLOAD = 1448 / 1514


@dataclass(frozen=True)
class GlooRates:
    """Loopback gloo collectives measured among ``ranks`` one-thread processes on this machine.

    Rates are booked bytes per second and rank (``trainer.parallel.comm``'s convention:
    what leaves one rank, (n - 1)/n of the full tensor for every kind), from the slowest
    rank's time less one latency; ``latency_s`` is one tiny all-reduce.
    """

    ranks: int
    all_to_all: float
    all_gather: float
    reduce_scatter: float
    latency_s: float


def cpu_ranks(rates: CpuRates, gloo: GlooRates, name: str = "cpu") -> Hardware:
    """``gloo.ranks`` one-thread CPU ranks sharing ``rates.cores`` cores, as one "node".

    Compute: with more ranks than cores each rank runs cores / ranks of the time, so its
    GEMM rate, memory bandwidth and FP8 codec rate are the one-thread probes times
    min(1, cores / ranks). Links: the gloo rates measured with the same number of ranks
    on the same cores (so already shared, not divided again): all-to-all is the link,
    all-gather and reduce-scatter its measured fractions, the latency the measured tiny
    all-reduce (also the cost of each extra intra-operator piece: a separate gloo call).
    With no spare core the socket copies of a collective run on the cores the compute
    needs, so overlap cannot hide them (``comm_cpu_share`` = 1).
    """
    share = min(1.0, rates.cores / gloo.ranks)
    link = gloo.all_to_all
    eff = replace(
        CPU_EFFICIENCY,
        all_to_all=1.0,
        gather_scatter=gloo.all_gather / link,
        reduce_scatter=gloo.reduce_scatter / link,
        latency_s=gloo.latency_s,
        chunk_latency_s=gloo.latency_s,
    )
    return Hardware(
        name=name,
        peak_flops=rates.gemm_bf16 * share,
        peak_flops_fp32=rates.gemm_fp32 * share,
        memory_bytes=rates.memory_bytes / gloo.ranks,
        hbm_bw=rates.memory_bw * share,
        nvlink_bw=link,
        gpus_per_node=gloo.ranks,
        nic_bw=link,
        efficiency=eff,
        source=(
            f"{gloo.ranks} one-thread ranks on {rates.cores} cores: 1-thread probes x "
            f"{share:.2f}, loopback gloo measured at {gloo.ranks} ranks"
        ),
        comm_cpu_share=1.0 if gloo.ranks >= rates.cores else 0.0,
        fp8_codec_rate=rates.fp8_codec_rate * share,
    )


def over_fabric(hw: Hardware, mbit: float) -> Hardware:
    """``hw`` with every rank's link limited to ``mbit`` Mbit/s each way (bench/fabric.py).

    On the wire: the TCP payload share of the tc rate. All-to-all and all-gather (a ring)
    put their booked bytes on a rank's link, a gloo reduce-scatter twice them (gloo runs
    it as an all-reduce of the whole tensor); none goes faster than on loopback, since the
    same socket copies still run on the cores. Of each collective's time the loopback
    part keeps the cores busy and the rest is waiting for the wire, which overlap can hide.
    """
    wire = mbit * 1e6 / 8 * TCP_PAYLOAD
    e = hw.efficiency
    loop_a2a = hw.nvlink_bw * e.all_to_all
    loop_ag = hw.nvlink_bw * e.gather_scatter
    loop_rs = hw.nvlink_bw * (e.reduce_scatter or e.gather_scatter)
    a2a = min(wire, loop_a2a)
    eff = replace(
        e,
        all_to_all=a2a / wire,
        gather_scatter=min(wire, loop_ag) / wire,
        reduce_scatter=min(wire / 2, loop_rs) / wire,
    )
    return replace(
        hw,
        name=f"{hw.name}, {mbit:.0f} Mbit/s links",
        nvlink_bw=wire,
        nic_bw=wire,
        efficiency=eff,
        comm_cpu_share=hw.comm_cpu_share * a2a / loop_a2a,
        source=f"{hw.source}; links limited to {mbit:.0f} Mbit/s (tc tbf), TCP payload",
    )
