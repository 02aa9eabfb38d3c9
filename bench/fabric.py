"""An emulated cluster fabric on one machine: network namespaces, veth links, bridges, tc.

This machine's loopback moves gigabytes per second with microsecond latency, so
communication barely shows in CPU benchmarks. The fabric gives every rank its
own network stack (a network namespace) and connects them like a cluster:

    rank ns  --veth (intra rate)--  [bridge of emulated node 0]  --veth (inter rate)--
    rank ns  --veth (intra rate)--  [bridge of emulated node 1]  ...

All bridges live in one extra "switch" namespace; nodes' bridges are chained
by veth pairs whose rate stands for the NIC; each rank's own link stands for
NVLink. Rates are token-bucket (``tc tbf``) limits on both directions of each
link; latency is added with ``tc netem`` where the kernel has it (this one's
may not: the fabric then says so and runs without added latency). Ranks run
gloo over real TCP on addresses that exist only inside these namespaces
(10.99.0.0/16). Everything is torn down on exit, also on errors and signals.

Needs root and iproute2 (``ip``, ``tc``). As a library::

    with Fabric(nodes=1, ranks_per_node=4, intra_mbit=2000, inter_mbit=400) as fab:
        results = fab.run("bench.ablation:worker", world=4, kwargs={...})

Standalone, ``python bench/fabric.py --check`` builds a 2 x 2 fabric, measures
the bandwidth between ranks of one node and of two nodes, and tears it down.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "mmfab"
SUBNET = "10.99"


class FabricError(RuntimeError):
    pass


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(args, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise FabricError(f"{' '.join(args)}: {res.stderr.strip() or res.stdout.strip()}")
    return res


def _netem_available() -> bool:
    probe = f"{PREFIX}probe"
    _sh("ip", "netns", "add", probe)
    try:
        res = _sh(*f"tc -n {probe} qdisc add dev lo root netem delay 1us".split(), check=False)
        return res.returncode == 0
    finally:
        _sh("ip", "netns", "del", probe, check=False)


def unavailable() -> str | None:
    """Why the fabric cannot be built here (None if it can): checked before a run starts."""
    if os.geteuid() != 0:
        return "the fabric needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the fabric needs `{tool}` (Debian package iproute2)"
    return None


class Fabric:
    def __init__(
        self,
        nodes: int,
        ranks_per_node: int,
        intra_mbit: float,
        inter_mbit: float,
        latency_us: float = 0.0,
    ) -> None:
        problem = unavailable()
        if problem:
            raise FabricError(problem)
        self.nodes, self.per_node = nodes, ranks_per_node
        self.intra, self.inter, self.latency = intra_mbit, inter_mbit, latency_us
        self.switch = f"{PREFIX}sw"
        self.rank_ns = [f"{PREFIX}r{r}" for r in range(nodes * ranks_per_node)]
        self.netem = False

    # ------------------------------------------------------------ build / tear down
    def __enter__(self) -> Fabric:
        self.teardown()  # leftovers of a killed run
        atexit.register(self.teardown)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            self._build()
        except Exception:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def _on_signal(self, signum, frame) -> None:
        self.teardown()
        raise SystemExit(128 + signum)

    def teardown(self) -> None:
        listed = _sh("ip", "netns", "list", check=False).stdout.split()
        for ns in listed:
            if ns.startswith(PREFIX):
                _sh("ip", "netns", "del", ns, check=False)

    def _shape(self, ns: str, dev: str, mbit: float) -> None:
        burst = max(32, int(mbit * 1e6 / 8 / 250 / 1024))  # ~4 ms of traffic, in KiB
        qdisc = f"tc -n {ns} qdisc add dev {dev}"
        tbf = f"tbf rate {mbit}mbit burst {burst}kb latency 50ms"
        if self.netem and self.latency > 0:
            _sh(*f"{qdisc} root handle 1: netem delay {self.latency}us".split())
            _sh(*f"{qdisc} parent 1: handle 2: {tbf}".split())
        else:
            _sh(*f"{qdisc} root {tbf}".split())

    def _link(self, ns_a: str, dev_a: str, ns_b: str, dev_b: str, mbit: float) -> None:
        _sh(*f"ip link add {dev_a} netns {ns_a} type veth peer name {dev_b} netns {ns_b}".split())
        for ns, dev in ((ns_a, dev_a), (ns_b, dev_b)):
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            self._shape(ns, dev, mbit)

    def _build(self) -> None:
        if self.latency > 0:
            self.netem = _netem_available()
            if not self.netem:
                print(
                    "fabric: tc netem is not available in this kernel: no added latency",
                    file=sys.stderr,
                )
        _sh("ip", "netns", "add", self.switch)
        _sh("ip", "-n", self.switch, "link", "set", "lo", "up")
        for node in range(self.nodes):
            br = f"br{node}"
            _sh("ip", "-n", self.switch, "link", "add", br, "type", "bridge")
            _sh("ip", "-n", self.switch, "link", "set", br, "up")
            if node > 0:  # chain node bridges through the "NIC" link
                self._link(self.switch, f"up{node}", self.switch, f"dn{node}", self.inter)
                _sh("ip", "-n", self.switch, "link", "set", f"up{node}", "master", f"br{node - 1}")
                _sh("ip", "-n", self.switch, "link", "set", f"dn{node}", "master", br)
        for rank, ns in enumerate(self.rank_ns):
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            self._link(ns, "eth0", self.switch, f"p{rank}", self.intra)
            _sh(*f"ip -n {self.switch} link set p{rank} master br{rank // self.per_node}".split())
            _sh("ip", "-n", ns, "addr", "add", f"{self.address(rank)}/16", "dev", "eth0")

    def address(self, rank: int) -> str:
        return f"{SUBNET}.{rank // 250}.{rank % 250 + 1}"

    # ------------------------------------------------------------------- run ranks
    def run(self, target: str, world: int, kwargs: dict, timeout: float = 600.0) -> list:
        """Run ``module:function(rank, world, **kwargs)`` on ``world`` ranks; results by rank."""
        import torch

        port = 29500 + os.getpid() % 1000
        with tempfile.TemporaryDirectory() as out:
            procs = []
            for rank in range(world):
                cmd = ["ip", "netns", "exec", self.rank_ns[rank], sys.executable, __file__]
                cmd += ["--rank-entry", target, "--rank", str(rank), "--world", str(world)]
                cmd += ["--master", f"{self.address(0)}:{port}", "--out", out]
                cmd += ["--kwargs", json.dumps(kwargs)]
                env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "PYTHONPATH": str(ROOT)}
                procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
            deadline = time.monotonic() + timeout
            errors = []
            for rank, p in enumerate(procs):
                try:
                    p.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    for q in procs:
                        q.kill()
                    raise FabricError(
                        f"rank {rank} did not finish within {timeout:.0f} s"
                    ) from None
                if p.returncode != 0:
                    errors.append(f"rank {rank}: {p.stderr.read().strip().splitlines()[-1:]}")
            if errors:
                raise FabricError("; ".join(errors))
            return [torch.load(Path(out) / f"rank{r}.pt") for r in range(world)]


def _rank_entry(a) -> None:
    import importlib

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    module, fn = a.rank_entry.split(":")
    func = getattr(importlib.import_module(module), fn)
    dist.init_process_group(
        "gloo", init_method=f"tcp://{a.master}", rank=a.rank, world_size=a.world
    )
    try:
        result = func(a.rank, a.world, **json.loads(a.kwargs))
        torch.save(result, Path(a.out) / f"rank{a.rank}.pt")
    finally:
        dist.destroy_process_group()


def bandwidth_probe(rank: int, world: int, peer: int, mbytes: int = 8) -> float | None:
    """Rank 0 sends ``mbytes`` MB to ``peer``; returns MB/s measured on rank 0."""
    import torch
    import torch.distributed as dist

    buf = torch.zeros(mbytes * 2**20 // 4)
    dist.barrier()
    start = time.perf_counter()
    if rank == 0:
        dist.send(buf, peer)
        dist.recv(buf[:1], peer)
    elif rank == peer:
        dist.recv(buf, 0)
        dist.send(buf[:1], 0)
    elapsed = time.perf_counter() - start
    dist.barrier()
    return mbytes / elapsed if rank == 0 else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="build 2 x 2, measure, tear down")
    p.add_argument("--intra-mbit", type=float, default=2000)
    p.add_argument("--inter-mbit", type=float, default=400)
    p.add_argument("--latency-us", type=float, default=0)
    p.add_argument("--rank-entry", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, help=argparse.SUPPRESS)
    p.add_argument("--master", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rank_entry:
        _rank_entry(a)
        return
    if not a.check:
        p.error("use --check (or import Fabric from this module)")
    if problem := unavailable():
        p.exit(2, f"fabric.py: error: {problem}\n")
    with Fabric(2, 2, a.intra_mbit, a.inter_mbit, a.latency_us) as fab:
        same = fab.run("bench.fabric:bandwidth_probe", 4, {"peer": 1})[0]
        cross = fab.run("bench.fabric:bandwidth_probe", 4, {"peer": 2})[0]
    rates = {"intra_mbit": a.intra_mbit, "inter_mbit": a.inter_mbit}
    print(json.dumps({"intra_node_MBps": same, "inter_node_MBps": cross, **rates}))


if __name__ == "__main__":
    main()
