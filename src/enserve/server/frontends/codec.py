"""The KServe v2 protobuf codec of inference: a ModelInferRequest decoded into the service's inputs
and outputs and submitted, and the answer encoded as a ModelInferResponse. Both gRPC fronts (the
grpc.aio servicer and the native front) use it, and neither imports the other."""

from __future__ import annotations

from tritonclient.grpc import service_pb2 as pb

from enserve.server.errors import InvalidArgument
from enserve.server.serving.service import (
    REQUEST_OBJECTIVE,
    OutputValue,
    PendingInfer,
    Service,
    parse_objective,
    parse_timeout,
)
from enserve.server.serving.tensors import RequestInput, RequestOutput

TYPED_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def param(params, key: str, kind: str):
    """A request parameter's value of ``kind`` ('int64_param', 'string_param', ...), or None."""
    if key not in params:
        return None
    return getattr(params[key], kind)


def decode_request(request: pb.ModelInferRequest) -> tuple[list[RequestInput], list[RequestOutput]]:
    raw = request.raw_input_contents
    inputs = []
    raw_index = 0
    for t in request.inputs:
        inp = RequestInput(t.name, t.datatype, list(t.shape))
        region = param(t.parameters, "shared_memory_region", "string_param")
        if region is not None:
            inp.shm_region = region
            inp.shm_offset = param(t.parameters, "shared_memory_offset", "int64_param") or 0
            inp.shm_byte_size = param(t.parameters, "shared_memory_byte_size", "int64_param")
        elif raw:
            if raw_index >= len(raw):
                raise InvalidArgument(
                    f"input '{t.name}' has no raw content: {len(raw)} raw_input_contents for "
                    f"{len(request.inputs)} inputs"
                )
            inp.data = raw[raw_index]
            raw_index += 1
        else:
            field = TYPED_CONTENTS.get(t.datatype)
            if field is not None and t.HasField("contents"):
                inp.data = getattr(t.contents, field)  # counted before it is converted (``tensors``)
        inputs.append(inp)
    if raw and raw_index != len(raw):
        raise InvalidArgument(f"{len(raw)} raw_input_contents for {raw_index} inputs without shared memory")
    outputs = []
    for o in request.outputs:
        out = RequestOutput(o.name)
        region = param(o.parameters, "shared_memory_region", "string_param")
        if region is not None:
            out.shm_region = region
            out.shm_offset = param(o.parameters, "shared_memory_offset", "int64_param") or 0
            out.shm_byte_size = param(o.parameters, "shared_memory_byte_size", "int64_param")
        outputs.append(out)
    return inputs, outputs


def begin_infer(service: Service, request: pb.ModelInferRequest, deadline_s: float | None) -> PendingInfer:
    """Decode a ModelInfer request and submit it; the earlier of the client's deadline and Triton's
    'timeout' parameter bounds it."""
    inputs, outputs = decode_request(request)
    timeout = None
    if "timeout" in request.parameters:
        given = request.parameters["timeout"]
        kind = given.WhichOneof("parameter_choice")
        if kind not in ("int64_param", "uint64_param"):
            raise InvalidArgument(f"parameter 'timeout' must be an int64_param of microseconds, not a {kind}")
        timeout = parse_timeout(getattr(given, kind))
    if deadline_s is not None:
        timeout = deadline_s if timeout is None else min(timeout, deadline_s)
    objective = None
    if REQUEST_OBJECTIVE in request.parameters:
        given = request.parameters[REQUEST_OBJECTIVE]
        kind = given.WhichOneof("parameter_choice")
        if kind not in ("double_param", "int64_param", "uint64_param"):
            raise InvalidArgument(f"parameter '{REQUEST_OBJECTIVE}' must be a number of milliseconds "
                                  f"(double_param, int64_param or uint64_param), not {kind or 'unset'}")
        objective = parse_objective(getattr(given, kind))
    return service.begin(request.model_name, request.model_version, inputs, outputs, timeout, objective)


def encode_response(request: pb.ModelInferRequest, values: list[OutputValue],
                    parameters: dict[str, str] | None = None) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
    for key, value in (parameters or {}).items():
        response.parameters[key].string_param = value
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
