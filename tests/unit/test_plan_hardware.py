"""Hardware profiles: GPU rows against published datasheet numbers; this machine from its probes."""

import json

import pytest

from trainer.errors import ConfigError
from trainer.plan import GPUS
from trainer.plan.hardware import (
    GPU_EFFICIENCY,
    CpuRates,
    GiB,
    cpu_probes_path,
    cpu_probes_record,
    cpu_profile,
    hardware_profile,
)

# Published numbers, written out here independently of the tables the profiles are built
# from (trainer/plan/hardware.py, trainer/observe/mfu.py), so a typo in either fails.
# Per GPU: dense BF16 and TF32 tensor TFLOP/s (datasheets print "with sparsity", twice
# these), memory in GB, HBM TB/s, NVLink GB/s (bidirectional total), NIC Gbit/s per GPU.
#   H100 SXM5 (NVIDIA H100 datasheet): BF16 1979 / TF32 989 sparse, 80 GB HBM3,
#     3.35 TB/s, NVLink 900 GB/s; DGX H100: 8 x ConnectX-7 400 Gb/s.
#   H800 SXM5 (NVIDIA H800 datasheet): the H100 SXM5 with NVLink cut to 400 GB/s.
#   H200 SXM (NVIDIA H200 datasheet): same compute as H100, 141 GB HBM3e, 4.8 TB/s, 900 GB/s.
#   A100 SXM 80 GB (NVIDIA A100 datasheet): BF16 624 / TF32 312 sparse, 80 GB HBM2e,
#     2039 GB/s, NVLink 600 GB/s; DGX A100: 8 x ConnectX-6 200 Gb/s.
#   H20 (NVIDIA H20 product brief): BF16 148, TF32 74 dense, 96 GB HBM3, 4.0 TB/s, 900 GB/s.
#   B200 (HGX / DGX B200 datasheets, 8 GPUs): BF16 36 PF and TF32 18 PF sparse, 1440 GB,
#     64 TB/s HBM3e, NVLink 5 1.8 TB/s per GPU, 8 x ConnectX-7 400 Gb/s.
# Memory: the planner counts a datasheet "GB" of HBM as GiB (stacks come in binary sizes).
PUBLISHED = {
    #        BF16    TF32  mem   HBM   NVLink  NIC
    "H100": (989.5, 494.5, 80, 3.35, 900, 400),
    "H800": (989.5, 494.5, 80, 3.35, 400, 400),
    "H200": (989.5, 494.5, 141, 4.8, 900, 400),
    "A100": (312.0, 156.0, 80, 2.039, 600, 200),
    "H20": (148.0, 74.0, 96, 4.0, 900, 400),
    "B200": (2250.0, 1125.0, 180, 8.0, 1800, 400),
}
# Datasheets round (989.4 vs 989.5, B200 TF32 1.1 vs 1.125 PF): 2.5 % slack, far below
# what a dropped, doubled or swapped digit moves.
REL = 0.025


def test_every_gpu_matches_its_datasheet():
    assert set(GPUS) == set(PUBLISHED)
    for name, (bf16, tf32, mem_gb, hbm_tbs, nvlink_gbs, nic_gbit) in PUBLISHED.items():
        hw = hardware_profile(name.lower())  # names are case-insensitive
        assert hw.peak_flops == pytest.approx(bf16 * 1e12, rel=REL), name
        assert hw.peak("bf16") == hw.peak_flops, name
        assert hw.peak("fp32") == pytest.approx(tf32 * 1e12, rel=REL), name
        assert hw.memory_bytes == pytest.approx(mem_gb * GiB, rel=REL), name
        assert hw.hbm_bw == pytest.approx(hbm_tbs * 1e12, rel=REL), name
        # A collective's bytes leave a GPU in one direction: half the bidirectional total.
        assert hw.nvlink_bw == pytest.approx(nvlink_gbs / 2 * 1e9, rel=REL), name
        assert hw.nic_bw == pytest.approx(nic_gbit / 8 * 1e9, rel=REL), name
        assert hw.gpus_per_node == 8, name


def test_h800_is_an_h100_with_less_nvlink():
    """The paper's machine (MegaScale-MoE, arXiv 2505.11432): 200 GB/s NVLink each way
    and the 50 GB/s NIC; everything but NVLink equal to the H100's."""
    h800, h100 = GPUS["H800"], GPUS["H100"]
    assert h800.nvlink_bw == pytest.approx(200e9) and h800.nic_bw == pytest.approx(50e9)
    assert h800.nvlink_bw / h100.nvlink_bw == pytest.approx(400 / 900)
    for field in ("peak_flops", "peak_flops_fp32", "memory_bytes", "hbm_bw", "nic_bw"):
        assert getattr(h800, field) == getattr(h100, field), field


