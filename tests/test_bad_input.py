"""Every bad request gets the right status and a message naming the problem; the next good one succeeds."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from tests.conftest import images


def raw_request(model="ensemble", shape=(1, 3, 32, 32), datatype="FP32", data=None, name="input"):
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    if data is None:
        data = np.zeros(shape, np.float32).tobytes()
    request.raw_input_contents.append(data)
    return request


def grpc_call(daemon, request):
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    with grpc.insecure_channel(daemon.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ModelInfer(request)
        except grpc.RpcError as e:
            return e.code(), e.details()
    return None, None


def assert_still_serving(daemon, reference):
    client = grpcclient.InferenceServerClient(daemon.grpc_url)
    x = images(2, seed=42)
    inp = grpcclient.InferInput("input", [2, 3, 32, 32], "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_allclose(client.infer("ensemble", [inp]).as_numpy("probs"), reference(x), atol=1e-5)


def _extra_input():
    r = raw_request()
    r.inputs.add(name="extra", datatype="FP32", shape=[1])
    r.raw_input_contents.append(b"\0" * 4)
    return r


def _missing_input():
    return pb.ModelInferRequest(model_name="ensemble")


BAD_GRPC = {
    "unknown model": (lambda: raw_request(model="nope"), "NOT_FOUND", "unknown model 'nope'"),
    "missing input": (_missing_input, "INVALID_ARGUMENT", "lacks ['input']"),
    "extra input": (_extra_input, "INVALID_ARGUMENT", "unexpected inference input 'extra'"),
    "wrong dtype": (lambda: raw_request(datatype="FP64", data=np.zeros((1, 3, 32, 32)).tobytes()),
                    "INVALID_ARGUMENT", "datatype FP64, but model 'ensemble' expects FP32"),
    "wrong shape": (lambda: raw_request(shape=(1, 3, 32, 31), data=b"\0" * (3 * 32 * 31 * 4)),
                    "INVALID_ARGUMENT", "shape [1,3,32,31], but model 'ensemble' expects [-1,3,32,32]"),
    "wrong byte size": (lambda: raw_request(data=b"\0" * 100), "INVALID_ARGUMENT",
                        "raw content has 100 bytes, but shape [1,3,32,32] FP32 needs 12288"),
    "batch too large": (lambda: raw_request(shape=(65, 3, 32, 32)), "INVALID_ARGUMENT",
                        "batch size 65, which exceeds the max_batch_size 64"),
    "zero batch": (lambda: raw_request(shape=(0, 3, 32, 32), data=b""), "INVALID_ARGUMENT", "batch >= 1"),
    "unknown output": (lambda: _with_output("logits"), "INVALID_ARGUMENT", "unexpected inference output 'logits'"),
    "unknown version": (lambda: _with_version("7"), "NOT_FOUND", "no version '7'"),
    "timeout as a string": (lambda: _with_timeout("string_param", "100"), "INVALID_ARGUMENT",
                            "parameter 'timeout' must be an int64_param of microseconds, not a string_param"),
}


def _with_timeout(kind: str, value):
    r = raw_request()
    setattr(r.parameters["timeout"], kind, value)
    return r


def _with_output(name):
    r = raw_request()
    r.outputs.add(name=name)
    return r


def _with_version(v):
    r = raw_request()
    r.model_version = v
    return r


@pytest.mark.parametrize("case", sorted(BAD_GRPC))
def test_grpc_bad_request(daemon, reference, case):
    make, code, message = BAD_GRPC[case]
    got_code, details = grpc_call(daemon, make())
    assert got_code is not None and got_code.name == code, (got_code, details)
    assert message in details
    assert_still_serving(daemon, reference)


def http_post(daemon, path, body: bytes, headers=None):
    req = urllib.request.Request(f"http://{daemon.http_url}{path}", data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


_BINARY_HEAD = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                       "parameters": {"binary_data_size": 12288}}]}).encode()
BAD_HTTP = {
    "malformed json": ("/v2/models/ensemble/infer", b"{not json", {}, 400, "not valid JSON"),
    "inputs not a list": ("/v2/models/ensemble/infer", b'{"inputs": 3}', {}, 400, "needs an 'inputs' list"),
    "unknown model": ("/v2/models/nope/infer", b'{"inputs": []}', {}, 404, "unknown model 'nope'"),
    "too few values": ("/v2/models/ensemble/infer",
                       json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                               "data": [0.0] * 10}]}).encode(), {}, 400,
                       "10 values given, but shape [1,3,32,32] needs 3072"),
    "non-numeric data": ("/v2/models/ensemble/infer",
                         json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                                 "data": ["x"] * 3072}]}).encode(), {}, 400,
                         "cannot be read as FP32"),
    "header length beyond body": ("/v2/models/ensemble/infer", b'{"inputs": []}',
                                  {"Inference-Header-Content-Length": "999"}, 400, "outside the body"),
    "binary size beyond body": ("/v2/models/ensemble/infer", _BINARY_HEAD + b"\0" * 10,
                                {"Inference-Header-Content-Length": str(len(_BINARY_HEAD))}, 400,
                                "binary_data_size 12288 at offset 0 exceeds the 10 bytes"),
    "timeout 1e400": ("/v2/models/ensemble/infer", b'{"parameters": {"timeout": 1e400}, "inputs": []}', {}, 400,
                      "timeout 'inf' is not an integer number of microseconds"),
    "timeout Infinity": ("/v2/models/ensemble/infer", b'{"parameters": {"timeout": Infinity}, "inputs": []}', {},
                         400, "timeout 'inf' is not an integer number of microseconds"),
    "timeout true": ("/v2/models/ensemble/infer", b'{"parameters": {"timeout": true}, "inputs": []}', {}, 400,
                     "timeout 'True' is not an integer number of microseconds"),
    "timeout 1.5": ("/v2/models/ensemble/infer", b'{"parameters": {"timeout": 1.5}, "inputs": []}', {}, 400,
                    "timeout '1.5' is not an integer number of microseconds"),
    "timeout string": ("/v2/models/ensemble/infer", b'{"parameters": {"timeout": "100"}, "inputs": []}', {}, 400,
                       "timeout '100' is not an integer number of microseconds"),
    "deeply nested infer": ("/v2/models/ensemble/infer", b"[" * 100000 + b"]" * 100000, {}, 400,
                            "request body is not valid JSON: maximum recursion depth"),
    "deeply nested register": ("/v2/systemsharedmemory/region/r/register", b"[" * 100000 + b"]" * 100000, {},
                               400, "request body is not valid JSON: maximum recursion depth"),
    "deeply nested load": ("/v2/repository/models/ensemble/load", b"[" * 100000 + b"]" * 100000, {}, 400,
                           "the load request body is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_HTTP))
def test_http_bad_request(daemon, reference, case):
    path, body, headers, status, message = BAD_HTTP[case]
    got, text = http_post(daemon, path, body, headers)
    assert got == status, text
    assert message in json.loads(text)["error"]
    assert_still_serving(daemon, reference)


def test_shared_memory_errors(daemon, reference):
    client = grpcclient.InferenceServerClient(daemon.grpc_url)
    client.unregister_system_shared_memory()
    handle = shm.create_shared_memory_region("r", "/enserve_test_bad", 1024)
    try:
        with pytest.raises(InferenceServerException, match="key '/no_such_key' does not exist"):
            client.register_system_shared_memory("x", "/no_such_key", 16)
        with pytest.raises(InferenceServerException, match="exceeds the size 1024"):
            client.register_system_shared_memory("big", "/enserve_test_bad", 2048)
        os.symlink("/dev/shm/enserve_test_bad", "/dev/shm/enserve_test_link")
        with pytest.raises(InferenceServerException, match="key '/enserve_test_link': Too many levels of symbolic") as e:
            client.register_system_shared_memory("link", "/enserve_test_link", 16)
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
        client.register_system_shared_memory("r", "/enserve_test_bad", 1024)
        with pytest.raises(InferenceServerException, match="'r' is already registered"):
            client.register_system_shared_memory("r", "/enserve_test_bad", 1024)
        inp = grpcclient.InferInput("input", [1, 3, 32, 32], "FP32")
        inp.set_shared_memory("unknown_region", 12288)
        with pytest.raises(InferenceServerException, match="region 'unknown_region' is not registered"):
            client.infer("ensemble", [inp])
        inp = grpcclient.InferInput("input", [1, 3, 32, 32], "FP32")
        inp.set_shared_memory("r", 12288)
        with pytest.raises(InferenceServerException, match="does not match shape|exceeds region"):
            client.infer("ensemble", [inp])
        small = grpcclient.InferInput("input", [1, 3, 32, 32], "FP32")
        small.set_data_from_numpy(images(1))
        out = grpcclient.InferRequestedOutput("probs")
        out.set_shared_memory("r", 40, offset=1000)
        with pytest.raises(InferenceServerException, match="offset 1000 \\+ byte size 40 exceeds region 'r'"):
            client.infer("ensemble", [small], outputs=[out])
        with pytest.raises(InferenceServerException, match="CUDA shared memory is not available"):
            client.get_cuda_shared_memory_status()
    finally:
        client.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(handle)
        if os.path.lexists("/dev/shm/enserve_test_link"):
            os.unlink("/dev/shm/enserve_test_link")
    assert_still_serving(daemon, reference)
    with pytest.raises(InferenceServerException, match="server's|belongs to the server"):
        client.register_system_shared_memory("mine", f"/enserve.{daemon.pid}.in0.0", 16)


def test_a_region_the_client_truncated_is_invalid_argument_and_the_daemon_lives(daemon, reference):
    """A client shrinks its registered object (ftruncate to 0) and infers from it, and into it: the
    daemon reads and writes through the descriptor, so it answers INVALID_ARGUMENT / 400 instead of
    dying of SIGBUS, and every other request is served."""
    import tritonclient.http as httpclient

    x = images(4, seed=3)
    grpc_client = grpcclient.InferenceServerClient(daemon.grpc_url)
    http_client = httpclient.InferenceServerClient(daemon.http_url)
    handle = shm.create_shared_memory_region("t", "/enserve_test_trunc", x.nbytes + 160)
    try:
        shm.set_shared_memory_region(handle, [x])
        grpc_client.register_system_shared_memory("t", "/enserve_test_trunc", x.nbytes + 160)
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_shared_memory("t", x.nbytes)
        out = grpcclient.InferRequestedOutput("probs")
        out.set_shared_memory("t", 160, offset=x.nbytes)
        grpc_client.infer("ensemble", [inp], outputs=[out])  # intact: served from and into the region
        got = shm.get_contents_as_numpy(handle, np.float32, [4, 10], offset=x.nbytes)
        np.testing.assert_allclose(got, reference(x), atol=1e-5)
        fd = os.open("/dev/shm/enserve_test_trunc", os.O_RDWR)
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        with pytest.raises(InferenceServerException, match="region 't' .* is now 0 bytes.*shrunk") as e:
            grpc_client.infer("ensemble", [inp], outputs=[out])
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
        plain = grpcclient.InferInput("input", list(x.shape), "FP32")
        plain.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException, match="output 'probs'.*is now 0 bytes") as e:
            grpc_client.infer("ensemble", [plain], outputs=[out])  # the answer cannot go into it either
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
        hin = httpclient.InferInput("input", list(x.shape), "FP32")
        hin.set_shared_memory("t", x.nbytes)
        with pytest.raises(InferenceServerException, match="is now 0 bytes") as e:
            http_client.infer("ensemble", [hin])
        assert e.value.status() == "400"
    finally:
        grpc_client.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(handle)
    assert_still_serving(daemon, reference)
