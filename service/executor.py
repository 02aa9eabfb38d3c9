"""Executors run a job's nodes: the local one as torchrun agents on this machine.

The reconciler (``service.reconciler``) decides; an executor only does, through
the ``Executor`` protocol that the Kubernetes executor implements too:

- ``start_node(job_id, spec, node, generation)``: start node ``node`` of the
  job (one torchrun agent with ``procs_per_node`` workers); returns a handle
  (pid or pod) that the reconciler keeps in the job's status in etcd.
- ``poll(job_id, node, handle)``: running, exited (code or signal), or lost.
- ``stop_node(job_id, node, handle, grace)``: stop every process of the node:
  SIGTERM, ``grace`` seconds, then SIGKILL.
- ``adopt(job_id, node, handle)``: after a control-plane restart, take over a
  node that kept running; False when it is not there any more.
- ``logs(...)``: the node's output, tail or follow.
- ``failure_line(job_id, node)``: the line of the node's output that says why it failed.
- ``finish_job(job_id)``: the job ended; free what it holds besides its nodes.

The local executor gives each node its own process session (so the workers
outlive a control-plane crash), its output in ``<state>/jobs/<job>/node-<k>.log``,
and an exit file the node's shell writes when the agent ends, so a node started
by an earlier control plane still reports its exit code. Every process of a
job carries ``MEGAMOE_JOB_ID`` and ``MEGAMOE_NODE`` in its environment; stop
finds them by it, including workers torchrun put in sessions of their own.
Workers run in the server's working directory: relative paths in a spec
(``data.path``) resolve there. A job gets ``checkpoint.dir`` under its job
directory unless its spec sets one, and always starts with ``--resume``
(fresh when there is nothing to resume).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from service._gen.megamoe.v1 import jobs_pb2 as pb
from service.spec import sets_checkpoint_dir, validate_spec
from trainer.atomic import write_bytes_atomic
from trainer.elastic.report import (
    ENV_ETCD,
    ENV_GENERATION,
    ENV_JOB,
    ENV_PREFIX,
    ENV_RANKS_PER_HOST,
)
from trainer.elastic.server import process_alive
from trainer.errors import MegamoeError

ENV_NODE = "MEGAMOE_NODE"
JOIN_TIMEOUT_S = 600  # how long a node's agent waits for the others to join
FOLLOW_POLL_S = 0.25
FAILURE_SCAN_LINES = 400
MAX_LINE_CHARS = 500
OUR_ERROR = re.compile(r"megamoe: error: ")
EXCEPTION_LINE = re.compile(r"^(\[rank\d+\]: )?[\w.]*(Error|Exception|Interrupt)\b.*: \S")

# The node's shell: run the agent, write its exit code where a later control plane
# finds it. The TERM/INT/HUP trap (a handler, not "ignore": the agent must still get
# them) keeps the shell alive until the agent has stopped, so the code is written.
NODE_SHELL = (
    'exit_file=$1; shift; trap : TERM INT HUP; "$@"; code=$?; '
    'echo "$code" > "$exit_file.tmp" && mv "$exit_file.tmp" "$exit_file"; exit "$code"'
)


@dataclass(frozen=True)
class NodeHandle:
    pid: int = 0  # local executor: the node's shell, leader of its process group
    pod: str = ""  # Kubernetes executor


@dataclass(frozen=True)
class Observed:
    """What an executor sees of a node."""

    running: bool
    exit_code: int | None = None  # when it exited
    signal: int | None = None  # when a signal ended it
    lost: bool = False  # gone without a recorded exit
    reason: str = ""  # what the executor knows beyond the code ("evicted: ...", "OOMKilled")

    def describe(self) -> str:
        if self.running:
            return "running"
        if self.lost:
            text = "gone without an exit code"
        elif self.signal:
            text = f"killed by {_signal_name(self.signal)}"
        elif self.exit_code is None:
            text = "ended"
        else:
            text = f"exited with code {self.exit_code}"
        return f"{text} ({self.reason})" if self.reason else text


class Executor(Protocol):
    def start_node(
        self,
        job_id: str,
        spec: pb.JobSpec,
        node: int,
        generation: int,
        skip_checkpoints: Sequence[str] = (),
    ) -> NodeHandle: ...

    def poll(self, job_id: str, node: int, handle: NodeHandle) -> Observed: ...

    def stop_node(self, job_id: str, node: int, handle: NodeHandle, grace: float) -> None: ...

    def adopt(self, job_id: str, node: int, handle: NodeHandle) -> bool: ...

    def logs(
        self,
        job_id: str,
        node: int,
        tail_lines: int,
        follow: bool,
        active: Callable[[], bool],
    ) -> Iterator[str]: ...

    def failure_line(self, job_id: str, node: int) -> str: ...

    def finish_job(self, job_id: str) -> None: ...


def agent_args(spec: pb.JobSpec, rdzv_id: str, etcd_endpoint: str, prefix: str) -> list[str]:
    """torchrun's options for one node of the job (every executor runs the same agent)."""
    return [
        f"--nnodes={spec.num_nodes}",
        f"--nproc-per-node={spec.procs_per_node}",
        "--rdzv-backend=etcd-v3",
        f"--rdzv-endpoint={etcd_endpoint}",
        f"--rdzv-id={rdzv_id}",
        # keep-alives: an etcd outage under a minute must not make nodes count each other dead
        f"--rdzv-conf=join_timeout={JOIN_TIMEOUT_S},prefix={prefix},"
        "keep_alive_interval=5,keep_alive_max_attempt=12",
        "--max-restarts=0",  # restarts are the reconciler's, for the whole world
        "--no-python",
    ]


