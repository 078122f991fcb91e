"""The daemon's errors. They carry a message for the caller and know nothing of a transport: one
table (``status``) turns each into its gRPC code and HTTP status, applied in one place per front."""

from __future__ import annotations


def message_of(error: BaseException) -> str:
    """What to tell a person about ``error``: ours carry their message; others say their type."""
    return getattr(error, "message", None) or f"{type(error).__name__}: {error}"


class EnserveError(Exception):
    """Base error: a message for the caller; what it means on the wire is ``status``'s business."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(EnserveError):
    """The request is malformed or does not fit the model."""


class NotFound(EnserveError):
    """An unknown model, version or shared-memory region."""


class Unauthenticated(EnserveError):
    """No valid token for the call."""


class AlreadyExists(EnserveError):
    """A shared-memory region registered twice."""


class Unavailable(EnserveError):
    """The server or a model cannot take the request now (stopping, a member down)."""


class ResourceExhausted(EnserveError):
    """Full: too many requests, rows or bytes in flight; retry later."""


class PayloadTooLarge(ResourceExhausted):
    """One message larger than the limit on any message."""


class DeadlineExceeded(EnserveError):
    """The request's deadline passed before its answer."""


class RequestTimeout(EnserveError):
    """A request's body did not arrive in time (a slow or stalled upload)."""


class Internal(EnserveError):
    """A fault of the server's own (a member that failed on a request)."""


class RepositoryError(EnserveError):
    """A model repository that cannot be read or written as asked (start-up / import time)."""
