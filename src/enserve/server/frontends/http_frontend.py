"""KServe v2 HTTP/REST frontend (aiohttp), with Triton's binary tensor and shared-memory extensions."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from google.protobuf import json_format
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from enserve.server.dataplane.stats import DURATIONS, MetricsCollector, ModelStats
from enserve.server.errors import InvalidArgument, PayloadTooLarge, RequestTimeout, Unauthenticated
from enserve.server.frontends.security import Tokens, is_admin_path, is_open_path
from enserve.server.frontends.status import status_of
from enserve.server.serving.service import (
    REQUEST_OBJECTIVE,
    Service,
    cuda_shm_unavailable,
    parse_objective,
    parse_timeout,
)
from enserve.server.serving.tensors import RequestInput, RequestOutput

log = logging.getLogger("enserve")
HEADER_LENGTH = "Inference-Header-Content-Length"


class ClientGone(Exception):
    """The client closed its connection before its request body was in."""


class MalformedRequestsInOneLine(logging.Filter):
    """aiohttp answers a request it cannot parse (broken chunked framing, a body that does not
    inflate) with 400 and logs the parser's traceback as an error; anyone can send those, so they
    become one line each."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        chain = (error, getattr(error, "__cause__", None), getattr(error, "__context__", None))
        if any(isinstance(e, (HttpProcessingError, RequestPayloadError)) for e in chain):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "HTTP: a malformed request was refused (400): %s", (" ".join(str(error).split())[:200],), None, None)
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


logging.getLogger("aiohttp.server").addFilter(MalformedRequestsInOneLine())


def _json(data, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(data).encode(), status=status, content_type="application/json")


def _error(e: BaseException) -> web.Response:
    _, http, message = status_of(e)
    return _json({"error": message}, http)


