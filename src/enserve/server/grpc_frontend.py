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

from enserve.server.config import transport_for
from enserve.server.errors import EnserveError, InvalidArgument
from enserve.server.security import AuthInterceptor, Tokens, grpc_credentials, read_pair
from enserve.server.service import (
    OutputValue,
    PendingInfer,
    Service,
    cuda_shm_unavailable,
    parse_timeout,
)
from enserve.server.stats import ModelStats
from enserve.server.tensors import RequestInput, RequestOutput

log = logging.getLogger("enserve")
MAX_MESSAGE = 2**31 - 1  # as tritonclient
_TYPED = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


STREAM_INFLIGHT = 64  # requests of one ModelStreamInfer stream in flight or waiting to be sent


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(
        error_message=message, infer_response=pb.ModelInferResponse(id=request.id, model_name=request.model_name))


def _param(params, key: str, kind: str):
    if key not in params:
        return None
    return getattr(params[key], kind)


def decode_request(request: pb.ModelInferRequest) -> tuple[list[RequestInput], list[RequestOutput]]:
    raw = request.raw_input_contents
    inputs = []
    raw_index = 0
    for t in request.inputs:
        inp = RequestInput(t.name, t.datatype, list(t.shape))
        region = _param(t.parameters, "shared_memory_region", "string_param")
        if region is not None:
            inp.shm_region = region
            inp.shm_offset = _param(t.parameters, "shared_memory_offset", "int64_param") or 0
            inp.shm_byte_size = _param(t.parameters, "shared_memory_byte_size", "int64_param")
        elif raw:
            if raw_index >= len(raw):
                raise InvalidArgument(
                    f"input '{t.name}' has no raw content: {len(raw)} raw_input_contents for "
                    f"{len(request.inputs)} inputs"
                )
            inp.data = raw[raw_index]
            raw_index += 1
        else:
            field = _TYPED.get(t.datatype)
            if field is not None and t.HasField("contents"):
                inp.data = getattr(t.contents, field)  # counted before it is converted (``tensors``)
        inputs.append(inp)
    if raw and raw_index != len(raw):
        raise InvalidArgument(f"{len(raw)} raw_input_contents for {raw_index} inputs without shared memory")
    outputs = []
    for o in request.outputs:
        out = RequestOutput(o.name)
        region = _param(o.parameters, "shared_memory_region", "string_param")
        if region is not None:
            out.shm_region = region
            out.shm_offset = _param(o.parameters, "shared_memory_offset", "int64_param") or 0
            out.shm_byte_size = _param(o.parameters, "shared_memory_byte_size", "int64_param")
        outputs.append(out)
    return inputs, outputs


def begin_infer(service: Service, request: pb.ModelInferRequest, deadline_s: float | None) -> PendingInfer:
    """Decode a ModelInfer request and submit it; the earlier of the client's deadline and Triton's
    'timeout' parameter bounds it."""
    inputs, outputs = decode_request(request)
    timeout = parse_timeout(_param(request.parameters, "timeout", "int64_param"))
    if deadline_s is not None:
        timeout = deadline_s if timeout is None else min(timeout, deadline_s)
    return service.begin(request.model_name, request.model_version, inputs, outputs, timeout)


