"""Errors that carry their protocol status; converted to gRPC/HTTP in one place each."""

from __future__ import annotations

import grpc


class EnserveError(Exception):
    """Base error: a message for the caller plus its gRPC status code and HTTP status."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(EnserveError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class NotFound(EnserveError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class Unauthenticated(EnserveError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class AlreadyExists(EnserveError):
    grpc_code = grpc.StatusCode.ALREADY_EXISTS
    http_status = 409


class Unavailable(EnserveError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class ResourceExhausted(EnserveError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 503


class PayloadTooLarge(EnserveError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 413


class DeadlineExceeded(EnserveError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class Internal(EnserveError):
    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500


class RepositoryError(EnserveError):
    """A model repository that cannot be read or written as asked (start-up / import time)."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 400
