"""KServe v2 / Triton gRPC frontend: the servicer generated in tritonclient, over grpc.aio; with the
native transport (``native_front``) this server sits behind pygrpc-native's front on a Unix socket
and serves every RPC but ModelInfer."""

from __future__ import annotations

import asyncio
import logging

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from enserve.server.dataplane.stats import ModelStats
from enserve.server.errors import InvalidArgument
from enserve.server.frontends.codec import begin_infer, encode_response
from enserve.server.frontends.security import AuthInterceptor, Tokens, grpc_credentials
from enserve.server.frontends.status import grpc_errors, status_of
from enserve.server.serving.service import Service, cuda_shm_unavailable

log = logging.getLogger("enserve")
MAX_MESSAGE = 2**31 - 1  # as tritonclient
STREAM_INFLIGHT = 64  # requests of one ModelStreamInfer stream in flight or waiting to be sent


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(
        error_message=message, infer_response=pb.ModelInferResponse(id=request.id, model_name=request.model_name))


def _duration(d) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def stats_message(s: ModelStats) -> pb.ModelStatistics:
    d = s.durations
    return pb.ModelStatistics(
        name=s.name,
        version=s.version,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(d["success"]), fail=_duration(d["fail"]), queue=_duration(d["queue"]),
            compute_input=_duration(d["compute_input"]), compute_infer=_duration(d["compute_infer"]),
            compute_output=_duration(d["compute_output"]),
        ),
    )


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Every RPC of the protocol; an error raised in any unary one ends the call with its status
    (``add_servicer`` wraps each in ``status.grpc_errors``; the stream answers errors in-band)."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def _infer(self, request: pb.ModelInferRequest, deadline_s: float | None) -> pb.ModelInferResponse:
        limits = self.service.limits
        held = limits.reserve(request.ByteSize())  # until the answer is encoded
        try:
            pending = begin_infer(self.service, request, deadline_s)
            values = await pending.outputs()
            return encode_response(request, values, pending.parameters())
        finally:
            limits.release(held)

    async def ModelInfer(self, request, context):
        return await self._infer(request, context.time_remaining())

    async def ModelStreamInfer(self, request_iterator, context):
        """Requests of one stream run concurrently, at most ``STREAM_INFLIGHT`` of them in flight or
        waiting to be sent (the reader stops pulling beyond that, so HTTP/2 flow control holds the
        client back); every request gets a response, an error one if anything fails; the stream
        always ends, whatever ends its reading."""
        slots = asyncio.Semaphore(STREAM_INFLIGHT)  # held from read until its response is sent
        queue: asyncio.Queue = asyncio.Queue()  # never above STREAM_INFLIGHT + 1: the slots bound it
        tasks: set[asyncio.Task] = set()
        end = object()

        async def one(request) -> None:
            try:
                response = pb.ModelStreamInferResponse(infer_response=await self._infer(request, None))
            except Exception as e:  # noqa: BLE001 - the caller gets it, the stream goes on
                response = _stream_error(request, status_of(e)[2])
            queue.put_nowait(response)

        async def read_all() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.ensure_future(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
            except Exception as e:  # noqa: BLE001 - a broken stream still ends
                log.warning("stream ended while reading: %s: %s", type(e).__name__, e)
            finally:
                queue.put_nowait(end)

        reader = asyncio.ensure_future(read_all())
        try:
            while (item := await queue.get()) is not end:
                yield item
                slots.release()
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.service.ready())

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.service.model_ready(request.name, request.version))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**self.service.server_metadata())

    async def ModelMetadata(self, request, context):
        meta = self.service.model_metadata(request.name, request.version)
        resp = pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
        for kind in ("inputs", "outputs"):
            for t in meta[kind]:
                getattr(resp, kind).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return resp

    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config=self.service.model_config(request.name, request.version))

    async def ModelStatistics(self, request, context):
        stats = self.service.stats(request.name, request.version)
        return pb.ModelStatisticsResponse(model_stats=[stats_message(s) for s in stats])

    async def RepositoryIndex(self, request, context):
        models = [pb.RepositoryIndexResponse.ModelIndex(**m) for m in self.service.index()]
        if request.ready:
            models = [m for m in models if m.state == "READY"]
        return pb.RepositoryIndexResponse(models=models)

    async def RepositoryModelLoad(self, request, context):
        self._check_control(request)
        await self.service.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        self._check_control(request)
        await self.service.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    @staticmethod
    def _check_control(request) -> None:
        if request.repository_name:
            raise InvalidArgument(f"repository '{request.repository_name}' is not served; leave "
                                  "repository_name empty (this server has one repository)")
        params = sorted(set(request.parameters) - {"unload_dependents"})  # a unit's members go with it
        if params:
            raise InvalidArgument(f"load/unload parameters {params} are not supported: "
                                  "models come from the repository by name")

    async def SystemSharedMemoryRegister(self, request, context):
        self.service.shm_register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request, context):
        self.service.shm_unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def SystemSharedMemoryStatus(self, request, context):
        regions = self.service.shm_status(request.name)
        resp = pb.SystemSharedMemoryStatusResponse()
        for r in regions:
            resp.regions[r.name].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(
                name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size))
        return resp

    async def CudaSharedMemoryRegister(self, request, context):
        raise cuda_shm_unavailable()

    async def CudaSharedMemoryUnregister(self, request, context):
        raise cuda_shm_unavailable()

    async def CudaSharedMemoryStatus(self, request, context):
        raise cuda_shm_unavailable()


