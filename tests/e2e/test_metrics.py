"""Every rank of a running `megamoe train` serves Prometheus metrics of its own, at
observe.metrics_port + local rank, with the contract's names and labels."""

import random
import re
import socket
import sys
import urllib.request

import pytest

from tests.procs import kill_group, start, wait_until


def _two_free_ports() -> int:
    """Two consecutive free ports below the kernel's ephemeral range (32768-60999), so
    the job's own rendezvous port, which the OS picks from that range, cannot take one
    of them between this check and the exporters' bind (it did once, in CI)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise AssertionError("no two consecutive free ports")


def _scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            return answer.read().decode()
    except OSError:
        return ""


def _value(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.timeout(240)
def test_each_rank_exports_its_step_comm_and_expert_metrics(demo_data, tmp_path):
    port = _two_free_ports()
    sets = [
        "parallel.n=2",
        "train.steps=400",
        f"data.path={demo_data}",
        f"observe.metrics_port={port}",
        "checkpoint.interval=2",
        f"checkpoint.dir={tmp_path / 'ckpt'}",
    ]
    command = [sys.executable, "-m", "service.cli", "train", "--config", "configs/tiny.toml"]
    command += [x for s in sets for x in ("--set", s)] + ["--nproc", "2"]
    proc = start(command, tmp_path / "train.log")
    try:

        def three_steps() -> bool:
            if proc.poll() is not None:  # the job ended: fail now, with its log
                raise AssertionError((tmp_path / "train.log").read_text()[-2000:])
            return all(
                (_value(_scrape(p), "megamoe_steps_total") or 0) >= 3 for p in (port, port + 1)
            )

        wait_until(three_steps, 180, "three steps on both exporters")
        texts = [_scrape(port), _scrape(port + 1)]
    finally:
        kill_group(proc)
    log = (tmp_path / "train.log").read_text()
    assert f"metrics: rank 0 on http://127.0.0.1:{port}/metrics" in log
    for rank, text in enumerate(texts):
        ident = {"job_id": "", "rank": rank, "node": 0}
        assert _value(text, "megamoe_tokens_total", **ident) >= 3 * 16 * 128
        assert 0 < _value(text, "megamoe_mfu_ratio", **ident) < 1
        assert _value(text, "megamoe_tokens_per_second", **ident) > 0
        assert _value(text, "megamoe_step_seconds_count", **ident) >= 3
        assert _value(text, "megamoe_loss", **ident) > 0
        # the EP dispatch and the attention all-to-all, by operator
        ops = set(re.findall(r'megamoe_comm_bytes_total\{[^}]*op="([^"]+)"', text))
        assert {"ep_dispatch", "attn_qkv"} <= ops, ops
        assert _value(text, "megamoe_comm_exposed_seconds_total", op="ep_dispatch") > 0
        experts = re.findall(r'megamoe_expert_tokens_total\{[^}]*expert="(\d+)"[^}]*\} (\S+)', text)
        assert len(experts) == 8
        # every step routes 16 x 128 tokens x top-2 x 2 layers, on both ranks alike
        steps = _value(text, "megamoe_steps_total", **ident)
        assert sum(float(v) for _, v in experts) == pytest.approx(steps * 8192, rel=0.5)
        assert _value(text, "megamoe_restarts_total", **ident) == 0
    # rank 0 saved checkpoints every 2 steps: their blocked and write times
    assert "megamoe_checkpoint_seconds_count" in texts[0]
