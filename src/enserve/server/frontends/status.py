"""What an error means on the wire: one table from the daemon's errors to gRPC status codes and HTTP
statuses, and the adapter each front applies it with (a decorator for the gRPC servicer, a status
for the native front and the HTTP app)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import grpc

from enserve.server.errors import (
    AlreadyExists,
    DeadlineExceeded,
    EnserveError,
    Internal,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    RepositoryError,
    RequestTimeout,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger("enserve")

# the most specific class wins (a PayloadTooLarge is a ResourceExhausted with its own HTTP status)
STATUS: dict[type[EnserveError], tuple[grpc.StatusCode, int]] = {
    InvalidArgument: (grpc.StatusCode.INVALID_ARGUMENT, 400),
    NotFound: (grpc.StatusCode.NOT_FOUND, 404),
    Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, 401),
    AlreadyExists: (grpc.StatusCode.ALREADY_EXISTS, 409),
    Unavailable: (grpc.StatusCode.UNAVAILABLE, 503),
    ResourceExhausted: (grpc.StatusCode.RESOURCE_EXHAUSTED, 503),
    PayloadTooLarge: (grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    DeadlineExceeded: (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    RequestTimeout: (grpc.StatusCode.DEADLINE_EXCEEDED, 408),
    Internal: (grpc.StatusCode.INTERNAL, 500),
    RepositoryError: (grpc.StatusCode.FAILED_PRECONDITION, 400),
    EnserveError: (grpc.StatusCode.INTERNAL, 500),
}


def status_of(error: BaseException) -> tuple[grpc.StatusCode, int, str]:
    """(gRPC code, HTTP status, message) of any exception: ours by the table, anything else an
    internal error naming its type (and logged with its traceback: it is a bug of ours)."""
    if isinstance(error, EnserveError):
        for cls in type(error).__mro__:
            if cls in STATUS:
                code, http = STATUS[cls]
                return code, http, error.message
    log.error("internal error", exc_info=error)
    return grpc.StatusCode.INTERNAL, 500, f"internal error: {type(error).__name__}: {error}"


def grpc_errors(method: Callable) -> Callable:
    """Wrap a servicer method ``(request, context)``: an exception it raises ends the call with its
    status. A call whose caller is already gone (its deadline passed on both sides) is left alone."""

    @functools.wraps(method)
    async def wrapper(request, context):
        try:
            return await method(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - every error gets its status, none escapes as UNKNOWN
            code, _, message = status_of(exc)
        try:
            await context.abort(code, message)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the call ended meanwhile: nobody to tell
            log.debug("could not end a gRPC call with %s (%s): %s", code, message, exc)
        return None

    return wrapper
