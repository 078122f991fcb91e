"""ModelInfer straight from pygrpc-native's low-level front; every other RPC behind it.

The front (HTTP/2 and gRPC in Rust, outside the GIL) hands calls to Python in batches, as raw
request bytes with an id, and is answered by id. ModelInfer is parsed here and submitted without
a coroutine per call: the request answers the call as it resolves (not a loop turn later). Every
other method (health, metadata, statistics, shared memory, ModelStreamInfer) goes to a grpc.aio
server with the full servicer and the auth interceptor on a Unix socket, which the front proxies to.

What it bounds before a message is read: with an auth token the front itself refuses a call that
does not carry one of the daemon's tokens, from its headers, before any byte of its body is read
(so on this transport the gRPC health probes need the token too; the HTTP probes stay open). What
it cannot bound: pygrpc-native 0.5 reads a whole message before Python sees it and has no size
limit of its own, so a message over ``--max-request-bytes`` from a caller it lets through is read
before it is refused. ``config.transport_for`` therefore picks this front only where the callers
are trusted; grpc-core refuses an oversized message from its length.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

from pygrpc_native import EVENT_CANCEL, NativeGrpcFront
from tritonclient.grpc import service_pb2 as pb

from enserve.server.errors import InvalidArgument, PayloadTooLarge, Unauthenticated
from enserve.server.frontends.codec import begin_infer, encode_response
from enserve.server.frontends.grpc_frontend import build_server
from enserve.server.frontends.security import NEEDS_TOKEN, NOT_VALID, Tokens
from enserve.server.frontends.status import status_of
from enserve.server.serving.service import Service

log = logging.getLogger("enserve")
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
UNAUTHENTICATED = f"{NEEDS_TOKEN}: none was given, or {NOT_VALID}"  # the front's own refusal
SOCKET_PREFIX = "enserve-grpc-"  # a temporary folder holding the fallback server's unix socket
STALE_AFTER_S = 60.0  # a younger folder may belong to a daemon still starting


def remove_dead_sockets(root: str | None = None, older_than_s: float = STALE_AFTER_S) -> list[str]:
    """Remove the socket folders of daemons that died without stopping (SIGKILL, an OOM kill):
    this user's, older than ``older_than_s``, whose socket is gone or refuses a connection; the
    folders removed. Called by every daemon as it starts."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{SOCKET_PREFIX}*"):
        try:
            if folder.stat().st_uid != os.geteuid() or time.time() - folder.stat().st_mtime < older_than_s:
                continue
            with socket.socket(socket.AF_UNIX) as probe:
                probe.settimeout(1.0)
                probe.connect(str(folder / "fallback.sock"))
            continue  # a live daemon's
        except (ConnectionRefusedError, FileNotFoundError):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
        except OSError:
            continue
    return removed


