"""Hardware profiles: datasheet numbers for GPUs, measured numbers for this machine."""

import pytest

from trainer.observe.mfu import GPU_PEAKS_TFLOPS
from trainer.plan import GPUS
from trainer.plan.hardware import GiB, hardware_profile, probe_loopback


def test_h800_is_the_papers_machine():
    h800 = hardware_profile("h800")  # names are case-insensitive
    assert h800.peak_flops == 989e12
    assert h800.nvlink_bw == 200e9  # 400 GB/s bidirectional, one direction per collective
    assert h800.nic_bw == 50e9  # the paper's 50 GB/s NIC
    assert h800.gpus_per_node == 8 and h800.memory_bytes == 80 * GiB


def test_every_gpu_uses_the_mfu_peak_table():
    for name, hw in GPUS.items():
        assert hw.peak_flops == GPU_PEAKS_TFLOPS[name][0] * 1e12
        assert hw.hbm_bw > 1e12 and hw.nvlink_bw > hw.nic_bw > 0
        assert 0 < hw.efficiency.framework <= 1


@pytest.mark.timeout(60)
def test_loopback_probe_measures_a_bandwidth_and_a_latency():
    bandwidth, latency = probe_loopback(megabytes=4, repeats=2)
    assert bandwidth > 1e7  # well above 10 MB/s on any machine
    assert 0 < latency < 1.0


@pytest.mark.timeout(120)
def test_this_machine_profile_is_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # probe afresh, cache in tmp
    cpu = hardware_profile("cpu")
    assert cpu.name == "cpu" and cpu.gpus_per_node >= 1
    assert cpu.peak_flops_fp32 > 1e8 and cpu.nvlink_bw > 0 and cpu.hbm_bw > 0
    assert cpu.efficiency.latency_s > 0 and cpu.efficiency.framework == 1.0
    assert (tmp_path / "megamoe" / "cpu_peak.json").exists()
