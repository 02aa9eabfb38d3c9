"""``megamoe job submit|get|list|cancel|watch|logs``: the job API from a terminal.

Human output by default; ``--json`` prints one JSON object (``job_id`` and
``state`` at the top level; ``get`` adds ``nodes``, ``step``, ``final_loss`` and
``summary_path``). ``watch`` prints each event and a live progress line, and
exits 0 when the job SUCCEEDED, 1 otherwise. A gRPC error prints one line
``megamoe: error: CODE: message`` (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format

from service._gen.megamoe.v1 import jobs_pb2 as pb
from service._gen.megamoe.v1 import jobs_pb2_grpc as pb_grpc
from trainer.errors import MegamoeError

TIMEOUT_S = 30.0


class ApiError(MegamoeError):
    pass


def _stub(args) -> tuple[pb_grpc.JobServiceStub, list[tuple[str, str]]]:
    metadata = []
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
        metadata.append(("authorization", f"Bearer {token}"))
    if args.ca_cert:
        creds = grpc.ssl_channel_credentials(Path(args.ca_cert).read_bytes())
        channel = grpc.secure_channel(args.server, creds)
    else:
        channel = grpc.insecure_channel(args.server)
    return pb_grpc.JobServiceStub(channel), metadata


def _call(method, request, metadata, **kw):
    try:
        return method(request, metadata=metadata, timeout=kw.get("timeout", TIMEOUT_S))
    except grpc.RpcError as exc:
        raise ApiError(f"{exc.code().name}: {exc.details()}") from None


def _summary(job: pb.Job) -> dict:
    s = job.status
    return {
        "job_id": job.job_id,
        "state": pb.JobState.Name(s.state),
        "nodes": [json_format.MessageToDict(n) for n in s.nodes],
        "step": s.step,
        "total_steps": s.total_steps,
        "final_loss": s.final_loss if s.state == pb.SUCCEEDED else None,
        "summary_path": s.summary_path or None,
        "message": s.message,
    }


def _print_job(job: pb.Job, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_summary(job), indent=1))
        return
    s = job.status
    line = f"{job.job_id}: {pb.JobState.Name(s.state)}  step {s.step}/{s.total_steps}"
    line += f"  nodes {job.spec.num_nodes} x {job.spec.procs_per_node}"
    if s.step:
        line += f"  loss {s.last_loss:.4f}"
    if s.message:
        line += f"  ({s.message})"
    print(line)


def submit(args) -> int:
    stub, md = _stub(args)
    try:
        config = Path(args.config).read_text()
    except OSError as exc:
        raise MegamoeError(f"cannot read config file {args.config}: {exc.strerror}") from None
    spec = pb.JobSpec(
        config_toml=config,
        overrides=args.overrides,
        num_nodes=args.nodes,
        procs_per_node=args.procs_per_node,
        restart=pb.RestartPolicy(max_restarts=args.max_restarts),
    )
    job = _call(stub.CreateJob, pb.CreateJobRequest(spec=spec, job_id=args.id or ""), md)
    _print_job(job, args.json)
    return 0


def get(args) -> int:
    stub, md = _stub(args)
    _print_job(_call(stub.GetJob, pb.GetJobRequest(job_id=args.job_id), md), args.json)
    return 0


def list_jobs(args) -> int:
    stub, md = _stub(args)
    state = pb.JobState.Value(args.state.upper()) if args.state else 0
    token, jobs = "", []
    while True:
        request = pb.ListJobsRequest(page_size=100, page_token=token, state=state)
        page = _call(stub.ListJobs, request, md)
        jobs += page.jobs
        token = page.next_page_token
        if not token:
            break
    if args.json:
        print(json.dumps([_summary(j) for j in jobs], indent=1))
    for job in [] if args.json else jobs:
        _print_job(job, False)
    return 0


def cancel(args) -> int:
    stub, md = _stub(args)
    job = _call(stub.CancelJob, pb.CancelJobRequest(job_id=args.job_id), md)
    if job.status.state in (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED):
        print(f"{job.job_id}: already {pb.JobState.Name(job.status.state)}")
    else:
        print(f"{job.job_id}: cancel requested")
    return 0


def watch(args) -> int:
    stub, md = _stub(args)
    request = pb.WatchJobRequest(job_id=args.job_id, after_seq=args.after)
    state = pb.JOB_STATE_UNSPECIFIED
    try:
        for event in stub.WatchJob(request, metadata=md):
            state = event.state
            if event.type == "progress":
                d = event.details
                line = f"\r  step {d.get('step')}/{d.get('total_steps')}  loss {d.get('loss')}"
                line += f"  {d.get('tokens_per_s')} tok/s  MFU {d.get('mfu')}  ETA {d.get('eta')}"
                print(line, end="   ", flush=True)
                continue
            print(f"\n[{event.seq}] {event.type}: {event.message}", flush=True)
    except grpc.RpcError as exc:
        raise ApiError(f"{exc.code().name}: {exc.details()}") from None
    print(f"{args.job_id}: {pb.JobState.Name(state)}")
    return 0 if state == pb.SUCCEEDED else 1


def logs(args) -> int:
    stub, md = _stub(args)
    request = pb.GetJobLogsRequest(
        job_id=args.job_id, node=args.node, tail_lines=args.tail, follow=args.follow
    )
    try:
        for chunk in stub.GetJobLogs(request, metadata=md):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    except grpc.RpcError as exc:
        raise ApiError(f"{exc.code().name}: {exc.details()}") from None
    return 0


def add_parser(sub) -> None:
    job = sub.add_parser("job", help="submit and follow jobs on a megamoe server")
    actions = job.add_subparsers(dest="action", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of megamoe serve")
        p.add_argument("--token-file", help="bearer token (when the server wants one)")
        p.add_argument("--ca-cert", help="CA certificate, for a server with TLS")
        return p

    p = common(actions.add_parser("submit", help="create a job from a config"))
    p.add_argument("--config", required=True)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--procs-per-node", type=int, default=1)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    p.add_argument("--id", help="choose the job id (same id + same spec returns the job)")
    p.add_argument("--max-restarts", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=submit)
    p = common(actions.add_parser("get", help="one job's status"))
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=get)
    p = common(actions.add_parser("list", help="every job"))
    p.add_argument("--state", help="only jobs in this state (pending, running, ...)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=list_jobs)
    p = common(actions.add_parser("cancel", help="stop a job"))
    p.add_argument("job_id")
    p.set_defaults(func=cancel)
    p = common(actions.add_parser("watch", help="events and progress until the job ends"))
    p.add_argument("job_id")
    p.add_argument("--after", type=int, default=0, help="only events after this sequence number")
    p.set_defaults(func=watch)
    p = common(actions.add_parser("logs", help="a node's log"))
    p.add_argument("job_id")
    p.add_argument("--node", type=int, default=0)
    p.add_argument("--tail", type=int, default=0, help="last N lines (0 = all)")
    p.add_argument("--follow", action="store_true")
    p.set_defaults(func=logs)
