"""The local executor's pieces that need no torchrun: the node command, log tails and
following, exit files (what a restarted control plane reads), and stopping by marker."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from service._gen.megamoe.v1 import jobs_pb2 as pb
from service.executor import LocalExecutor, NodeHandle, _tail

TINY = (Path(__file__).resolve().parents[2] / "configs" / "tiny.toml").read_text()


def _spec(*overrides):
    return pb.JobSpec(
        config_toml=TINY, overrides=["parallel.n=2", *overrides], num_nodes=2, procs_per_node=1
    )


def test_a_node_runs_torchrun_with_the_etcd_rendezvous_and_a_job_checkpoint_dir(tmp_path):
    ex = LocalExecutor(tmp_path, "127.0.0.1:2379", "/megamoe")
    command = ex.command("j1", _spec(), node=1, generation=3)
    text = " ".join(command)
    assert "--rdzv-backend=etcd-v3" in text and "--rdzv-endpoint=127.0.0.1:2379" in text
    assert "--rdzv-id=j1-g3" in text and "--nnodes=2" in text and "--nproc-per-node=1" in text
    assert f"--set checkpoint.dir={tmp_path.resolve()}/jobs/j1/checkpoints" in text
    assert "--resume" in command and str(ex.exit_path("j1", 1)) in command
    assert (tmp_path / "jobs/j1/config.toml").read_text() == TINY
    mine = ex.command("j2", _spec("checkpoint.dir=/mine"), node=0, generation=0)
    assert "checkpoint.dir=/mine" in mine and not any("jobs/j2/checkpoints" in a for a in mine)


def test_tail_gives_the_last_lines_and_the_size(tmp_path):
    path = tmp_path / "log"
    path.write_text("".join(f"line {i}\n" for i in range(100_000)))
    text, size = _tail(path, 3)
    assert text == "line 99997\nline 99998\nline 99999\n" and size == path.stat().st_size
    assert _tail(path, 0)[0] == path.read_text()
    (tmp_path / "short").write_text("only\n")
    assert _tail(tmp_path / "short", 10)[0] == "only\n"


def test_follow_yields_new_output_until_the_node_ends(tmp_path):
    ex = LocalExecutor(tmp_path, "127.0.0.1:2379", "/megamoe")
    path = ex.log_path("j", 0)
    path.parent.mkdir(parents=True)
    path.write_text("first\n")
    running = threading.Event()
    running.set()

    def writer():
        for i in range(3):
            time.sleep(0.1)
            with open(path, "a") as f:
                f.write(f"more {i}\n")
        running.clear()

    threading.Thread(target=writer).start()
    got = "".join(ex.logs("j", 0, 0, True, running.is_set))
    assert got == "first\nmore 0\nmore 1\nmore 2\n"


def test_a_node_started_by_another_process_reports_its_exit_code_from_the_exit_file(tmp_path):
    """What a restarted control plane sees: not its child, but the shell wrote the code."""
    ex = LocalExecutor(tmp_path, "127.0.0.1:2379", "/megamoe")
    ex.job_dir("j").mkdir(parents=True)
    exit_file = str(ex.exit_path("j", 0))
    from service.executor import NODE_SHELL

    shell = ["/bin/sh", "-c", NODE_SHELL, "megamoe-node", exit_file]
    proc = subprocess.Popen([*shell, sys.executable, "-c", "import sys; sys.exit(7)"])
    proc.wait()
    other = LocalExecutor(tmp_path, "127.0.0.1:2379", "/megamoe")  # no child of its own
    seen = other.poll("j", 0, NodeHandle(pid=proc.pid))
    assert (seen.running, seen.exit_code) == (False, 7)
    killed = subprocess.Popen([*shell, "sh", "-c", "kill -9 $$"])
    killed.wait()
    seen = other.poll("j", 0, NodeHandle(pid=killed.pid))
    assert (seen.signal, seen.describe()) == (9, "killed by SIGKILL")


def test_stop_ends_every_marked_process_even_one_that_ignores_sigterm(tmp_path):
    ex = LocalExecutor(tmp_path, "127.0.0.1:2379", "/megamoe")
    env = {**os.environ, "MEGAMOE_JOB_ID": "stubborn", "MEGAMOE_NODE": "0"}
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    try:
        time.sleep(0.3)  # let it install its handler
        assert ex.processes("stubborn", 0) == [proc.pid]
        ex.stop_node("stubborn", 0, NodeHandle(pid=proc.pid), grace=0.5)
        assert proc.wait(timeout=10) == -9
        assert ex.processes("stubborn") == []
    finally:
        proc.kill()
        proc.wait()
