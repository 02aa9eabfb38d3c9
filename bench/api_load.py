"""The job API under load: N concurrent clients x M mixed calls against a live server.

    python bench/api_load.py [--clients 50] [--calls 100] [--json bench/results/api_load.json]

Starts a private etcd and `megamoe serve --executor none` on it (the API alone:
the thousand jobs the clients create are stored, listed and cancelled, not
run), seeds 20 jobs with a finished history of 8 events each (written through
the store, as a reconciler would), then runs the clients at once, each on its
own channel, each call drawn from a fixed mix: CreateJob 20 %, GetJob 40 %,
ListJobs 20 % (pages of 20), CancelJob 10 %, WatchJob 10 % (a seeded job's
whole history, to its terminal event). Reports per method the calls, errors,
p50 and p99 latency; exits 1 on any error.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc

from service._gen.megamoe.v1 import jobs_pb2 as pb
from service._gen.megamoe.v1 import jobs_pb2_grpc as pb_grpc
from service.store import JobStore
from trainer.atomic import write_json_atomic
from trainer.elastic.etcd import Etcd, start_etcd
from trainer.elastic.keys import Keys

ROOT = Path(__file__).resolve().parents[1]
MIX = [("CreateJob", 20), ("GetJob", 40), ("ListJobs", 20), ("CancelJob", 10), ("WatchJob", 10)]
SEED_JOBS = 20
SEED_EVENTS = 8
TIMEOUT_S = 30.0


def _serve(state: Path, etcd: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", "0", "--state-dir", str(state)]
    cmd += ["--etcd", etcd, "--executor", "none"]
    log = state.parent / "serve.log"
    with open(log, "wb") as out:  # a file, not a pipe nobody drains
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        m = re.search(r"serving on (\S+:\d+)", log.read_text())
        if m:
            return proc, m.group(1)
        time.sleep(0.1)
    raise SystemExit(f"megamoe serve did not start:\n{log.read_text()[-3000:]}")


def _spec(config: str) -> pb.JobSpec:
    return pb.JobSpec(config_toml=config, num_nodes=2, procs_per_node=1, overrides=["parallel.n=2"])


def _client(address, config, calls, seed, ids, results, lock) -> None:
    rng = random.Random(seed)
    stub = pb_grpc.JobServiceStub(grpc.insecure_channel(address))
    names, weights = zip(*MIX, strict=True)
    for i in range(calls):
        method = rng.choices(names, weights)[0]
        job = rng.choice(ids)
        start = time.perf_counter()
        try:
            if method == "CreateJob":
                req = pb.CreateJobRequest(spec=_spec(config), job_id=f"load-{seed}-{i}")
                stub.CreateJob(req, timeout=TIMEOUT_S)
            elif method == "GetJob":
                stub.GetJob(pb.GetJobRequest(job_id=job), timeout=TIMEOUT_S)
            elif method == "ListJobs":
                stub.ListJobs(pb.ListJobsRequest(page_size=20), timeout=TIMEOUT_S)
            elif method == "CancelJob":
                stub.CancelJob(pb.CancelJobRequest(job_id=job), timeout=TIMEOUT_S)
            else:
                events = list(stub.WatchJob(pb.WatchJobRequest(job_id=job), timeout=TIMEOUT_S))
                assert len(events) == SEED_EVENTS, f"{len(events)} events"
            error = None
        except grpc.RpcError as exc:
            error = f"{exc.code().name}: {exc.details()}"
        except AssertionError as exc:
            error = f"wrong answer: {exc}"
        seconds = time.perf_counter() - start
        with lock:
            results.append((method, seconds, error))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--calls", type=int, default=100, help="calls per client")
    p.add_argument("--json", default="bench/results/api_load.json")
    a = p.parse_args()
    config = (ROOT / "configs" / "tiny.toml").read_text()
    with tempfile.TemporaryDirectory() as tmp, start_etcd(Path(tmp) / "etcd") as etcd:
        proc, address = _serve(Path(tmp) / "state", etcd.endpoint)
        try:
            stub = pb_grpc.JobServiceStub(grpc.insecure_channel(address))
            ids = [f"seed-{k}" for k in range(SEED_JOBS)]
            store = JobStore(Etcd(etcd.endpoint), Keys())
            for job_id in ids:
                stub.CreateJob(pb.CreateJobRequest(spec=_spec(config), job_id=job_id))
                for k in range(SEED_EVENTS):
                    state = pb.SUCCEEDED if k == SEED_EVENTS - 1 else pb.RUNNING
                    event = pb.JobEvent(type="progress", message=f"seeded {k}", state=state)
                    store.append_event(job_id, event)
            results, lock = [], threading.Lock()
            threads = [
                threading.Thread(
                    target=_client, args=(address, config, a.calls, c, ids, results, lock)
                )
                for c in range(a.clients)
            ]
            wall = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - wall
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            served = (Path(tmp) / "serve.log").read_text()
            if "Traceback" in served:
                print(served[-5000:], file=sys.stderr)
    rows = {}
    for method, _ in MIX:
        times = sorted(s for m, s, _ in results if m == method)
        errors = [e for m, _, e in results if m == method and e]
        rows[method] = {
            "calls": len(times),
            "errors": len(errors),
            "first_error": errors[0] if errors else None,
            "p50_ms": 1e3 * statistics.median(times) if times else None,
            "p99_ms": 1e3 * times[min(len(times) - 1, int(0.99 * len(times)))] if times else None,
        }
    total_errors = sum(r["errors"] for r in rows.values())
    out = {
        "clients": a.clients,
        "calls_per_client": a.calls,
        "wall_s": wall,
        "calls_per_s": len(results) / wall,
        "errors": total_errors,
        "methods": rows,
    }
    write_json_atomic(a.json, out)
    print(
        f"{len(results)} calls from {a.clients} clients in {wall:.1f} s "
        f"({out['calls_per_s']:.0f} calls/s), {total_errors} errors"
    )
    for method, r in rows.items():
        print(
            f"  {method:<11} {r['calls']:>5} calls  p50 {r['p50_ms']:7.1f} ms  "
            f"p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}"
        )
    sys.exit(1 if total_errors else 0)


if __name__ == "__main__":
    main()
