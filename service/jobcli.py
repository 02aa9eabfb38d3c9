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
import time
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.errors import MegamoeError

if TYPE_CHECKING:
    from service._gen.megamoe.v1 import jobs_pb2 as pb

TIMEOUT_S = 30.0
WATCH_RECONNECT_S = 120.0  # how long watch keeps reconnecting to an unreachable server
STATES = ("pending", "running", "succeeded", "failed", "cancelled")
STRAGGLER = {"off": 1, "report": 2, "replace": 3}


def _api():
    """grpc and the stubs, imported when a job command runs (not by `megamoe train`)."""
    import grpc

    from service._gen.megamoe.v1 import jobs_pb2, jobs_pb2_grpc

    return grpc, jobs_pb2, jobs_pb2_grpc


class ApiError(MegamoeError):
    pass


def _stub(args):
    """(JobService stub, call metadata) for ``--server``, ``--token-file``, ``--ca-cert``."""
    grpc, _, pb_grpc = _api()
    metadata = []
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise MegamoeError(
                f"cannot read token file {args.token_file}: {exc.strerror}"
            ) from None
        metadata.append(("authorization", f"Bearer {token}"))
    if args.ca_cert:
        creds = grpc.ssl_channel_credentials(Path(args.ca_cert).read_bytes())
        channel = grpc.secure_channel(args.server, creds)
    else:
        channel = grpc.insecure_channel(args.server)
    return pb_grpc.JobServiceStub(channel), metadata


def _call(method, request, metadata, **kw):
    grpc, _, _ = _api()
    try:
        return method(request, metadata=metadata, timeout=kw.get("timeout", TIMEOUT_S))
    except grpc.RpcError as exc:
        raise ApiError(f"{exc.code().name}: {exc.details()}") from None


def _summary(job: pb.Job) -> dict:
    from google.protobuf import json_format

    _, pb, _ = _api()
    s = job.status
    return {
        "job_id": job.job_id,
        "state": pb.JobState.Name(s.state),
        "nodes": [
            json_format.MessageToDict(
                n, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
            )
            for n in s.nodes
        ],
        "step": s.step,
        "total_steps": s.total_steps,
        "final_loss": s.final_loss if s.state == pb.SUCCEEDED else None,
        "summary_path": s.summary_path or None,
        "message": s.message,
    }


def _print_job(job: pb.Job, as_json: bool) -> None:
    _, pb, _ = _api()
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
    if s.summary_path:
        line += f"\n  summary: {s.summary_path}"
    print(line)


def submit(args) -> int:
    _, pb, _ = _api()
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
        restart=pb.RestartPolicy(max_restarts=args.max_restarts, backoff_seconds=args.backoff),
        straggler=STRAGGLER[args.straggler],
        labels=dict(_label(item) for item in args.labels),
        image=args.image or "",
    )
    spec.kubernetes.CopyFrom(_kubernetes(pb, args))
    job = _call(stub.CreateJob, pb.CreateJobRequest(spec=spec, job_id=args.id or ""), md)
    _print_job(job, args.json)
    return 0


def _label(item: str, flag: str = "--label") -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise MegamoeError(f"{flag} {item!r} must look like key=value")
    return key, value


def _kubernetes(pb, args):
    """The pod settings of the submit flags (the server checks their syntax)."""
    settings = pb.KubernetesSettings(
        cpu=args.cpu or "",
        memory=args.memory or "",
        node_selector=dict(_label(item, "--node-selector") for item in args.node_selector),
        priority_class=args.priority_class or "",
        volume_claim=args.volume_claim or "",
    )
    if args.gpus is not None:
        settings.gpus = args.gpus
    for item in args.tolerations:
        settings.tolerations.append(_toleration(pb, item))
    return settings


