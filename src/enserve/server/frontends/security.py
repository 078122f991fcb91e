"""Safe defaults at the edge: bearer-token auth (a separate token for admin calls) and TLS."""

from __future__ import annotations

import hmac
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from enserve.server.errors import Unauthenticated
from enserve.server.frontends.status import status_of

# gRPC methods (the last part of the path) that never need a token: liveness and readiness probes
OPEN_GRPC = {"ServerLive", "ServerReady"}
# calls that change server state or expose memory: the admin token when one is set
ADMIN_GRPC = {
    "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister", "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister", "RepositoryModelLoad", "RepositoryModelUnload", "LogSettings", "TraceSetting",
}
STREAMING_GRPC = {"ModelStreamInfer"}


NEEDS_TOKEN = "this call needs an 'authorization: Bearer <token>' header"
NOT_VALID = "the bearer token is not valid for this call"


@dataclass(frozen=True)
class Tokens:
    user: str | None = None
    admin: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.user or self.admin)

    def check(self, header: str | bytes | None, *, admin: bool) -> str | None:
        """None when the Authorization header is good enough for the call, else the reason. The
        scheme is case-insensitive (RFC 7235); a header that is not text is simply not a token."""
        need = (self.admin or self.user) if admin else self.user
        if not need:
            return None
        if isinstance(header, str):  # HTTP servers decode header bytes with surrogates for non-UTF-8
            header = header.encode("utf-8", "surrogatepass")
        scheme, _, token = (header or b"").partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return NEEDS_TOKEN + (" with the admin token" if admin and self.admin else "")
        if not hmac.compare_digest(token, need.encode()):
            return NOT_VALID + (" (it needs the admin token)" if admin and self.admin else "")
        return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    async def intercept_service(self, continuation, details):
        method = details.method.rsplit("/", 1)[-1]
        if method in OPEN_GRPC:
            return await continuation(details)
        header = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)  # the first
        reason = self.tokens.check(header, admin=method in ADMIN_GRPC)
        if reason is None:
            return await continuation(details)
        return _deny(reason, streaming=method in STREAMING_GRPC)


def _deny(reason: str, *, streaming: bool):
    code, _, message = status_of(Unauthenticated(reason))

    async def unary(request, context):
        await context.abort(code, message)

    async def stream(request_iterator, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    if streaming:
        return grpc.stream_stream_rpc_method_handler(stream)
    return grpc.unary_unary_rpc_method_handler(unary)


def is_admin_path(path: str) -> bool:
    return (
        (path.startswith("/v2/systemsharedmemory/") and path.endswith(("/register", "/unregister")))
        or path.startswith("/v2/cudasharedmemory/")
        or path.startswith("/v2/repository/models/")
    )


def is_open_path(path: str) -> bool:
    return path in ("/v2/health/live", "/v2/health/ready")


def read_pair(cert: Path | None, key: Path | None) -> tuple[bytes, bytes] | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    try:
        return Path(cert).read_bytes(), Path(key).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the TLS certificate or key: {exc}") from exc


def server_ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"cannot load the TLS certificate {cert} with key {key}: {exc}") from exc
    return context


def grpc_credentials(pair: tuple[bytes, bytes]) -> grpc.ServerCredentials:
    cert, key = pair
    return grpc.ssl_server_credentials([(key, cert)])
