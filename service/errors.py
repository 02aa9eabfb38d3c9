"""The control plane's domain errors, and the one place they become gRPC status codes.

The job manager raises these; the servicer never builds a status itself. An
error a client can cause names what is wrong; anything unexpected becomes
INTERNAL with a one-line message (the traceback goes to the server's log, never
to the client).
"""

from __future__ import annotations

import grpc

from trainer.errors import ConfigError, MegamoeError


class ServiceError(MegamoeError):
    """Base of the errors the API reports with a specific status code."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    """A request field is invalid: the message starts with the field's name."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(ServiceError):
    """A dependency (etcd) cannot be reached; the client may retry."""

    code = grpc.StatusCode.UNAVAILABLE


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(status code, one-line message) for an exception raised while serving a call."""
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, ConfigError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"spec.config_toml: {exc}"
    if type(exc).__name__ == "EtcdUnavailable":
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, MegamoeError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"
