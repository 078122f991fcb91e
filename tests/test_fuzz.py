"""Hostile input (hypothesis): malformed protobuf, random requests, malformed JSON and binary
headers. Every case gets a precise error, never an unhandled one; the server keeps serving and
its memory stays bounded. ENSERVE_FUZZ_EXAMPLES sets the cases per endpoint (default 400)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from tests.conftest import images

EXAMPLES = int(os.environ.get("ENSERVE_FUZZ_EXAMPLES", "400"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
METHOD = "/inference.GRPCInferenceService/ModelInfer"
# codes a caller may get for a bad request; UNKNOWN would be an unhandled exception in the server
EXPECTED_GRPC = {"INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED"}
COUNTS: dict[str, int] = {}


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


BASELINE: dict[int, int] = {}  # daemon pid -> its RSS before any fuzzing


@pytest.fixture(scope="module")
def channel(daemon):
    BASELINE.setdefault(daemon.pid, rss_kib(daemon.pid))  # the first fuzz test asks for it: before any case
    with grpc.insecure_channel(daemon.grpc_url) as ch:
        yield ch


def check_alive(daemon, every: int = 50) -> None:
    """Every ``every`` cases: the daemon still runs and answers a good request right (a dead or
    wedged server would otherwise pass on UNAVAILABLE and DEADLINE_EXCEEDED)."""
    if sum(COUNTS.values()) % every:
        return
    assert daemon.proc.poll() is None, daemon.output()
    x = images(1, seed=sum(COUNTS.values()))
    r = pb.ModelInferRequest(model_name="cnn_w12")
    r.inputs.add(name="input", datatype="FP32", shape=[1, 3, 32, 32])
    r.raw_input_contents.append(x.tobytes())
    with grpc.insecure_channel(daemon.grpc_url) as ch:
        reply = pb.ModelInferResponse.FromString(ch.unary_unary(METHOD)(r.SerializeToString(), timeout=20))
    probs = np.frombuffer(reply.raw_output_contents[0], np.float32)
    assert probs.shape == (10,) and abs(float(probs.sum()) - 1.0) < 1e-4


def call_raw(channel, payload: bytes):
    infer = channel.unary_unary(METHOD)
    try:
        infer(payload, timeout=20)
        return "OK", ""
    except grpc.RpcError as e:
        return e.code().name, e.details() or ""


@FUZZ
@given(payload=st.binary(max_size=4096))
def test_grpc_malformed_protobuf(daemon, channel, payload):
    COUNTS["grpc bytes"] = COUNTS.get("grpc bytes", 0) + 1
    check_alive(daemon)
    code, details = call_raw(channel, payload)
    assert code in EXPECTED_GRPC, (code, details)
    if code == "INVALID_ARGUMENT" and "malformed" in details:
        assert "malformed inference.ModelInferRequest protobuf" in details


dims = st.one_of(st.integers(-3, 70), st.sampled_from([0, 3, 32, 2**31, 2**62, -(2**62)]))
datatypes = st.sampled_from(["FP32", "FP64", "FP16", "INT32", "UINT8", "BOOL", "BYTES", "fp32", "", "X" * 40])


@st.composite
def infer_requests(draw):
    r = pb.ModelInferRequest(model_name=draw(st.sampled_from(["ensemble", "cnn_w12", "", "nope", "../etc"])))
    r.model_version = draw(st.sampled_from(["", "1", "2", "-1"]))
    use_raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        t = r.inputs.add(name=draw(st.sampled_from(["input", "other", ""])), datatype=draw(datatypes),
                         shape=draw(st.lists(dims, max_size=6)))
        kind = draw(st.sampled_from(["raw", "typed", "shm", "none"]))
        if kind == "shm":
            t.parameters["shared_memory_region"].string_param = draw(st.sampled_from(["r", "", "x" * 100]))
            t.parameters["shared_memory_offset"].int64_param = draw(st.integers(-(2**63), 2**63 - 1))
            t.parameters["shared_memory_byte_size"].int64_param = draw(st.integers(-(2**63), 2**63 - 1))
        elif kind == "typed":
            t.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=50)))
        if use_raw and kind in ("raw", "typed"):
            n = draw(st.sampled_from([0, 1, 12288, 12289, 2 * 12288, 7]))
            r.raw_input_contents.append(bytes(n))
    if draw(st.booleans()):
        r.raw_input_contents.append(bytes(draw(st.integers(0, 64))))
    for _ in range(draw(st.integers(0, 2))):
        o = r.outputs.add(name=draw(st.sampled_from(["probs", "entropy", "nope", ""])))
        if draw(st.booleans()):
            o.parameters["shared_memory_region"].string_param = "r"
            o.parameters["shared_memory_byte_size"].int64_param = draw(st.integers(-10, 2**40))
    if draw(st.booleans()):
        r.parameters["timeout"].int64_param = draw(st.integers(-(2**63), 2**63 - 1))
    return r


@FUZZ
@given(request=infer_requests())
def test_grpc_random_requests(daemon, channel, request):
    COUNTS["grpc requests"] = COUNTS.get("grpc requests", 0) + 1
    check_alive(daemon)
    code, details = call_raw(channel, request.SerializeToString())
    assert code in EXPECTED_GRPC | {"OK"}, (code, details)
    if code != "OK":
        assert details, code


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@st.composite
def http_bodies(draw):
    kind = draw(st.sampled_from(["bytes", "json", "tensor", "binary"]))
    headers = {}
    if kind == "bytes":
        body = draw(st.binary(max_size=2048))
    elif kind == "json":
        body = json.dumps(draw(json_values)).encode()
    else:
        tensor = {"name": draw(st.sampled_from(["input", "x"])), "datatype": draw(datatypes),
                  "shape": draw(st.lists(dims, max_size=5))}
        if kind == "tensor":
            tensor["data"] = draw(json_values)
        else:
            tensor["parameters"] = {"binary_data_size": draw(st.one_of(st.integers(-5, 30000), json_values))}
        header = {"inputs": [tensor], "parameters": draw(st.dictionaries(
            st.sampled_from(["timeout", "binary_data_output", "x"]), json_values, max_size=2))}
        if draw(st.booleans()):
            header["outputs"] = draw(st.one_of(json_values, st.just([{"name": "probs"}])))
        head = json.dumps(header).encode()
        body = head + bytes(draw(st.sampled_from([0, 10, 12288, 20000])))
        length = draw(st.one_of(st.just(str(len(head))), st.integers(-10, 10**6).map(str), st.text(max_size=6)))
        if kind == "binary" or draw(st.booleans()):
            headers["Inference-Header-Content-Length"] = length
    return body, headers


@FUZZ
@given(case=http_bodies(), model=st.sampled_from(["ensemble", "nope", "cnn_w20"]))
def test_http_hostile_bodies(daemon, channel, case, model):
    COUNTS["http infer"] = COUNTS.get("http infer", 0) + 1
    check_alive(daemon)
    body, headers = case
    headers = {k: v for k, v in headers.items() if v.isascii() and v.isprintable()}
    req = urllib.request.Request(f"http://{daemon.http_url}/v2/models/{model}/infer", data=body,
                                 headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            status, text = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read()
    assert status in (200, 400, 404, 413, 503, 504), (status, text[:300])
    if status != 200:
        assert json.loads(text)["error"]


def test_server_still_serves_with_bounded_memory_after_fuzzing(daemon, reference, channel):
    before = BASELINE[daemon.pid]  # taken before the first fuzz case
    for payload in (b"\xff" * 100, pb.ModelInferRequest(model_name="ensemble").SerializeToString()) * 200:
        call_raw(channel, payload)
    x = images(2, seed=99)
    code, _ = call_raw(channel, b"")
    assert code in EXPECTED_GRPC
    r = pb.ModelInferRequest(model_name="ensemble")
    r.inputs.add(name="input", datatype="FP32", shape=[2, 3, 32, 32])
    r.raw_input_contents.append(x.tobytes())
    reply = pb.ModelInferResponse.FromString(channel.unary_unary(METHOD)(r.SerializeToString(), timeout=20))
    names = [o.name for o in reply.outputs]
    probs = np.frombuffer(reply.raw_output_contents[names.index("probs")], np.float32).reshape(2, 10)
    np.testing.assert_allclose(probs, reference(x), atol=1e-5)
    assert rss_kib(daemon.pid) - before < 50_000  # KiB
    print("fuzz cases per endpoint:", COUNTS)


def test_malformed_protobuf_is_named(channel):
    code, details = call_raw(channel, b"\x00")
    assert code == "INVALID_ARGUMENT" and "malformed inference.ModelInferRequest protobuf" in details