def train_args(
    config: str, sets: Sequence[str], summary: str, skip_checkpoints: Sequence[str]
) -> list[str]:
    """``megamoe train``'s arguments for a job's worker: always ``--resume``."""
    args = ["train", "--config", config]
    for item in sets:
        args += ["--set", item]
    args += ["--resume", "--summary-json", summary]
    for commit in skip_checkpoints:
        args += ["--skip-checkpoint", commit]
    return args


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def torchrun_binary() -> str:
    beside = Path(sys.executable).parent / "torchrun"
    if beside.exists():
        return str(beside)
    found = shutil.which("torchrun")
    if not found:
        raise MegamoeError("torchrun not found next to the Python interpreter or on PATH")
    return found


class LocalExecutor:
    """Nodes as torchrun agents on this machine (see the module doc)."""

    def __init__(self, state_dir: str | Path, etcd_endpoint: str, prefix: str) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.etcd_endpoint, self.prefix = etcd_endpoint, prefix
        self._children: dict[tuple[str, int], subprocess.Popen] = {}

    # ------------------------------------------------------------------ paths

    def job_dir(self, job_id: str) -> Path:
        return self.state_dir / "jobs" / job_id

    def log_path(self, job_id: str, node: int) -> Path:
        return self.job_dir(job_id) / f"node-{node}.log"

    def exit_path(self, job_id: str, node: int) -> Path:
        return self.job_dir(job_id) / f"node-{node}.exit"

    def summary_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "summary.json"

    # ------------------------------------------------------------------ start

    def command(
        self,
        job_id: str,
        spec: pb.JobSpec,
        node: int,
        generation: int,
        skip_checkpoints: Sequence[str] = (),
    ) -> list[str]:
        """The node's command line: its shell around one torchrun agent."""
        validate_spec(spec)
        job_dir = self.job_dir(job_id)
        config = job_dir / "config.toml"
        if not config.exists():
            write_bytes_atomic(config, spec.config_toml.encode())
        sets = list(spec.overrides)
        if not sets_checkpoint_dir(spec):
            sets.append(f"checkpoint.dir={job_dir / 'checkpoints'}")
        agent = [
            torchrun_binary(),
            *agent_args(spec, f"{job_id}-g{generation}", self.etcd_endpoint, self.prefix),
            "--local-addr=127.0.0.1",
        ]
        train = [sys.executable, "-m", "service.cli"]
        train += train_args(str(config), sets, str(self.summary_path(job_id)), skip_checkpoints)
        exit_file = str(self.exit_path(job_id, node))
        return ["/bin/sh", "-c", NODE_SHELL, "megamoe-node", exit_file, *agent, *train]

    def start_node(
        self,
        job_id: str,
        spec: pb.JobSpec,
        node: int,
        generation: int,
        skip_checkpoints: Sequence[str] = (),
    ) -> NodeHandle:
        self.job_dir(job_id).mkdir(parents=True, exist_ok=True)
        command = self.command(job_id, spec, node, generation, skip_checkpoints)
        self.exit_path(job_id, node).unlink(missing_ok=True)
        env = {
            **os.environ,
            ENV_JOB: job_id,
            ENV_NODE: str(node),
            ENV_GENERATION: str(generation),
            ENV_ETCD: self.etcd_endpoint,
            ENV_PREFIX: self.prefix,
            ENV_RANKS_PER_HOST: str(spec.num_nodes * spec.procs_per_node),
            "PYTHONUNBUFFERED": "1",
        }
        with open(self.log_path(job_id, node), "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(
                f"=== megamoe: node {node} of {job_id}, generation {generation}, "
                f"started {stamp} ===\n$ {shlex.join(command[5:])}\n".encode()
            )
            log.flush()
            child = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._children[(job_id, node)] = child
        return NodeHandle(pid=child.pid)

    # ------------------------------------------------------------------ observe

    def poll(self, job_id: str, node: int, handle: NodeHandle) -> Observed:
        child = self._children.get((job_id, node))
        if child is not None and child.pid == handle.pid:
            code = child.poll()
            if code is None:
                return Observed(running=True)
            del self._children[(job_id, node)]
            recorded = self._recorded_exit(job_id, node)
            if recorded is not None:
                return recorded
            return Observed(False, signal=-code) if code < 0 else Observed(False, exit_code=code)
        recorded = self._recorded_exit(job_id, node)
        if recorded is not None:
            return recorded
        if self._is_ours(job_id, node, handle.pid):
            return Observed(running=True)
        return Observed(running=False, lost=True)

    def _recorded_exit(self, job_id: str, node: int) -> Observed | None:
        try:
            code = int(self.exit_path(job_id, node).read_text().strip())
        except (OSError, ValueError):
            return None
        if code > 128:  # the shell's way of saying "the agent died of signal code - 128"
            return Observed(False, exit_code=code, signal=code - 128)
        return Observed(False, exit_code=code)

    def _is_ours(self, job_id: str, node: int, pid: int) -> bool:
        """Whether ``pid`` is still this node's shell (not a reused pid, not a zombie)."""
        if pid <= 0:
            return False
        if not process_alive(pid):
            return False
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return str(self.exit_path(job_id, node)).encode() in f.read().split(b"\0")
        except OSError:
            return False

    def adopt(self, job_id: str, node: int, handle: NodeHandle) -> bool:
        return self.poll(job_id, node, handle).running

    # ------------------------------------------------------------------ stop

    def processes(self, job_id: str, node: int | None = None) -> list[int]:
        return job_processes(job_id, node)

    def stop_node(self, job_id: str, node: int, handle: NodeHandle, grace: float) -> None:
        """SIGTERM the node's agent and every process of the node (workers whose agent
        died live on as orphans), then SIGKILL whatever is left after ``grace`` seconds."""
        if handle.pid > 0 and self._is_ours(job_id, node, handle.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(handle.pid, signal.SIGTERM)
        for pid in self.processes(job_id, node):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self._reap(job_id, node)
            if not self.processes(job_id, node):
                break
            time.sleep(0.1)
        for pid in self.processes(job_id, node):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self._reap(job_id, node, wait=True)

    def _reap(self, job_id: str, node: int, wait: bool = False) -> None:
        child = self._children.get((job_id, node))
        if child is not None:
            if wait:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=5)
            else:
                child.poll()

    # ------------------------------------------------------------------ logs

    def logs(
        self, job_id: str, node: int, tail_lines: int, follow: bool, active: Callable[[], bool]
    ) -> Iterator[str]:
        """The node's log (its last ``tail_lines`` lines, 0 = all), then, with ``follow``,
        new output until ``active()`` turns False (the node ended or the client left)."""
        path = self.log_path(job_id, node)
        offset = 0
        if path.exists():
            text, offset = _tail(path, tail_lines)
            if text:
                yield text
        while follow:
            still = active()
            if path.exists():
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
                if data:
                    offset += len(data)
                    yield data.decode(errors="replace")
                    continue
            if not still:
                return
            time.sleep(FOLLOW_POLL_S)

    def finish_job(self, job_id: str) -> None:
        """Nothing to free: a job's files stay for its logs and summary."""

    def failure_line(self, job_id: str, node: int) -> str:
        path = self.log_path(job_id, node)
        if not path.exists():
            return ""
        text, _ = _tail(path, FAILURE_SCAN_LINES)
        return failure_line(text.splitlines())


