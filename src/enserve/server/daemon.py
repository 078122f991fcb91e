"""The daemon's lifecycle: load, start workers, serve gRPC + HTTP + metrics, drain on a signal."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from aiohttp import web

from enserve.server.config import ServeOptions
from enserve.server.dataplane.shm import clean_leftovers
from enserve.server.errors import EnserveError, message_of
from enserve.server.frontends.grpc_frontend import build_server
from enserve.server.frontends.http_frontend import HttpFrontend, metrics_app
from enserve.server.frontends.security import Tokens, read_pair, server_ssl_context
from enserve.server.lifecycle import Lifecycle
from enserve.server.served import placement as placements
from enserve.server.served.placement import Placement
from enserve.server.served.repository import Repository, load_repository
from enserve.server.serving.registry import Registry
from enserve.server.serving.service import Service

log = logging.getLogger("enserve")
FRONT_CLOSE_S = 2.0  # what closing the fronts may take once every request in flight is answered


async def _site(app: web.Application, host: str, port: int, what: str, ssl_context=None) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=FRONT_CLOSE_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True, ssl_context=ssl_context).start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(f"cannot listen for {what} on {host}:{port}: {exc.strerror or exc}") from exc
    return runner


def choose_placement(repo: Repository, options: ServeOptions, lifecycle: Lifecycle | None = None) -> Placement:
    """Placement of one unit (``placement.resolve``), running the allocator when no plan fits."""
    from enserve.server.allocate import allocate

    def make_plan(devices, ensemble: str):
        log.info("no plan for this ensemble and hardware yet: running the allocator (at most %d "
                 "allocations or %g s; --no-optimize skips it)", options.combi_limit, options.optimize_time_s)
        return allocate(repo, devices, options, ensemble=ensemble,
                        progress=lambda msg: log.info("allocator: %s", msg),
                        stopped=None if lifecycle is None else lambda: lifecycle.draining).plan

    return placements.resolve(repo, options, make_plan, log)


def make_grpc_server(service: Service, address: str):
    """The gRPC server on ``address`` with the transport the options pick (``config.transport_for``)."""
    options = service.options
    if options.transport == "native":
        from enserve.server.frontends.native_front import (
            NativeFront,  # pygrpc-native: imported only when served
        )

        return NativeFront(service, address)
    return build_server(service, address, read_pair(options.tls_cert, options.tls_key),
                        Tokens(options.auth_token, options.admin_token))


async def serve(options: ServeOptions) -> None:
    # signals first: a SIGTERM at any moment of start-up (the allocator included) stops cleanly
    lifecycle = Lifecycle()  # the server's one "shutting down" state: a signal drains it
    woken = asyncio.Event()  # wakes this coroutine on a signal (the state is the lifecycle's)
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        lifecycle.drain()  # new requests are refused from this moment; an allocator thread sees it too
        woken.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    registry = Registry(options, lambda repo: choose_placement(repo, options, lifecycle), lifecycle)
    runners: list[web.AppRunner] = []
    grpc_server = None
    poller = None
    deadline: float | None = None  # of the whole stop, once signalled
    try:
        starting = asyncio.ensure_future(registry.start(options.load_model))
        signalled = asyncio.ensure_future(woken.wait())
        await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if lifecycle.draining:
            log.info("stopping during start-up")
            starting.cancel()  # an allocator thread ends at its next measurement, cleaning up after itself
            await asyncio.gather(starting, return_exceptions=True)
            return
        signalled.cancel()
        starting.result()  # start-up errors go to run()
        service = Service(registry, options)
        grpc_address = f"{options.host}:{options.grpc_port}"
        try:
            grpc_server = make_grpc_server(service, grpc_address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen for gRPC on {grpc_address}: {exc}") from exc
        await grpc_server.start()
        tls = server_ssl_context(options.tls_cert, options.tls_key) if options.tls_cert else None
        runners.append(await _site(HttpFrontend(service).app(), options.host, options.http_port, "HTTP", tls))
        runners.append(await _site(metrics_app(registry, Tokens(options.auth_token, options.admin_token),
                                               lambda: service.limits.held),
                                   options.host, options.metrics_port, "metrics", tls))
        if options.model_control_mode == "poll":
            poller = asyncio.create_task(registry.poll_forever(options.repository_poll_secs))
        models = ", ".join(sorted(registry.models))
        log.info("serving models [%s] (model control: %s): HTTP %s:%d, gRPC %s (%s transport), metrics %s:%d "
                 "(workers %s)", models, options.model_control_mode, options.host, options.http_port, grpc_address,
                 options.transport, options.host, options.metrics_port, registry.worker_pids())
        await woken.wait()
        deadline = loop.time() + options.shutdown_timeout_s
        log.info("stopping: draining %d requests in flight (at most %g s in all)",
                 sum(len(o.pending) for o in registry.orchestrators()), options.shutdown_timeout_s)
    finally:
        if poller is not None:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
        # the requests in flight first: they get the drain budget, then the workers stop and what is
        # left is answered UNAVAILABLE; so the fronts, closed after, have nothing left to wait for
        # and every caller gets a status, never a closed connection
        await registry.close(None if deadline is None else max(1.0, deadline - loop.time() - FRONT_CLOSE_S))
        if grpc_server is not None:
            await grpc_server.stop(grace=None if deadline is None else max(0.0, min(FRONT_CLOSE_S, deadline - loop.time())))
        await asyncio.gather(*(runner.cleanup() for runner in runners), return_exceptions=True)
        if grpc_server is not None:
            service.regions.close()
        log.info("stopped")


def run(options: ServeOptions) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s enserve %(levelname)s %(message)s", stream=sys.stderr)
    try:
        read_pair(options.tls_cert, options.tls_key)  # both or neither, readable: fail before any work
        removed = clean_leftovers(log.warning)
        if removed:
            log.info("removed shared memory left by a crashed daemon: %s", removed)
        load_repository(options.model_repository)  # a broken repository fails here, before any port opens
        asyncio.run(serve(options))
    except (EnserveError, OSError, ValueError) as exc:
        log.error("%s", message_of(exc))
        return 1
    return 0