def test_ratios_between_models():
    h100, h200, a100, h20, b200 = (GPUS[n] for n in ("H100", "H200", "A100", "H20", "B200"))
    # H200: the H100's compute with more and faster memory.
    assert h200.peak_flops == h100.peak_flops and h200.nvlink_bw == h100.nvlink_bw
    assert h200.hbm_bw / h100.hbm_bw == pytest.approx(4.8 / 3.35, rel=REL)
    # Dense BF16 across generations: A100 ~1/3 of H100, H20 ~15 %, B200 ~2.3x.
    assert a100.peak_flops / h100.peak_flops == pytest.approx(312 / 989.5, rel=REL)
    assert h20.peak_flops / h100.peak_flops == pytest.approx(148 / 989.5, rel=REL)
    assert b200.peak_flops / h100.peak_flops == pytest.approx(2250 / 989.5, rel=REL)
    # H20: cut compute, but more and faster memory than the H100.
    assert h20.memory_bytes > h100.memory_bytes and h20.hbm_bw > h100.hbm_bw
    for name, hw in GPUS.items():
        # TF32 tensor cores run at half the BF16 rate on Ampere, Hopper and Blackwell.
        assert hw.peak_flops_fp32 / hw.peak_flops == pytest.approx(0.5, rel=REL), name
        # Inside a node is faster than across nodes; memory faster than both.
        assert hw.hbm_bw > hw.nvlink_bw > hw.nic_bw > 0, name
        assert hw.efficiency == GPU_EFFICIENCY, name  # one set of constants for every GPU
        assert 0 < hw.efficiency.framework <= 1, name
        assert hw.comm_cpu_share == 0 and hw.fp8_codec_rate == 0, name  # CPU-only fields


def test_unknown_gpu_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown --gpu 'V100'.*H800.*cpu"):
        hardware_profile("V100")


RATES = CpuRates(
    cores=4,
    gemm_fp32=100e9,
    gemm_bf16=200e9,
    memory_bw=20e9,
    fp8_codec_rate=1e8,
    memory_bytes=16 * GiB,
)


def test_this_machine_is_one_rank_per_core():
    cpu = cpu_profile(RATES, 1e9, 2e-4)
    assert cpu.name == "cpu" and cpu.gpus_per_node == 4
    assert cpu.peak_flops == 200e9 and cpu.peak_flops_fp32 == 100e9  # a core each
    assert cpu.hbm_bw == 5e9 and cpu.memory_bytes == 4 * GiB  # the machine's, shared
    assert cpu.nvlink_bw == cpu.nic_bw == 1e9
    assert cpu.efficiency.latency_s == cpu.efficiency.chunk_latency_s == 2e-4
    assert cpu.efficiency.framework == 1.0 and cpu.fp8_codec_rate == 0


def test_cpu_profile_reads_the_recorded_probes(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = cpu_probes_path()
    assert path == tmp_path / "megamoe" / "cpu_probes.json"
    with pytest.raises(ConfigError, match=r"bench/probes\.py"):  # none recorded: says how
        hardware_profile("cpu")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(cpu_probes_record(RATES, 1e9, 2e-4)))
    assert hardware_profile("CPU") == cpu_profile(RATES, 1e9, 2e-4)
    other = {**cpu_probes_record(RATES, 1e9, 2e-4), "machine": "another CPU, 64 cores"}
    path.write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="not of this"):
        hardware_profile("cpu")
    path.write_text("{")
    with pytest.raises(ConfigError, match="cannot read"):
        hardware_profile("cpu")


def test_fp32_on_a_gpu_runs_in_tf32_the_precision_its_peak_assumes():
    """MFU of an fp32 GPU run is measured against the TF32 peak, so its matmuls must run in
    TF32; a CPU run and a bf16 run leave the setting alone."""
    import torch

    from trainer.observe.mfu import gpu_peak_flops, use_tensor_cores

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        use_tensor_cores(torch.device("cpu"), "fp32")
        use_tensor_cores(torch.device("cuda"), "bf16")
        assert not torch.backends.cuda.matmul.allow_tf32
        use_tensor_cores(torch.device("cuda"), "fp32")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "fp32") == 494.5e12  # the TF32 peak
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
