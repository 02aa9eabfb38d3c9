"""The gRPC server: JobService, the standard health service and server reflection.

``create_server`` builds and starts a server around a job manager (the domain
object that owns the store and the executor) on a given port (0 = a free one)
and returns it with its port; ``megamoe serve`` wraps it with the embedded
etcd, the signal handling and the ``serving on HOST:PORT`` line.

The servicer only converts messages and delegates; every exception a call
raises is turned into a status in one place (``service.errors.status_of``), so a
client never sees a traceback. With a token file, JobService calls need
``authorization: Bearer <token>`` metadata (UNAUTHENTICATED otherwise); health
and reflection stay open, so probes and grpcurl's listing work without it.
"""

from __future__ import annotations

import functools
import hmac
import logging
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service._gen.megamoe.v1 import jobs_pb2 as pb
from service._gen.megamoe.v1 import jobs_pb2_grpc as pb_grpc
from service.errors import status_of

log = logging.getLogger("megamoe.server")
SERVICE = pb.DESCRIPTOR.services_by_name["JobService"].full_name
MAX_MESSAGE_BYTES = 1 << 20  # a spec is at most 64 KiB of TOML; nothing needs more
LOG_CHUNK_CHARS = 64 * 1024  # a log comes back in chunks well below the message limit


def _unary(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(self, request, context):
        start = time.perf_counter()
        try:
            result = method(self, request, context)
        except Exception as exc:  # every error becomes a status here, and only here
            code, message = _status(exc)
            self.observe(method.__name__, code.name, time.perf_counter() - start)
            context.abort(code, message)
        self.observe(method.__name__, "OK", time.perf_counter() - start)
        return result

    return wrapper


def _stream(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(self, request, context):
        start = time.perf_counter()
        try:
            yield from method(self, request, context)
        except GeneratorExit:  # the client went away
            self.observe(method.__name__, "CANCELLED", time.perf_counter() - start)
            raise
        except Exception as exc:
            code, message = _status(exc)
            self.observe(method.__name__, code.name, time.perf_counter() - start)
            context.abort(code, message)
        self.observe(method.__name__, "OK", time.perf_counter() - start)

    return wrapper


def _status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    code, message = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("internal error serving a call")
    return code, message


class JobServicer(pb_grpc.JobServiceServicer):
    """Converts messages and delegates to the job manager."""

    def __init__(self, manager, on_call: Callable[[str, str, float], None] | None = None) -> None:
        self.manager = manager
        self.on_call = on_call  # (method, status code name, seconds): the metrics

    def observe(self, method: str, code: str, seconds: float) -> None:
        if self.on_call is not None:
            self.on_call(method, code, seconds)

    @_unary
    def CreateJob(self, request, context):
        return self.manager.create(request.spec, request.job_id)

    @_unary
    def GetJob(self, request, context):
        return self.manager.get(request.job_id)

    @_unary
    def ListJobs(self, request, context):
        jobs, token = self.manager.list(request.page_size, request.page_token, request.state)
        return pb.ListJobsResponse(jobs=jobs, next_page_token=token)

    @_unary
    def CancelJob(self, request, context):
        return self.manager.cancel(request.job_id)

    @_stream
    def WatchJob(self, request, context) -> Iterator[pb.JobEvent]:
        yield from self.manager.watch(request.job_id, request.after_seq, context.add_callback)

    @_stream
    def GetJobLogs(self, request, context) -> Iterator[pb.LogChunk]:
        for text in self.manager.logs(
            request.job_id, request.node, request.tail_lines, request.follow, context.is_active
        ):
            for start in range(0, len(text), LOG_CHUNK_CHARS):
                yield pb.LogChunk(text=text[start : start + LOG_CHUNK_CHARS])


class _BearerAuth(grpc.ServerInterceptor):
    """UNAUTHENTICATED for JobService calls without the right bearer token."""

    def __init__(self, token: str, on_call: Callable[[str, str, float], None] | None) -> None:
        self.expected = f"Bearer {token}".encode()
        self.on_call = on_call

    def intercept_service(self, continuation, details):
        if not details.method.startswith(f"/{SERVICE}/"):
            return continuation(details)
        given = dict(details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(given.encode(), self.expected):
            return continuation(details)
        reason = "missing" if not given else "wrong"
        if self.on_call is not None:
            self.on_call(details.method.rsplit("/", 1)[-1], "UNAUTHENTICATED", 0.0)
        return _deny(f"{reason} bearer token: send 'authorization: Bearer <token>' metadata")


def _deny(message: str):
    def deny(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(deny)


@dataclass
class Running:
    server: grpc.Server
    port: int
    health: health.HealthServicer

    def stop(self, grace: float) -> None:
        """Health to NOT_SERVING (load balancers stop sending), then stop with a grace."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait(grace + 5)


def create_server(
    manager,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    tls: tuple[bytes, bytes] | None = None,
    workers: int = 64,
    on_call: Callable[[str, str, float], None] | None = None,
) -> Running:
    """Start JobService + health + reflection on host:port (0 = free); ``tls`` = (cert, key)."""
    interceptors = [_BearerAuth(token, on_call)] if token else []
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", 16 * MAX_MESSAGE_BYTES),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="megamoe-rpc"),
        interceptors=interceptors,
        options=options,
    )
    pb_grpc.add_JobServiceServicer_to_server(JobServicer(manager, on_call), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    address = f"{host}:{port}"
    if tls:
        bound = server.add_secure_port(address, grpc.ssl_server_credentials([(tls[1], tls[0])]))
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise OSError(f"cannot listen on {address}")
    server.start()
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Running(server, bound, health_servicer)