def encode_response(request: pb.ModelInferRequest, values: list[OutputValue]) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
    raw = []
    for v in values:
        t = response.outputs.add(name=v.request.name, datatype=v.datatype, shape=v.value.shape)
        if v.request.shm_region is not None:
            t.parameters["shared_memory_region"].string_param = v.request.shm_region
            t.parameters["shared_memory_byte_size"].int64_param = v.value.nbytes
            if v.request.shm_offset:
                t.parameters["shared_memory_offset"].int64_param = v.request.shm_offset
            raw.append(b"")
        else:
            raw.append(v.value.tobytes())
    response.raw_output_contents.extend(raw)
    return response


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
    def __init__(self, service: Service) -> None:
        self.service = service

    async def _infer(self, request: pb.ModelInferRequest, deadline_s: float | None) -> pb.ModelInferResponse:
        limits = self.service.limits
        held = limits.reserve(request.ByteSize())  # until the answer is encoded
        try:
            pending = begin_infer(self.service, request, deadline_s)
            return encode_response(request, pending.finish(await pending.future))
        finally:
            limits.release(held)

    async def ModelInfer(self, request, context):
        try:
            return await self._infer(request, context.time_remaining())
        except EnserveError as e:
            await context.abort(e.grpc_code, e.message)

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
            except EnserveError as e:
                response = _stream_error(request, e.message)
            except Exception as e:  # noqa: BLE001 - the caller gets it, the stream goes on
                log.exception("stream request to '%s' failed", request.model_name)
                response = _stream_error(request, f"internal error: {type(e).__name__}: {e}")
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

    async def _call(self, context, fn, *args):
        try:
            return fn(*args)
        except EnserveError as e:
            await context.abort(e.grpc_code, e.message)

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.service.ready())

    async def ModelReady(self, request, context):
        ready = await self._call(context, self.service.model_ready, request.name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**self.service.server_metadata())

    async def ModelMetadata(self, request, context):
        meta = await self._call(context, self.service.model_metadata, request.name, request.version)
        resp = pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
        for kind in ("inputs", "outputs"):
            for t in meta[kind]:
                getattr(resp, kind).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return resp

    async def ModelConfig(self, request, context):
        cfg = await self._call(context, self.service.model_config, request.name, request.version)
        return pb.ModelConfigResponse(config=cfg)

    async def ModelStatistics(self, request, context):
        stats = await self._call(context, self.service.stats, request.name, request.version)
        return pb.ModelStatisticsResponse(model_stats=[stats_message(s) for s in stats])

    async def RepositoryIndex(self, request, context):
        models = [pb.RepositoryIndexResponse.ModelIndex(**m) for m in self.service.index()]
        if request.ready:
            models = [m for m in models if m.state == "READY"]
        return pb.RepositoryIndexResponse(models=models)

    async def RepositoryModelLoad(self, request, context):
        await self._control(context, self.service.load, request)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        await self._control(context, self.service.unload, request)
        return pb.RepositoryModelUnloadResponse()

    async def _control(self, context, fn, request) -> None:
        try:
            if request.repository_name:
                raise InvalidArgument(f"repository '{request.repository_name}' is not served; leave "
                                      "repository_name empty (this server has one repository)")
            params = sorted(set(request.parameters) - {"unload_dependents"})  # a unit's members go with it
            if params:
                raise InvalidArgument(f"load/unload parameters {params} are not supported: "
                                      "models come from the repository by name")
            await fn(request.model_name)
        except EnserveError as e:
            await context.abort(e.grpc_code, e.message)

    async def SystemSharedMemoryRegister(self, request, context):
        await self._call(context, self.service.shm_register, request.name, request.key,
                         request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request, context):
        await self._call(context, self.service.shm_unregister, request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def SystemSharedMemoryStatus(self, request, context):
        regions = await self._call(context, self.service.shm_status, request.name)
        resp = pb.SystemSharedMemoryStatusResponse()
        for r in regions:
            resp.regions[r.name].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(
                name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size))
        return resp

    async def _no_cuda(self, context):
        e = cuda_shm_unavailable()
        await context.abort(e.grpc_code, e.message)

    async def CudaSharedMemoryRegister(self, request, context):
        await self._no_cuda(context)

    async def CudaSharedMemoryUnregister(self, request, context):
        await self._no_cuda(context)

    async def CudaSharedMemoryStatus(self, request, context):
        await self._no_cuda(context)


def _parse(request_cls, raw: bytes):
    try:
        return request_cls.FromString(raw)
    except DecodeError as exc:
        raise InvalidArgument(f"malformed {request_cls.DESCRIPTOR.full_name} protobuf: {exc}") from None


def _unary(method, request_cls):
    async def handler(raw: bytes, context):
        try:
            request = _parse(request_cls, raw)
        except EnserveError as e:
            await context.abort(e.grpc_code, e.message)
        return await method(request, context)

    return handler


def _streaming(method, request_cls):
    async def handler(raw_iterator, context):
        async def requests():
            async for raw in raw_iterator:
                try:
                    yield _parse(request_cls, raw)
                except EnserveError as e:
                    await context.abort(e.grpc_code, e.message)

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
                _unary(method, request_cls), response_serializer=response_cls.SerializeToString)
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


def make_server(service: Service, address: str):
    """The gRPC server on ``address`` with the transport the options ask for."""
    options = service.options
    pair = read_pair(options.tls_cert, options.tls_key)
    if transport_for(options.grpc_transport, pair is not None) == "native":
        from enserve.server.native_front import NativeFront

        return NativeFront(service, address)
    return build_server(service, address, pair, Tokens(options.auth_token, options.admin_token))