def _parse(request_cls, raw: bytes):
    try:
        return request_cls.FromString(raw)
    except DecodeError as exc:
        raise InvalidArgument(f"malformed {request_cls.DESCRIPTOR.full_name} protobuf: {exc}") from None


def _unary(method, request_cls):
    async def handler(raw: bytes, context):
        try:
            request = _parse(request_cls, raw)
        except InvalidArgument as e:
            code, _, message = status_of(e)
            await context.abort(code, message)
        return await method(request, context)

    return handler


def _streaming(method, request_cls):
    async def handler(raw_iterator, context):
        async def requests():
            async for raw in raw_iterator:
                try:
                    yield _parse(request_cls, raw)
                except InvalidArgument as e:
                    code, _, message = status_of(e)
                    await context.abort(code, message)

        async for response in method(requests(), context):
            yield response

    return handler


def add_servicer(servicer: InferenceServicer, server) -> None:
    """Register the servicer like the generated ``add_..._to_server``, but parse requests ourselves,
    so that a malformed message gets INVALID_ARGUMENT naming the problem (gRPC would say UNKNOWN).
    Registered (not generic) handlers: the native transport serves only those itself."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for m in service.methods:
        request_cls = getattr(pb, m.input_type.name)
        response_cls = getattr(pb, m.output_type.name)
        method = getattr(servicer, m.name)
        if m.client_streaming and m.server_streaming:
            handlers[m.name] = grpc.stream_stream_rpc_method_handler(
                _streaming(method, request_cls), response_serializer=response_cls.SerializeToString)
        else:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(
                _unary(grpc_errors(method), request_cls), response_serializer=response_cls.SerializeToString)
    server.add_registered_method_handlers(service.full_name, handlers)


def build_server(service: Service, address: str, pair: tuple[bytes, bytes] | None, tokens: Tokens) -> grpc.aio.Server:
    """A grpc.aio server with the whole servicer (TLS when ``pair`` is given, tokens when set)."""
    kwargs = dict(
        interceptors=[AuthInterceptor(tokens)] if tokens.enabled else None,
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", service.limits.grpc_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    server = grpc.aio.server(**kwargs)
    add_servicer(InferenceServicer(service), server)
    try:
        port = server.add_secure_port(address, grpc_credentials(pair)) if pair else server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen for gRPC on {address}: {exc}") from exc
    if port == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    return server