def _toleration(pb, item: str):
    """KEY[=VALUE][:EFFECT] (KEY alone or KEY:EFFECT: operator Exists)."""
    body, _, effect = item.partition(":")
    key, sep, value = body.partition("=")
    if not key:
        raise MegamoeError(f"--toleration {item!r} must look like KEY[=VALUE][:EFFECT]")
    return pb.Toleration(key=key, operator="Equal" if sep else "Exists", value=value, effect=effect)


def get(args) -> int:
    _, pb, _ = _api()
    stub, md = _stub(args)
    _print_job(_call(stub.GetJob, pb.GetJobRequest(job_id=args.job_id), md), args.json)
    return 0


def list_jobs(args) -> int:
    _, pb, _ = _api()
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
    _, pb, _ = _api()
    stub, md = _stub(args)
    job = _call(stub.CancelJob, pb.CancelJobRequest(job_id=args.job_id), md)
    if job.status.state in (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED):
        print(f"{job.job_id}: already {pb.JobState.Name(job.status.state)}")
    else:
        print(f"{job.job_id}: cancel requested")
    return 0


def watch(args) -> int:
    """Events as lines, progress as one line that updates in place on a terminal.
    A dropped connection is resumed after the last event seen (no gap, no repeat)."""
    grpc, pb, _ = _api()
    stub, md = _stub(args)
    after, state, pending_line = args.after, pb.JOB_STATE_UNSPECIFIED, False
    tty = sys.stdout.isatty()
    lost_since = None
    while True:
        request = pb.WatchJobRequest(job_id=args.job_id, after_seq=after)
        try:
            for event in stub.WatchJob(request, metadata=md):
                lost_since = None
                after, state = event.seq, event.state
                if event.type == "progress" and tty:
                    print(f"\r  {event.message}\033[K", end="", flush=True)
                    pending_line = True
                    continue
                if pending_line:
                    print()
                    pending_line = False
                stamp = time.strftime("%H:%M:%S", time.localtime(event.time.seconds))
                print(f"[{event.seq:>3}] {stamp} {event.type}: {event.message}", flush=True)
            break
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise ApiError(f"{exc.code().name}: {exc.details()}") from None
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > WATCH_RECONNECT_S:
                raise ApiError(f"UNAVAILABLE: {exc.details()}") from None
            time.sleep(1.0)
    if pending_line:
        print()
    print(f"{args.job_id}: {pb.JobState.Name(state)}")
    return 0 if state == pb.SUCCEEDED else 1


def logs(args) -> int:
    grpc, pb, _ = _api()
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
    p.add_argument("--max-restarts", type=int, default=0, help="node restarts before FAILED")
    p.add_argument("--backoff", type=float, default=0.0, help="seconds before the first restart")
    p.add_argument("--straggler", choices=sorted(STRAGGLER), default="report")
    p.add_argument("--label", dest="labels", action="append", default=[], metavar="K=V")
    pods = p.add_argument_group("pods (Kubernetes executor; default: the server's)")
    pods.add_argument("--image", help="container image of the job's pods")
    pods.add_argument("--cpu", help="CPU of each pod (request = limit), e.g. 16 or 7500m")
    pods.add_argument("--memory", help="memory of each pod (request = limit), e.g. 200Gi")
    pods.add_argument(
        "--gpus", type=int, help="GPUs of each pod (default: --procs-per-node; 0 = none)"
    )
    pods.add_argument(
        "--node-selector", action="append", default=[], metavar="K=V", help="repeatable"
    )
    pods.add_argument(
        "--toleration",
        dest="tolerations",
        action="append",
        default=[],
        metavar="KEY[=VALUE][:EFFECT]",
        help="repeatable; KEY alone tolerates every value",
    )
    pods.add_argument("--priority-class", help="PriorityClass of the pods")
    pods.add_argument("--volume-claim", help="PVC for checkpoints and data")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=submit)
    p = common(actions.add_parser("get", help="one job's status"))
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=get)
    p = common(actions.add_parser("list", help="every job"))
    p.add_argument("--state", choices=STATES, help="only jobs in this state")
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