class NativeFront:
    """Looks like a grpc.aio server to the daemon: ``start`` and ``stop(grace)``."""

    def __init__(self, service: Service, address: str) -> None:
        options = service.options
        self.service = service
        tokens = self.tokens = Tokens(options.auth_token, options.admin_token)
        remove_dead_sockets()
        self.socket_dir = tempfile.mkdtemp(prefix=SOCKET_PREFIX)
        self.fallback = build_server(service, f"unix:{os.path.join(self.socket_dir, 'fallback.sock')}", None, tokens)
        # with a user token every call needs a token: the front checks it before reading the body
        # (the fallback's interceptor still tells the admin calls' token from the user's)
        digests = [hashlib.sha256(t.encode()).digest() for t in (tokens.user, tokens.admin) if t] \
            if tokens.user else None
        try:
            self.front = NativeGrpcFront(address, [(MODEL_INFER, False)], call_details=True,
                                         bearer_token_sha256=digests, unauthenticated_message=UNAUTHENTICATED)
        except OSError as exc:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            raise OSError(f"cannot listen for gRPC on {address}: {exc}") from exc
        self.loop: asyncio.AbstractEventLoop | None = None
        self.calls: dict[int, object] = {}  # call id -> its pending request, until answered
        self.held: dict[int, int] = {}  # call id -> the request bytes it holds (``RequestLimits``)
        self.idle: asyncio.Event | None = None  # set once stopping and no call is left
        self.thread: threading.Thread | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.fallback.start()
        self.front.set_fallback(os.path.join(self.socket_dir, "fallback.sock"))
        self.front.start()
        self.thread = threading.Thread(target=self._pump, name="enserve-grpc-front", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        """The front's calls, a batch at a time, onto the event loop."""
        while (events := self.front.recv_batch_details(256)) is not None:
            try:
                self.loop.call_soon_threadsafe(self._on_events, events)
            except RuntimeError:  # the loop is closed
                return

    def _on_events(self, events) -> None:
        for kind, call_id, _, payload, _, details in events:
            if kind == EVENT_CANCEL:
                pending = self._forget(call_id)
                if pending is not None:  # its workers skip what they have not begun; nobody is answered
                    pending.cancel()
                continue
            try:
                self._call(call_id, payload, details)
            except Exception as exc:  # noqa: BLE001 - every call is answered, with its status
                self._fail(call_id, exc)
        self.service.flush()  # this batch's descriptors go out now, not one loop turn later

    def _fail(self, call_id: int, error: BaseException) -> None:
        code, _, message = status_of(error)
        self.front.fail(call_id, code.value[0], message)

    def _call(self, call_id: int, payload: bytes, details) -> None:
        metadata, _, time_remaining = details
        if self.tokens.user:  # the front let it through with one of the tokens: the user's?
            reason = self.tokens.check(next((v for k, v in metadata if k == "authorization"), None), admin=False)
            if reason is not None:
                raise Unauthenticated(reason)
        limits = self.service.limits
        if len(payload) > limits.grpc_bytes:
            raise PayloadTooLarge(f"received message larger than max ({len(payload)} vs. {limits.grpc_bytes})")
        held = limits.reserve(len(payload))  # until answered or cancelled (``_forget``)
        try:
            message = pb.ModelInferRequest.FromString(payload)
        except Exception as exc:
            limits.release(held)
            raise InvalidArgument(f"malformed inference.ModelInferRequest protobuf: {exc}") from None
        try:
            pending = begin_infer(self.service, message, time_remaining)
        except BaseException:
            limits.release(held)
            raise
        self.calls[call_id] = pending
        self.held[call_id] = held
        pending.request.when_answered(lambda f: self._answer(call_id, message, pending, f))

    def _forget(self, call_id: int) -> object | None:
        pending = self.calls.pop(call_id, None)
        self.service.limits.release(self.held.pop(call_id, 0))
        if self.idle is not None and not self.calls:
            self.idle.set()
        return pending

    def _answer(self, call_id: int, message: pb.ModelInferRequest, pending, future: asyncio.Future) -> None:
        if self._forget(call_id) is None or future.cancelled():
            return  # the client went away
        try:
            error = future.exception()
            if error is None:
                self.front.respond(call_id, encode_response(message, pending.finish(future.result()),
                                                            pending.parameters())
                                   .SerializeToString())
                return
        except Exception as exc:  # noqa: BLE001 - encoding or writing a client's shared memory failed
            error = exc
        self._fail(call_id, error)

    async def stop(self, grace: float | None) -> None:
        """Let the calls in flight finish for ``grace`` seconds (new ones are refused once the
        server's lifecycle drains), then close."""
        self.idle = asyncio.Event()
        if self.calls and grace:
            try:
                await asyncio.wait_for(self.idle.wait(), grace)
            except TimeoutError:
                log.warning("%d gRPC calls still in flight after %g s", len(self.calls), grace)
        self.front.close()
        await self.fallback.stop(grace)
        if self.thread is not None:
            await asyncio.to_thread(self.thread.join, 5)
        shutil.rmtree(self.socket_dir, ignore_errors=True)