def metrics_app(stats_source, tokens: Tokens, request_bytes) -> web.Application:
    """The Prometheus endpoint (GET /metrics) over the registry's statistics, behind the user token."""
    prometheus = CollectorRegistry()
    prometheus.register(MetricsCollector(stats_source.stats, stats_source.queue_depth, stats_source.worker_tasks,
                                         request_bytes))

    async def metrics(request: web.Request) -> web.Response:
        reason = tokens.check(request.headers.get("Authorization"), admin=False)
        if reason is not None:
            return _error(Unauthenticated(reason))
        return web.Response(body=generate_latest(prometheus), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


def load_json(raw: bytes, what: str):
    """Parsed JSON, or INVALID_ARGUMENT naming ``what``: bad syntax, bad UTF-8 or nesting too deep."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from None


def _check_dict(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{what} must be an integer, got {value!r}")
    return value


def parse_infer_body(body: bytes, header_length: str | None) -> tuple[dict, list[RequestInput], list[RequestOutput]]:
    """Split a KServe v2 request into its JSON header and tensors (binary extension included)."""
    if header_length is not None:
        try:
            json_size = int(header_length)
        except ValueError:
            raise InvalidArgument(f"{HEADER_LENGTH} '{header_length}' is not an integer") from None
        if not 0 <= json_size <= len(body):
            raise InvalidArgument(f"{HEADER_LENGTH} {json_size} is outside the body of {len(body)} bytes")
    else:
        json_size = len(body)
    header = _check_dict(load_json(body[:json_size], "request body"), "the request")
    params = _check_dict(header.get("parameters", {}), "'parameters'")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list):
        raise InvalidArgument("the request needs an 'inputs' list")
    binary = memoryview(body)[json_size:]
    offset = 0
    inputs = []
    for i, t in enumerate(raw_inputs):
        t = _check_dict(t, f"inputs[{i}]")
        name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list):
            raise InvalidArgument(f"inputs[{i}] needs 'name' (string), 'datatype' (string) and 'shape' (list)")
        shape = [_int(d, f"input '{name}' shape") for d in shape]
        inp = RequestInput(name, datatype, shape)
        tp = _check_dict(t.get("parameters", {}), f"input '{name}' parameters")
        if "shared_memory_region" in tp:
            inp.shm_region = str(tp["shared_memory_region"])
            inp.shm_offset = _int(tp.get("shared_memory_offset", 0), "shared_memory_offset")
            if "shared_memory_byte_size" in tp:
                inp.shm_byte_size = _int(tp["shared_memory_byte_size"], "shared_memory_byte_size")
        elif "binary_data_size" in tp:
            size = _int(tp["binary_data_size"], f"input '{name}' binary_data_size")
            if size < 0 or offset + size > len(binary):
                raise InvalidArgument(
                    f"input '{name}': binary_data_size {size} at offset {offset} exceeds the "
                    f"{len(binary)} bytes of binary data after the JSON header"
                )
            inp.data = binary[offset : offset + size]
            offset += size
        elif "data" in t:
            inp.data = t["data"]
        inputs.append(inp)
    if offset != len(binary):
        raise InvalidArgument(f"{len(binary) - offset} bytes of binary data follow the inputs unused")
    default_binary = bool(params.get("binary_data_output", False))
    outputs = []
    raw_outputs = header.get("outputs") or []
    if not isinstance(raw_outputs, list):
        raise InvalidArgument("'outputs' must be a list")
    for i, o in enumerate(raw_outputs):
        o = _check_dict(o, f"outputs[{i}]")
        op = _check_dict(o.get("parameters", {}), f"outputs[{i}] parameters")
        out = RequestOutput(str(o.get("name")), bool(op.get("binary_data", default_binary)))
        if "shared_memory_region" in op:
            out.shm_region = str(op["shared_memory_region"])
            out.shm_offset = _int(op.get("shared_memory_offset", 0), "shared_memory_offset")
            if "shared_memory_byte_size" in op:
                out.shm_byte_size = _int(op["shared_memory_byte_size"], "shared_memory_byte_size")
        outputs.append(out)
    return header, inputs, outputs


def stats_json(s: ModelStats) -> dict:
    return {
        "name": s.name, "version": s.version, "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count, "execution_count": s.execution_count,
        "inference_stats": {k: {"count": s.durations[k].count, "ns": s.durations[k].ns} for k in DURATIONS},
    }


class HttpFrontend:
    def __init__(self, service: Service) -> None:
        self.service = service

    def app(self) -> web.Application:
        options = self.service.options
        self.tokens = Tokens(options.auth_token, options.admin_token)
        middlewares = [self._auth, self._errors] if self.tokens.enabled else [self._errors]
        app = web.Application(middlewares=middlewares)  # every body is read by ``read_body``
        r = app.router
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_get("/v2", self.server_metadata)
        r.add_post("/v2/repository/index", self.repository_index)
        r.add_post("/v2/repository/models/{model}/load", self.model_load)
        r.add_post("/v2/repository/models/{model}/unload", self.model_unload)
        base = "/v2/models/{model}"
        for prefix in (base, base + "/versions/{version}"):
            r.add_get(prefix, self.model_metadata)
            r.add_get(prefix + "/ready", self.model_ready)
            r.add_get(prefix + "/config", self.model_config)
            r.add_get(prefix + "/stats", self.model_stats)
            r.add_post(prefix + "/infer", self.infer)
        r.add_get("/v2/models/stats", self.model_stats)
        r.add_get("/v2/systemsharedmemory/status", self.shm_status)
        r.add_get("/v2/systemsharedmemory/region/{region}/status", self.shm_status)
        r.add_post("/v2/systemsharedmemory/region/{region}/register", self.shm_register)
        r.add_post("/v2/systemsharedmemory/unregister", self.shm_unregister)
        r.add_post("/v2/systemsharedmemory/region/{region}/unregister", self.shm_unregister)
        r.add_route("*", "/v2/cudasharedmemory/{tail:.*}", self.no_cuda)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        """The token, before anything of the body is read or counted."""
        path = request.path
        if not is_open_path(path):
            reason = self.tokens.check(request.headers.get("Authorization"), admin=is_admin_path(path))
            if reason is not None:
                return _error(Unauthenticated(reason))
        return await handler(request)

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPException:  # aiohttp's own answers (404 for an unknown path, 405, ...)
            raise
        except ClientGone as exc:  # one line, no traceback: nobody is left to answer
            log.info("HTTP %s %s: the client went away while sending its body (%s)", request.method, request.path, exc)
            return web.Response(status=400)
        except Exception as exc:  # noqa: BLE001 - every error is answered with its status
            return _error(exc)

    async def read_body(self, request: web.Request, *, counted: bool) -> tuple[bytearray, int]:
        """The body as it arrives, inflated when gzip or deflate (aiohttp inflates a chunk at a time),
        whole within --http-body-timeout (else 408) and at most --max-request-bytes (else 413).
        With ``counted`` its bytes are held in the in-flight budget as they are read, not as declared:
        (body, bytes held), which the caller releases."""
        limits = self.service.limits
        timeout_s = self.service.options.http_body_timeout_s

        def too_large() -> PayloadTooLarge:
            return PayloadTooLarge(f"the request body is larger than the limit of {limits.http_bytes} bytes "
                                   "(--max-request-bytes)")

        if (request.content_length or 0) > limits.http_bytes:  # refused from its declared length, unread
            raise too_large()
        body, held = bytearray(), 0
        try:
            async with asyncio.timeout(timeout_s):  # one timer for the whole body
                while chunk := await self._chunk(request):
                    if len(body) + len(chunk) > limits.http_bytes:
                        raise too_large()
                    if counted:
                        held += limits.reserve(len(chunk))
                    body += chunk
        except TimeoutError:
            limits.release(held)
            raise RequestTimeout(f"the request body did not arrive within --http-body-timeout ({timeout_s:g} s): "
                                 f"{len(body)} bytes came") from None
        except BaseException:
            limits.release(held)
            raise
        return body, held

    @staticmethod
    async def _chunk(request: web.Request) -> bytes:
        try:
            return await request.content.readany()
        except RequestPayloadError as exc:  # a body that cannot be inflated, or broken chunked framing
            raise InvalidArgument(f"the request body cannot be read: {' '.join(str(exc).split())}") from None
        except (ConnectionError, aiohttp.ClientError, HttpProcessingError) as exc:
            raise ClientGone(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None

    async def live(self, request):
        return web.Response(status=200)

    async def ready(self, request):
        return web.Response(status=200 if self.service.ready() else 400)  # Triton: 400 when not ready

    async def server_metadata(self, request):
        return _json(self.service.server_metadata())

    async def repository_index(self, request):
        body = await self._control_body(request, "repository index")
        models = self.service.index()
        if body.get("ready"):
            models = [m for m in models if m["state"] == "READY"]
        return _json(models)

    async def model_load(self, request):
        await self._control_body(request, "load")
        await self.service.load(request.match_info["model"])
        return web.Response(status=200)

    async def model_unload(self, request):
        await self._control_body(request, "unload")
        await self.service.unload(request.match_info["model"])
        return web.Response(status=200)

    async def _control_body(self, request, what: str) -> dict:
        raw, _ = await self.read_body(request, counted=False)
        body = _check_dict(load_json(raw, f"the {what} request body") if raw.strip() else {},
                           f"the {what} request body")
        params = {k: v for k, v in _check_dict(body.get("parameters") or {}, f"the {what} parameters").items()
                  if k != "unload_dependents"}  # a unit's members always go with it
        if what != "repository index" and params:
            raise InvalidArgument(f"{what} parameters {sorted(params)} are not supported: models come from "
                                  "the repository by name")
        return body

    def _model(self, request) -> tuple[str, str]:
        return request.match_info["model"], request.match_info.get("version", "")

    async def model_metadata(self, request):
        return _json(self.service.model_metadata(*self._model(request)))

    async def model_ready(self, request):
        return web.Response(status=200 if self.service.model_ready(*self._model(request)) else 400)

    async def model_config(self, request):
        cfg = self.service.model_config(*self._model(request))
        return _json(json_format.MessageToDict(cfg, preserving_proto_field_name=True))

    async def model_stats(self, request):
        name = request.match_info.get("model", "")
        stats = self.service.stats(name, request.match_info.get("version", ""))
        return _json({"model_stats": [stats_json(s) for s in stats]})

    async def infer(self, request: web.Request) -> web.Response:
        model, version = self._model(request)
        limits = self.service.limits
        body, held = await self.read_body(request, counted=True)  # held as read, until the answer
        try:
            header, inputs, outputs = parse_infer_body(body, request.headers.get(HEADER_LENGTH))
            params = header.get("parameters", {})
            timeout = parse_timeout(params.get("timeout"))
            pending = self.service.begin(model, version, inputs, outputs, timeout,
                                         parse_objective(params.get(REQUEST_OBJECTIVE)))
            values = await pending.outputs()
        finally:
            limits.release(held)
        default_binary = bool(params.get("binary_data_output", False))
        result = {"model_name": model, "model_version": "1", "outputs": []}
        if pending.parameters():
            result["parameters"] = pending.parameters()
        if "id" in header:
            result["id"] = header["id"]
        chunks = []
        for v in values:
            entry = {"name": v.request.name, "datatype": v.datatype, "shape": list(v.value.shape)}
            if v.request.shm_region is not None:
                entry["parameters"] = {"shared_memory_region": v.request.shm_region,
                                       "shared_memory_byte_size": v.value.nbytes}
            elif v.request.binary if outputs else default_binary:  # Triton: JSON unless binary is asked for
                data = v.value.tobytes()
                entry["parameters"] = {"binary_data_size": len(data)}
                chunks.append(data)
            else:
                entry["data"] = v.value.reshape(-1).tolist()
            result["outputs"].append(entry)
        head = json.dumps(result).encode()
        if not chunks:
            return web.Response(body=head, content_type="application/json")
        return web.Response(
            body=b"".join([head, *chunks]),
            headers={HEADER_LENGTH: str(len(head))},
            content_type="application/octet-stream",
        )

    async def shm_status(self, request):
        regions = self.service.shm_status(request.match_info.get("region", ""))
        return _json([{"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size} for r in regions])

    async def shm_register(self, request):
        raw, _ = await self.read_body(request, counted=False)
        body = _check_dict(load_json(raw or b"{}", "request body"), "the request")
        key = body.get("key")
        if not isinstance(key, str):
            raise InvalidArgument("shared memory registration needs 'key' (string)")
        self.service.shm_register(
            request.match_info["region"], key,
            _int(body.get("offset", 0), "offset"), _int(body.get("byte_size", 0), "byte_size"),
        )
        return web.Response(status=200)

    async def shm_unregister(self, request):
        self.service.shm_unregister(request.match_info.get("region", ""))
        return web.Response(status=200)

    async def no_cuda(self, request):
        return _error(cuda_shm_unavailable())
