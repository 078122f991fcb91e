"""The daemon's answers against the mean of the members run directly with ONNX Runtime."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm

from tests.conftest import images

TOL = 1e-5


def grpc_infer(client, x, model="ensemble", outputs=None):
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], outputs=outputs)


def test_grpc_mean_and_uncertainty(daemon, reference, member_sessions):
    client = grpcclient.InferenceServerClient(daemon.grpc_url)
    x = images(5, seed=1)
    result = grpc_infer(client, x)
    np.testing.assert_allclose(result.as_numpy("probs"), reference(x), atol=TOL)
    per_member = np.stack([s.run(None, {"input": x})[0] for s in member_sessions.values()])
    mean = per_member.mean(axis=0)
    entropy = -(mean * np.log(mean)).sum(axis=1, keepdims=True)
    variance = per_member.var(axis=0).mean(axis=1, keepdims=True)
    np.testing.assert_allclose(result.as_numpy("entropy"), entropy, rtol=1e-4)
    np.testing.assert_allclose(result.as_numpy("member_variance"), variance, rtol=1e-3, atol=1e-9)
    assert result.as_numpy("entropy").shape == (5, 1)


def test_grpc_typed_contents(daemon, reference):
    """InferTensorContents (fp32_contents) instead of raw bytes."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    x = images(2, seed=2)
    request = pb.ModelInferRequest(model_name="ensemble")
    t = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    t.contents.fp32_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(daemon.grpc_url) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    names = [o.name for o in response.outputs]
    probs = np.frombuffer(response.raw_output_contents[names.index("probs")], np.float32).reshape(2, 10)
    np.testing.assert_allclose(probs, reference(x), atol=TOL)


@pytest.mark.parametrize("binary", [True, False])
def test_http_json_and_binary(daemon, reference, binary):
    client = httpclient.InferenceServerClient(daemon.http_url)
    x = images(4, seed=3)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("probs", binary_data=binary)
    result = client.infer("ensemble", [inp], outputs=[out])
    np.testing.assert_allclose(result.as_numpy("probs"), reference(x), atol=TOL)
    assert result.as_numpy("entropy") is None  # only what was asked for


def test_curl_style_json_without_outputs_answers_json(daemon, reference):
    """KServe v2 JSON naming no outputs gets JSON back (Triton), every output as a data list."""
    x = images(2, seed=4)
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.reshape(-1).tolist()}]}).encode()
    reply = urllib.request.urlopen(urllib.request.Request(
        f"http://{daemon.http_url}/v2/models/ensemble/infer", data=body, headers={"Content-Type": "application/json"}))
    assert reply.headers["Content-Type"].startswith("application/json")
    assert "Inference-Header-Content-Length" not in reply.headers
    outputs = {o["name"]: o for o in json.loads(reply.read())["outputs"]}
    assert set(outputs) == {"probs", "entropy", "member_variance"}
    assert all("data" in o and "parameters" not in o for o in outputs.values())
    probs = np.array(outputs["probs"]["data"], np.float32).reshape(outputs["probs"]["shape"])
    np.testing.assert_allclose(probs, reference(x), atol=TOL)


def test_member_models_are_served(daemon, member_sessions):
    client = grpcclient.InferenceServerClient(daemon.grpc_url)
    x = images(3, seed=4)
    for name, session in member_sessions.items():
        np.testing.assert_allclose(grpc_infer(client, x, model=name).as_numpy("probs"),
                                   session.run(None, {"input": x})[0], atol=TOL)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_client_system_shared_memory(daemon, reference, protocol):
    x = images(6, seed=5)
    out_bytes = 6 * 10 * 4
    key_in, key_out = f"/enserve_test_in_{protocol}", f"/enserve_test_out_{protocol}"
    h_in = shm.create_shared_memory_region("in", key_in, x.nbytes)
    h_out = shm.create_shared_memory_region("out", key_out, out_bytes)
    try:
        shm.set_shared_memory_region(h_in, [x])
        if protocol == "grpc":
            mod, client = grpcclient, grpcclient.InferenceServerClient(daemon.grpc_url)
        else:
            mod, client = httpclient, httpclient.InferenceServerClient(daemon.http_url)
        client.unregister_system_shared_memory()
        client.register_system_shared_memory(f"in_{protocol}", key_in, x.nbytes)
        client.register_system_shared_memory(f"out_{protocol}", key_out, out_bytes)
        status = client.get_system_shared_memory_status()
        assert f"in_{protocol}" in str(status)
        inp = mod.InferInput("input", list(x.shape), "FP32")
        inp.set_shared_memory(f"in_{protocol}", x.nbytes)
        out = mod.InferRequestedOutput("probs")
        out.set_shared_memory(f"out_{protocol}", out_bytes)
        result = client.infer("ensemble", [inp], outputs=[out])
        assert result.get_output("probs") is not None
        got = shm.get_contents_as_numpy(h_out, np.float32, [6, 10])
        np.testing.assert_allclose(got, reference(x), atol=TOL)
        client.unregister_system_shared_memory()
    finally:
        shm.destroy_shared_memory_region(h_in)
        shm.destroy_shared_memory_region(h_out)


