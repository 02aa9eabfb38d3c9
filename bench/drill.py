"""Fault drill: N faults injected at random moments into live jobs; what came back, how fast.

    python bench/drill.py [--faults 12] [--seed 1] [--json bench/results/drill.json]

Starts a private etcd and `megamoe serve` on it, runs the uninterrupted reference
once (`megamoe train --nproc 2`), then one job after another (configs/tiny.toml as
2 nodes x 1 process, 60 steps, a checkpoint every 5, up to 3 restarts) and into each,
at a random step between 8 and 40, one fault (the kinds take turns, in a random
order):

- worker: SIGKILL one training process of a random node;
- agent: SIGKILL a random node's torchrun agent (its worker is orphaned);
- control-plane: SIGKILL `megamoe serve`, start it again on the same etcd and state;
- etcd: stop etcd (SIGTERM), start it again on the same data 2-5 s later.

Per kind it reports: injected, recovered (the job SUCCEEDED), time to recover (fault
to the first trained step after it: the `resumed` event for a restart, else the first
status that moved past the step at the fault), steps lost (the `resumed` events' sum),
and whether every final result equals the uninterrupted run (losses from the resumed
step on, final loss, bit for bit). Exits 1 if any job did not recover or differed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc

from service._gen.megamoe.v1 import jobs_pb2 as pb
from service._gen.megamoe.v1 import jobs_pb2_grpc as pb_grpc
from service.executor import job_processes
from trainer.atomic import write_json_atomic
from trainer.elastic.server import start_etcd

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("worker", "agent", "control-plane", "etcd")
STEPS = 60
SETS = ["parallel.n=2", f"train.steps={STEPS}", "train.global_batch=32"]
JOB_SETS = [*SETS, "checkpoint.interval=5"]
JOB_TIMEOUT_S = 300.0


class Server:
    """`megamoe serve` on a given etcd and state directory, restartable."""

    def __init__(self, etcd: str, state: Path) -> None:
        self.etcd, self.state = etcd, state
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def start(self) -> None:
        log = self.state.parent / "serve.log"
        cmd = [sys.executable, "-m", "service.cli", "serve", "--port", "0"]
        cmd += ["--state-dir", str(self.state), "--etcd", self.etcd]
        start = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with open(log, "rb") as f:
                f.seek(start)
                m = re.search(rb"serving on (\S+:\d+)", f.read())
            if m:
                self.address = m.group(1).decode()
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise SystemExit(f"megamoe serve did not start; see {log}")

    def stub(self) -> pb_grpc.JobServiceStub:
        return pb_grpc.JobServiceStub(grpc.insecure_channel(self.address))

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)


def _retrying(call, *args, timeout: float = 120.0):
    """A call that may meet an unreachable server or etcd for a while (the drill's doing)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call(*args, timeout=30)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _status(server: Server, job_id: str) -> pb.JobStatus:
    return _retrying(server.stub().GetJob, pb.GetJobRequest(job_id=job_id)).status


def _reference(demo: str, out: Path) -> dict:
    sets = [*SETS, f"data.path={demo}"]
    cmd = [sys.executable, "-m", "service.cli", "train", "--config", "configs/tiny.toml"]
    cmd += [x for s in sets for x in ("--set", s)]
    cmd += ["--nproc", "2", "--summary-json", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return json.loads(out.read_text())


def _inject(kind: str, rng: random.Random, job_id: str, server: Server, etcd) -> dict:
    """Do the fault; returns what happened (and the etcd process, which may be new)."""
    node = rng.randrange(2)
    if kind in ("worker", "agent"):
        victims = job_processes(job_id, node, kind)
        if not victims:
            return {"skipped": f"no {kind} of node {node} running"}
        os.kill(victims[0], signal.SIGKILL)
        return {"node": node, "pid": victims[0]}
    if kind == "control-plane":
        server.kill()
        server.start()
        return {}
    etcd.stop()
    down = rng.uniform(2.0, 5.0)
    time.sleep(down)
    return {"down_s": down, "etcd": start_etcd(etcd.log_path.parent)}


def _drill_one(i, kind, rng, server, etcd, demo, reference) -> tuple[dict, object]:
    job_id = f"drill-{i}-{kind}"
    spec = pb.JobSpec(
        config_toml=(ROOT / "configs/tiny.toml").read_text(),
        overrides=[*JOB_SETS, f"data.path={demo}"],
        num_nodes=2,
        procs_per_node=1,
        restart=pb.RestartPolicy(max_restarts=3, backoff_seconds=0.5),
    )
    _retrying(server.stub().CreateJob, pb.CreateJobRequest(spec=spec, job_id=job_id))
    at = rng.randint(8, 40)
    while _status(server, job_id).step < at:
        time.sleep(0.05)
    step_at_fault = _status(server, job_id).step
    fault_time = time.time()
    done = _inject(kind, rng, job_id, server, etcd)
    etcd = done.pop("etcd", etcd)
    moved = None  # the first time the job's status moved past the fault's step
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        s = _status(server, job_id)
        if moved is None and s.step > step_at_fault and not s.HasField("recovery"):
            moved = time.time()
        if s.state in (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED):
            break
        if time.monotonic() > deadline:  # a job that does not come back is a failed drill
            _retrying(server.stub().CancelJob, pb.CancelJobRequest(job_id=job_id))
        time.sleep(0.05)
    events = list(_retrying(server.stub().WatchJob, pb.WatchJobRequest(job_id=job_id)))
    resumed = [e for e in events if e.type == "resumed"]
    if resumed:  # a restart: recovered when the new world trained its first step
        recovered_at = resumed[-1].time.ToNanoseconds() / 1e9
    else:
        recovered_at = moved or time.time()
    equal = False
    if s.state == pb.SUCCEEDED:
        summary = json.loads(Path(s.summary_path).read_text())
        start = summary["resumed_from"]["step"] if summary["resumed_from"] else 0
        equal = (
            summary["losses"] == reference["losses"][start:]
            and summary["final_loss"] == reference["final_loss"]
        )
    row = {
        "job_id": job_id,
        "kind": kind,
        "at_step": step_at_fault,
        "state": pb.JobState.Name(s.state),
        "recovered": s.state == pb.SUCCEEDED,
        "recovery_s": recovered_at - fault_time,
        "steps_lost": sum(int(e.details["steps_lost"]) for e in resumed),
        "restarts": s.restarts,
        "equal_to_uninterrupted": equal,
        "events_contiguous": [e.seq for e in events] == list(range(1, len(events) + 1)),
        **{k: v for k, v in done.items() if k != "pid"},
    }
    return row, etcd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", type=int, default=12)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data", default=str(ROOT / "data/demo"), help="a prepared corpus")
    p.add_argument("--json", default="bench/results/drill.json")
    a = p.parse_args()
    if not (Path(a.data) / "manifest.json").exists():
        raise SystemExit(f"no prepared corpus at {a.data}: run `make demo` (or data prepare)")
    rng = random.Random(a.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        etcd = start_etcd(Path(tmp) / "etcd")
        server = Server(etcd.endpoint, Path(tmp) / "state")
        try:
            print("reference: the uninterrupted run ...", flush=True)
            reference = _reference(a.data, Path(tmp) / "reference.json")
            server.start()
            kinds = [KINDS[i % len(KINDS)] for i in range(a.faults)]  # each kind as often
            rng.shuffle(kinds)
            for i, kind in enumerate(kinds):
                row, etcd = _drill_one(i, kind, rng, server, etcd, a.data, reference)
                rows.append(row)
                print(
                    f"  fault {i + 1}/{a.faults}: {kind:<13} at step {row['at_step']:>2}: "
                    f"{row['state']}, recovered in {row['recovery_s']:.1f} s, "
                    f"{row['steps_lost']} steps lost, equal: {row['equal_to_uninterrupted']}",
                    flush=True,
                )
        finally:
            server.stop()
            etcd.stop()
            for row in rows:
                for pid in job_processes(row["job_id"]):
                    os.kill(pid, signal.SIGKILL)
    summary = {}
    for kind in KINDS:
        mine = [r for r in rows if r["kind"] == kind]
        times = [r["recovery_s"] for r in mine if r["recovered"]]
        summary[kind] = {
            "injected": len(mine),
            "recovered": sum(r["recovered"] for r in mine),
            "recovery_p50_s": statistics.median(times) if times else None,
            "recovery_max_s": max(times) if times else None,
            "steps_lost": sum(r["steps_lost"] for r in mine),
            "steps_lost_max": max((r["steps_lost"] for r in mine), default=0),
            "all_equal": all(r["equal_to_uninterrupted"] for r in mine),
        }
    out = {"faults": a.faults, "seed": a.seed, "steps": STEPS, "kinds": summary, "runs": rows}
    write_json_atomic(a.json, out)
    print(f"{'kind':<14}{'injected':>9}{'recovered':>10}{'p50 s':>8}{'max s':>8}{'lost':>6}  equal")
    for kind, r in summary.items():
        p50 = f"{r['recovery_p50_s']:.1f}" if r["recovery_p50_s"] is not None else "-"
        mx = f"{r['recovery_max_s']:.1f}" if r["recovery_max_s"] is not None else "-"
        print(
            f"{kind:<14}{r['injected']:>9}{r['recovered']:>10}{p50:>8}{mx:>8}"
            f"{r['steps_lost']:>6}  {r['all_equal']}"
        )
    bad = [r for r in rows if not (r["recovered"] and r["equal_to_uninterrupted"])]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
