"""How many request bytes the daemon takes: per message (by default from the repository's largest
request) and held by all requests in flight together (RESOURCE_EXHAUSTED beyond)."""

from __future__ import annotations

from dataclasses import dataclass

from enserve.server.config import ServeOptions
from enserve.server.errors import ResourceExhausted
from enserve.server.served.repository import Repository

GRPC_ROOM = 2  # typed contents: an int64 as a varint takes up to 10 bytes
JSON_ROOM = 8  # JSON text per tensor byte: a float32 as "-1.2345678e-05, " is 16 characters
SLACK = 1 << 20  # names, shapes, parameters, headers
MIB = 1 << 20


def largest_request_bytes(repo: Repository) -> int:
    """Tensor bytes of the largest request any model of ``repo`` accepts: max batch x input row."""
    models = [*repo.members.values(), *repo.ensembles.values()]
    return max((max(1, m.max_batch_size) * sum(t.row_bytes for t in m.inputs) for m in models), default=0)


@dataclass
class RequestLimits:
    grpc_bytes: int  # largest gRPC message
    http_bytes: int  # largest HTTP body
    inflight_bytes: int  # all requests being received, computed or answered, together
    held: int = 0

    @classmethod
    def for_repository(cls, repo: Repository, options: ServeOptions) -> RequestLimits:
        """``--max-request-bytes`` when given, else from the repository's largest request."""
        if options.max_request_bytes is not None:
            grpc_bytes = http_bytes = options.max_request_bytes
        else:
            largest = largest_request_bytes(repo)
            grpc_bytes, http_bytes = GRPC_ROOM * largest + SLACK, JSON_ROOM * largest + SLACK
        return cls(grpc_bytes, http_bytes, max(options.max_inflight_bytes, grpc_bytes, http_bytes))

    def reserve(self, nbytes: int) -> int:
        """Count ``nbytes`` as held until ``release``; RESOURCE_EXHAUSTED when they do not fit."""
        if self.held + nbytes > self.inflight_bytes:
            raise ResourceExhausted(
                f"requests in flight hold {self.held / MIB:.1f} MiB, and {nbytes / MIB:.1f} MiB more would pass "
                f"--max-inflight-bytes ({self.inflight_bytes / MIB:.1f} MiB); retry later")
        self.held += nbytes
        return nbytes

    def release(self, nbytes: int) -> None:
        self.held -= nbytes