def test_concurrent_clients_get_their_own_answers(daemon, reference):
    """32 clients with distinct inputs of different batch sizes: no mixing inside a batch."""
    errors: list[str] = []
    inputs = {i: images(1 + i % 3, seed=100 + i) for i in range(32)}
    expected = {i: reference(x) for i, x in inputs.items()}
    barrier = threading.Barrier(32)

    def client_thread(i: int) -> None:
        client = grpcclient.InferenceServerClient(daemon.grpc_url)
        barrier.wait()
        for _ in range(5):
            got = grpc_infer(client, inputs[i]).as_numpy("probs")
            if got.shape != expected[i].shape or not np.allclose(got, expected[i], atol=TOL):
                errors.append(f"client {i} got a wrong answer")

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def test_stream_infer(daemon, reference):
    client = grpcclient.InferenceServerClient(daemon.grpc_url)
    results = []
    done = threading.Event()

    def callback(result, error):
        results.append((result, error))
        if len(results) == 4:
            done.set()

    client.start_stream(callback)
    xs = {f"r{i}": images(1 + i, seed=200 + i) for i in range(3)}
    for rid, x in xs.items():
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        client.async_stream_infer("ensemble", [inp], request_id=rid)
    bad = grpcclient.InferInput("input", [1, 3, 32, 31], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 32, 31), np.float32))
    client.async_stream_infer("ensemble", [bad], request_id="bad")
    assert done.wait(30)
    client.stop_stream()
    ok = {r.get_response().id: r for r, e in results if e is None}
    errs = [e for r, e in results if e is not None]
    assert set(ok) == set(xs)
    for rid, x in xs.items():
        np.testing.assert_allclose(ok[rid].as_numpy("probs"), reference(x), atol=TOL)
    assert len(errs) == 1 and "shape [1,3,32,31]" in str(errs[0])


def test_metadata_config_index(daemon):
    g = grpcclient.InferenceServerClient(daemon.grpc_url)
    h = httpclient.InferenceServerClient(daemon.http_url)
    assert g.is_server_live() and g.is_server_ready() and g.is_model_ready("ensemble")
    assert h.is_server_live() and h.is_server_ready() and h.is_model_ready("cnn_w12")
    for client in (g, h):  # as Triton: an unknown model or version is not ready, not an error
        assert client.is_model_ready("no_such_model") is False
        assert client.is_model_ready("ensemble", "7") is False
    with pytest.raises(urllib.error.HTTPError) as not_ready:
        urllib.request.urlopen(f"http://{daemon.http_url}/v2/models/no_such_model/ready")
    assert not_ready.value.code == 400
    meta = g.get_server_metadata()
    assert meta.name == "enserve" and "system_shared_memory" in meta.extensions
    mm = h.get_model_metadata("ensemble")
    assert mm["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert [o["name"] for o in mm["outputs"]] == ["probs", "entropy", "member_variance"]
    cfg = g.get_model_config("ensemble").config
    assert cfg.platform == "ensemble"
    assert [s.model_name for s in cfg.ensemble_scheduling.step] == ["cnn_w12", "cnn_w20", "cnn_w32", "cnn_w56"]
    assert h.get_model_config("cnn_w20")["platform"] == "onnxruntime_onnx"
    names = {m.name for m in g.get_model_repository_index().models}
    assert names == {"ensemble", "cnn_w12", "cnn_w20", "cnn_w32", "cnn_w56"}


def test_statistics_and_metrics(daemon):
    g = grpcclient.InferenceServerClient(daemon.grpc_url)
    h = httpclient.InferenceServerClient(daemon.http_url)
    before = g.get_inference_statistics("ensemble").model_stats[0]
    grpc_infer(g, images(3, seed=9))
    after = g.get_inference_statistics("ensemble").model_stats[0]
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_count == before.inference_count + 3
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    member = h.get_inference_statistics("cnn_w56")["model_stats"][0]
    assert member["execution_count"] >= 1 and member["inference_stats"]["compute_infer"]["ns"] > 0
    text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics").read().decode()
    line = [x for x in text.splitlines() if x.startswith('nv_inference_request_success{model="ensemble"')]
    assert line and float(line[0].split()[-1]) == after.inference_stats.success.count
    for name in ("nv_inference_request_failure", "nv_inference_count", "nv_inference_exec_count",
                 "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                 "nv_inference_compute_infer_duration_us"):
        assert f'{name}{{model="cnn_w12",version="1"}}' in text


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_http_compressed_request(daemon, reference, algorithm):
    client = httpclient.InferenceServerClient(daemon.http_url)
    x = images(2, seed=12)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("ensemble", [inp], request_compression_algorithm=algorithm)
    np.testing.assert_allclose(result.as_numpy("probs"), reference(x), atol=TOL)
