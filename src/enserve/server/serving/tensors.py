"""Request tensors: validation against a model and conversion to arrays (normalised once, here).

Both frontends turn their wire format into ``RequestInput``/``RequestOutput`` and call
``prepare``; every rule and its message lives here, once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from tritonclient.utils import triton_to_np_dtype

from enserve.server.dataplane.shm import ClientRegion, ClientRegions
from enserve.server.errors import InvalidArgument
from enserve.server.served.repository import MEMBERS_OUTPUT


@dataclass
class RequestInput:
    name: str
    datatype: str
    shape: list[int]
    data: Any = None  # bytes-like (raw/binary), a list (JSON / typed contents), or None
    shm_region: str | None = None
    shm_offset: int = 0
    shm_byte_size: int | None = None


@dataclass
class RequestOutput:
    name: str
    binary: bool = True
    shm_region: str | None = None
    shm_offset: int = 0
    shm_byte_size: int | None = None


def _fmt(shape) -> str:
    return "[" + ",".join(str(int(d)) for d in shape) + "]"


def prepare(target, inputs: list[RequestInput], regions: ClientRegions | None) -> tuple[list[np.ndarray], int]:
    """Arrays in the model's input order, each (batch, *dims), and the batch size."""
    expected = {t.name: t for t in target.inputs}
    seen: dict[str, RequestInput] = {}
    for inp in inputs:
        if inp.name not in expected:
            raise InvalidArgument(
                f"unexpected inference input '{inp.name}' for model '{target.name}'; it expects {list(expected)}"
            )
        if inp.name in seen:
            raise InvalidArgument(f"input '{inp.name}' is given twice")
        seen[inp.name] = inp
    missing = [n for n in expected if n not in seen]
    if missing:
        raise InvalidArgument(
            f"model '{target.name}' expects {len(expected)} inputs {list(expected)}, but the request lacks {missing}"
        )
    arrays = []
    batch = None
    for spec in target.inputs:
        inp = seen[spec.name]
        if inp.datatype != spec.datatype:
            raise InvalidArgument(
                f"input '{spec.name}' has datatype {inp.datatype}, but model '{target.name}' expects {spec.datatype}"
            )
        shape = [int(d) for d in inp.shape]
        if len(shape) != len(spec.dims) + 1 or tuple(shape[1:]) != spec.dims or shape[0] < 1:
            raise InvalidArgument(
                f"input '{spec.name}' has shape {_fmt(shape)}, but model '{target.name}' expects "
                f"{_fmt([-1, *spec.dims])} (batch axis first, batch >= 1)"
            )
        if shape[0] > target.max_batch_size:
            raise InvalidArgument(
                f"input '{spec.name}' has batch size {shape[0]}, which exceeds the max_batch_size "
                f"{target.max_batch_size} of model '{target.name}'"
            )
        if batch is not None and shape[0] != batch:
            raise InvalidArgument(f"input '{spec.name}' has batch size {shape[0]}, but other inputs have {batch}")
        batch = shape[0]
        arrays.append(_to_array(spec, shape, inp, regions, target.name))
    return arrays, batch


def _to_array(spec, shape: list[int], inp: RequestInput, regions: ClientRegions | None, model: str) -> np.ndarray:
    dtype = np.dtype(triton_to_np_dtype(spec.datatype))
    n_elements = math.prod(shape)
    n_bytes = n_elements * dtype.itemsize
    what = f"input '{spec.name}'"
    if inp.shm_region is not None:
        if regions is None:
            raise InvalidArgument(f"{what}: shared memory inputs are disabled on this server (--allow-client-shm)")
        size = inp.shm_byte_size if inp.shm_byte_size is not None else n_bytes
        if size != n_bytes:
            raise InvalidArgument(
                f"{what}: shared memory byte size {size} does not match shape {_fmt(shape)} "
                f"{spec.datatype}, which needs {n_bytes} bytes"
            )
        buf = regions.get(inp.shm_region).read(inp.shm_offset, size, what)
        return np.frombuffer(buf, dtype=dtype).reshape(shape)
    data = inp.data
    if data is None:
        raise InvalidArgument(f"{what} has no data (no raw content, contents or shared memory region)")
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) != n_bytes:
            raise InvalidArgument(
                f"{what}: raw content has {len(data)} bytes, but shape {_fmt(shape)} {spec.datatype} "
                f"needs {n_bytes} bytes"
            )
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if not isinstance(data, list):  # typed gRPC contents, flat: counted before any conversion
        if len(data) != n_elements:
            raise InvalidArgument(f"{what}: {len(data)} values given, but shape {_fmt(shape)} needs {n_elements}")
        try:
            return np.fromiter(data, dtype=dtype, count=n_elements).reshape(shape)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidArgument(f"{what}: data cannot be read as {spec.datatype}: {exc}") from None
    try:
        arr = np.asarray(data, dtype=dtype)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise InvalidArgument(f"{what}: data cannot be read as {spec.datatype}: {exc}") from None
    if arr.size != n_elements:
        raise InvalidArgument(
            f"{what}: {arr.size} values given, but shape {_fmt(shape)} needs {n_elements}"
        )
    return arr.reshape(shape)


def select_outputs(target, requested: list[RequestOutput]) -> list[RequestOutput]:
    """The outputs to return: all (binary) when none are named, but ``MEMBERS_OUTPUT``, which is
    returned when asked for by name (a mask per row, which matters only to an answer under a latency
    objective, whose members its ``enserve_members`` parameter names anyway); unknown names are
    errors."""
    names = [t.name for t in target.outputs]
    if not requested:
        return [RequestOutput(n) for n in names if n != MEMBERS_OUTPUT]
    seen = set()
    for out in requested:
        if out.name not in names:
            raise InvalidArgument(
                f"unexpected inference output '{out.name}' for model '{target.name}'; it has {names}"
            )
        if out.name in seen:
            raise InvalidArgument(f"output '{out.name}' is requested twice")
        seen.add(out.name)
    return requested


def shm_output_window(out: RequestOutput, nbytes: int, regions: ClientRegions | None) -> ClientRegion:
    """The client's region for ``nbytes`` of output ``out``; a precise error if they do not fit."""
    what = f"output '{out.name}'"
    if regions is None:
        raise InvalidArgument(f"{what}: shared memory outputs are disabled on this server (--allow-client-shm)")
    region = regions.get(out.shm_region)
    size = out.shm_byte_size if out.shm_byte_size is not None else region.byte_size - out.shm_offset
    if nbytes > size:
        raise InvalidArgument(
            f"{what} needs {nbytes} bytes, but shared memory region '{out.shm_region}' "
            f"gives {size} bytes from offset {out.shm_offset}"
        )
    region.check(out.shm_offset, nbytes, what)
    return region


def write_shm_output(out: RequestOutput, value: np.ndarray, regions: ClientRegions | None) -> None:
    region = shm_output_window(out, value.nbytes, regions)
    region.write(out.shm_offset, memoryview(np.ascontiguousarray(value)).cast("B"), f"output '{out.name}'")


def check_shm_outputs(outputs: list[RequestOutput], target, batch: int, regions: ClientRegions | None) -> None:
    """Validate shared-memory outputs before running, so a bad window fails fast."""
    specs = {t.name: t for t in target.outputs}
    for out in outputs:
        if out.shm_region is not None:
            shm_output_window(out, batch * specs[out.name].row_bytes, regions)