def job_processes(job_id: str, node: int | None = None, kind: str | None = None) -> list[int]:
    """Pids on this machine whose environment says they belong to the job (and node):
    every ``kind``, or only the node shells ("node"), torchrun agents ("agent") or
    workers ("worker"). Fault drills and tests pick their victims with it too."""
    want = {f"{ENV_JOB}={job_id}".encode()}
    if node is not None:
        want.add(f"{ENV_NODE}={node}".encode())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = set(f.read().split(b"\0"))
            if not want <= env:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if kind is None or _kind(argv) == kind:
            found.append(int(entry))
    return found


def _kind(argv: list[str]) -> str:
    if argv[:2] == ["/bin/sh", "-c"]:
        return "node"
    if len(argv) > 1 and argv[1].endswith("torchrun"):
        return "agent"
    if argv[1:3] == ["-m", "service.cli"]:
        return "worker"
    return "other"


def failure_line(lines: list[str]) -> str:
    """The line of a node's log that best says why it failed: megamoe's own error line,
    else the last exception line of a rank, else the last line with words in it."""
    for pattern in (OUR_ERROR, EXCEPTION_LINE):
        for line in reversed(lines):
            if pattern.search(line):
                return line.strip()[:MAX_LINE_CHARS]
    for line in reversed(lines):
        if any(c.isalnum() for c in line):
            return line.strip()[:MAX_LINE_CHARS]
    return ""


def _tail(path: Path, lines: int, block: int = 64 * 1024) -> tuple[str, int]:
    """(the last ``lines`` lines of the file or all of it for 0, the file's size)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if lines <= 0:
            f.seek(0)
            return f.read(size).decode(errors="replace"), size
        start, data = size, b""
        while start > 0 and data.count(b"\n") <= lines:
            start = max(0, start - block)
            f.seek(start)
            data = f.read(size - start)
        kept = data.rstrip(b"\n").split(b"\n")[-lines:]
        return (b"\n".join(kept) + b"\n").decode(errors="replace") if kept != [b""] else "", size
