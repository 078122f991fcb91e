"""Backpressure, timeouts, disconnects and shared-memory races against a real daemon."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import images, start_daemon


def metric(daemon, name: str, model: str = "ensemble") -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith(f'{name}{{model="{model}"'):
            return float(line.split()[-1])
    raise AssertionError(f"{name} for {model} not in the metrics")


def request(x: np.ndarray, model: str = "ensemble") -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name=model)
    r.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    r.raw_input_contents.append(x.tobytes())
    return r


def test_backpressure_refuses_at_once_and_counts(demo_repo, reference, tmp_path):
    daemon = start_daemon(demo_repo, tmp_path, "--max-inflight", "2")
    try:
        outcomes: dict[str, int] = {}
        lock = threading.Lock()
        x = images(8, seed=5)
        expected = reference(x)

        def client_thread():
            client = grpcclient.InferenceServerClient(daemon.grpc_url)
            for _ in range(10):
                inp = grpcclient.InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                t0 = time.monotonic()
                try:
                    ok = np.allclose(client.infer("ensemble", [inp]).as_numpy("probs"), expected, atol=1e-5)
                    key = "ok" if ok else "wrong"
                except InferenceServerException as e:
                    key = "refused" if "in flight, the limit is 2; retry later" in e.message() else e.message()
                    if key == "refused" and time.monotonic() - t0 > 1.0:
                        key = "refused slowly"
                with lock:
                    outcomes[key] = outcomes.get(key, 0) + 1

        threads = [threading.Thread(target=client_thread) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert set(outcomes) <= {"ok", "refused"}, outcomes
        assert outcomes.get("refused", 0) > 0 and outcomes.get("ok", 0) > 0
        assert metric(daemon, "nv_inference_request_rejected") == outcomes["refused"]
        body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                       "data": [0.0] * 3072}]}).encode()
        codes = set()

        def http_thread():
            req = urllib.request.Request(f"http://{daemon.http_url}/v2/models/ensemble/infer", data=body)
            for _ in range(10):
                try:
                    codes.add(urllib.request.urlopen(req).status)
                except urllib.error.HTTPError as e:
                    codes.add(e.code)

        threads = [threading.Thread(target=http_thread) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert codes <= {200, 503} and 200 in codes
    finally:
        assert daemon.stop() == 0


def test_request_timeouts(daemon, reference):
    body = json.dumps({"parameters": {"timeout": 1},  # 1 us: cannot finish in time
                       "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                   "data": [0.5] * 3072}]}).encode()
    req = urllib.request.Request(f"http://{daemon.http_url}/v2/models/ensemble/infer", data=body)
    try:
        urllib.request.urlopen(req)
        raise AssertionError("a 1 us timeout was met")
    except urllib.error.HTTPError as e:
        assert e.code == 504 and "did not finish within 1e-06 s" in json.loads(e.read())["error"]
    client = grpcclient.InferenceServerClient(daemon.grpc_url)
    inp = grpcclient.InferInput("input", [64, 3, 32, 32], "FP32")
    inp.set_data_from_numpy(images(64))  # tens of ms of compute: no answer can beat the deadline, even
    try:  # when a loaded machine delays the client's own timer
        client.infer("ensemble", [inp], client_timeout=1e-4)  # the client's gRPC deadline
        raise AssertionError("a 0.1 ms deadline was met")
    except InferenceServerException as e:
        assert "DEADLINE_EXCEEDED" in str(e.status())
    x = images(2, seed=3)
    inp = grpcclient.InferInput("input", [2, 3, 32, 32], "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_allclose(client.infer("ensemble", [inp], client_timeout=30).as_numpy("probs"),
                               reference(x), atol=1e-5)


def test_cancelled_calls_and_streams_leave_nothing_behind(daemon, reference):
    with grpc.insecure_channel(daemon.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        futures = [stub.ModelInfer.future(request(images(4, seed=i))) for i in range(40)]
        for f in futures:
            f.cancel()
    # a burst of cancels (RST_STREAM) may make the server close that connection with GOAWAY
    # (HTTP/2 rapid-reset protection, in grpcio and in the native front alike): a new one for the stream
    with grpc.insecure_channel(daemon.grpc_url, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def requests():
            for i in range(20):
                yield request(images(2, seed=i))
                if i == 10:
                    return

        stream = stub.ModelStreamInfer(requests())
        next(stream)
        stream.cancel()
    deadline = time.monotonic() + 10
    while metric(daemon, "nv_inference_pending_request_count") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(daemon, "nv_inference_pending_request_count") == 0, daemon.output()
    client = grpcclient.InferenceServerClient(daemon.grpc_url)
    x = images(3, seed=77)
    inp = grpcclient.InferInput("input", [3, 3, 32, 32], "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_allclose(client.infer("ensemble", [inp]).as_numpy("probs"), reference(x), atol=1e-5)


def test_unregistering_a_region_during_inference(daemon, reference):
    x = images(4, seed=21)
    expected = reference(x)
    handle = shm.create_shared_memory_region("race", "/enserve_test_race", x.nbytes)
    shm.set_shared_memory_region(handle, [x])
    admin = grpcclient.InferenceServerClient(daemon.grpc_url)
    admin.unregister_system_shared_memory()
    admin.register_system_shared_memory("race", "/enserve_test_race", x.nbytes)
    outcomes: dict[str, int] = {}
    stop = threading.Event()

    def user():
        client = grpcclient.InferenceServerClient(daemon.grpc_url)
        while not stop.is_set():
            inp = grpcclient.InferInput("input", list(x.shape), "FP32")
            inp.set_shared_memory("race", x.nbytes)
            try:
                ok = np.allclose(client.infer("ensemble", [inp]).as_numpy("probs"), expected, atol=1e-5)
                key = "ok" if ok else "wrong"
            except InferenceServerException as e:
                key = "unregistered" if "region 'race' is not registered" in e.message() else e.message()
            outcomes[key] = outcomes.get(key, 0) + 1

    threads = [threading.Thread(target=user) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(30):
            admin.unregister_system_shared_memory("race")
            time.sleep(0.01)
            admin.register_system_shared_memory("race", "/enserve_test_race", x.nbytes)
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        admin.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(handle)
    assert set(outcomes) <= {"ok", "unregistered"}, outcomes
    assert outcomes.get("ok", 0) > 0


def test_nan_and_inf_pass_through(daemon, member_sessions):
    x = images(3, seed=8)
    x[0, 0, 0, 0] = np.nan
    x[1, :, :, :] = np.inf
    client = grpcclient.InferenceServerClient(daemon.grpc_url)
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    got = client.infer("ensemble", [inp]).as_numpy("probs")
    expected = np.mean([s.run(None, {"input": x})[0] for s in member_sessions.values()], axis=0)
    np.testing.assert_allclose(got, expected, atol=1e-5, equal_nan=True)
    assert np.isnan(got[0]).all()  # NaN went through the network, not an error


def test_a_stream_is_bounded_and_always_ends(demo_repo, reference, tmp_path):
    """A client pours 400 requests into one stream without pause: the server reads at most
    STREAM_INFLIGHT (64) ahead of what it has sent back, so none meets the model's in-flight limit
    (80) and every answer is right. A stream whose next message cannot be parsed ends, after the
    answers to what came before it, instead of hanging."""
    from enserve.server.frontends.grpc_frontend import STREAM_INFLIGHT

    assert STREAM_INFLIGHT < 80
    daemon = start_daemon(demo_repo, tmp_path, "--max-inflight", "80")
    try:
        xs = [images(1, seed=500 + i) for i in range(400)]
        with grpc.insecure_channel(daemon.grpc_url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

            def requests():
                for i, x in enumerate(xs):
                    r = request(x)
                    r.id = str(i)
                    yield r

            answers = {}
            for response in stub.ModelStreamInfer(requests(), timeout=120):
                assert response.error_message == "", response.error_message
                got = np.frombuffer(response.infer_response.raw_output_contents[0], np.float32).reshape(1, 10)
                answers[response.infer_response.id] = got
            assert len(answers) == 400
            for i in (0, 199, 399):
                np.testing.assert_allclose(answers[str(i)], reference(xs[i]), atol=1e-5)
            raw = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                        request_serializer=lambda b: b,
                                        response_deserializer=pb.ModelStreamInferResponse.FromString)
            broken = [request(xs[0]).SerializeToString(), b"\xff\xff\xff not a protobuf"]
            t0 = time.monotonic()
            got = []
            try:
                for response in raw(iter(broken), timeout=20):
                    got.append(response)
            except grpc.RpcError as e:
                assert e.code() != grpc.StatusCode.DEADLINE_EXCEEDED, "the broken stream hung"
            assert time.monotonic() - t0 < 10
            assert len(got) <= 1 and all(r.error_message == "" for r in got)
        assert "Traceback" not in daemon.output()
        client = grpcclient.InferenceServerClient(daemon.grpc_url)
        inp = grpcclient.InferInput("input", [1, 3, 32, 32], "FP32")
        inp.set_data_from_numpy(xs[5])
        np.testing.assert_allclose(client.infer("ensemble", [inp]).as_numpy("probs"), reference(xs[5]), atol=1e-5)
    finally:
        assert daemon.stop() == 0


def _async_infer(client, x, results, key):
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    client.async_infer("ensemble", [inp], lambda result, error: results.__setitem__(key, (result, error)),
                       client_timeout=60)


def test_request_bytes_in_flight_are_bounded(demo_repo, reference, tmp_path):
    """Two 32-image requests (384 KiB each) wait on a stopped worker; a third would pass the 1 MiB
    of --max-inflight-bytes: RESOURCE_EXHAUSTED over gRPC, 503 over HTTP, at once. The two finish
    right once the worker runs again, and the bytes they held are free again."""
    daemon = start_daemon(demo_repo, tmp_path, "--max-inflight-bytes", "1M", "--max-request-bytes", "600K")
    stopped = daemon.worker_pids()["cnn_w56"][0]
    try:
        client = grpcclient.InferenceServerClient(daemon.grpc_url)
        xs = [images(32, seed=610 + i) for i in range(3)]
        results: dict[int, tuple] = {}
        os.kill(stopped, signal.SIGSTOP)
        try:
            for i in range(2):
                _async_infer(client, xs[i], results, i)
            deadline = time.monotonic() + 10
            while metric(daemon, "nv_inference_pending_request_count") < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            inp = grpcclient.InferInput("input", list(xs[2].shape), "FP32")
            inp.set_data_from_numpy(xs[2])
            with pytest.raises(InferenceServerException, match=r"requests in flight hold 0\.8 MiB.*"
                               r"--max-inflight-bytes \(1\.0 MiB\); retry later") as e:
                client.infer("ensemble", [inp], client_timeout=10)
            assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
            body = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                           "data": [0.5] * 3072}]}).encode() + b" " * 300_000
            req = urllib.request.Request(f"http://{daemon.http_url}/v2/models/ensemble/infer", body,
                                         {"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as http_error:
                urllib.request.urlopen(req, timeout=10)
            assert http_error.value.code == 503
            assert "--max-inflight-bytes" in json.loads(http_error.value.read())["error"]
        finally:
            os.kill(stopped, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while len(results) < 2:
            assert time.monotonic() < deadline, results
            time.sleep(0.05)
        for i in range(2):
            result, error = results[i]
            assert error is None, error
            np.testing.assert_allclose(result.as_numpy("probs"), reference(xs[i]), atol=1e-5)
        inp = grpcclient.InferInput("input", list(xs[2].shape), "FP32")
        inp.set_data_from_numpy(xs[2])
        np.testing.assert_allclose(client.infer("ensemble", [inp]).as_numpy("probs"), reference(xs[2]), atol=1e-5)
        assert urllib.request.urlopen(req, timeout=10).status == 200
    finally:
        assert daemon.stop() == 0


def test_default_request_limits_follow_the_repository(daemon, reference):
    """The demo's largest request is 64 images (768 KiB): gRPC takes 2x that + 1 MiB, HTTP 8x + 1 MiB.
    A 256-image message is refused before it is parsed; 64 images are served."""
    client = grpcclient.InferenceServerClient(daemon.grpc_url)
    big = images(256)
    inp = grpcclient.InferInput("input", list(big.shape), "FP32")
    inp.set_data_from_numpy(big)
    with pytest.raises(InferenceServerException, match="larger than max") as e:
        client.infer("ensemble", [inp])
    assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    body = b"{" + b" " * (8 * 786432 + (1 << 20)) + b"}"
    req = urllib.request.Request(f"http://{daemon.http_url}/v2/models/ensemble/infer", body,
                                 {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as http_error:
        urllib.request.urlopen(req, timeout=30)
    assert http_error.value.code == 413
    assert f"larger than the limit of {8 * 786432 + (1 << 20)} bytes" in json.loads(http_error.value.read())["error"]
    x = images(64, seed=9)
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_allclose(client.infer("ensemble", [inp]).as_numpy("probs"), reference(x), atol=1e-5)


def test_typed_contents_are_counted_before_they_are_converted(demo_repo, tmp_path):
    """A 64 MiB message of fp32_contents (16 M values) for a 1-image shape: refused by its count,
    without the 16 M Python floats (about 0.5 GiB) that converting it first would make."""
    daemon = start_daemon(demo_repo, tmp_path, "--max-request-bytes", "100M", "--grpc-transport", "grpcio")
    try:
        status = Path(f"/proc/{daemon.pid}/status")
        peak = lambda: int(next(ln for ln in status.read_text().splitlines() if ln.startswith("VmHWM")).split()[1])  # noqa: E731
        before = peak()
        r = pb.ModelInferRequest(model_name="ensemble")
        t = r.inputs.add(name="input", datatype="FP32", shape=[1, 3, 32, 32])
        t.contents.fp32_contents.extend(np.zeros(16 << 20, np.float32))
        with grpc.insecure_channel(daemon.grpc_url, options=[("grpc.max_send_message_length", -1)]) as channel:
            with pytest.raises(grpc.RpcError) as e:
                service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(r, timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "16777216 values given, but shape [1,3,32,32] needs 3072" in e.value.details()
        grown_mib = (peak() - before) / 1024
        # grpcio's receive path alone holds several copies of the message (about 440 MiB measured);
        # converting first added about 430 MiB more (870 measured before the count came first)
        assert grown_mib < 650, grown_mib
    finally:
        assert daemon.stop() == 0


def test_a_starting_daemon_removes_only_dead_daemons_socket_folders(tmp_path):
    """A SIGKILLed daemon leaves its fallback socket's folder: the next one removes it once it is a
    minute old and nothing listens on it, and leaves a live daemon's, and one just made, alone."""
    import socket

    from enserve.server.frontends import native_front

    old = time.time() - native_front.STALE_AFTER_S - 5
    folders = {name: tmp_path / f"{native_front.SOCKET_PREFIX}{name}" for name in ("dead", "empty", "live", "young")}
    for folder in folders.values():
        folder.mkdir()
    bound = []
    for name in ("dead", "live", "young"):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(folders[name] / "fallback.sock"))
        bound.append(s)
    bound[1].listen()  # only the live one accepts
    bound[0].close()  # the dead one's file stays, as a SIGKILL leaves it
    for name in ("dead", "empty", "live"):
        os.utime(folders[name], (old, old))
    try:
        removed = native_front.remove_dead_sockets(str(tmp_path))
    finally:
        for s in bound[1:]:
            s.close()
    assert sorted(removed) == sorted(str(folders[n]) for n in ("dead", "empty"))
    assert [n for n, f in folders.items() if f.exists()] == ["live", "young"]


def test_a_cancelled_call_frees_its_slot_at_once_and_its_work_is_skipped(demo_repo, tmp_path):
    """Cancelling a call cancels its request (as its deadline would): the in-flight slot is free at
    once and its workers skip the tasks they have not begun, rather than computing for no one
    (64 calls of 64 images: seconds of compute on a small machine, gone in a fraction of that)."""
    daemon = start_daemon(demo_repo, tmp_path, "--no-optimize")
    try:
        with grpc.insecure_channel(daemon.grpc_url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            futures = [stub.ModelInfer.future(request(images(64, seed=i))) for i in range(64)]
            time.sleep(0.2)  # the calls are in
            for f in futures:
                f.cancel()
        deadline = time.monotonic() + 1.0
        while metric(daemon, "nv_inference_pending_request_count") > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert metric(daemon, "nv_inference_pending_request_count") == 0, daemon.output()
        def worker_tasks() -> float:  # over every worker group
            text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics").read().decode()
            return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("enserve_worker_tasks{"))

        while worker_tasks() > 0 and time.monotonic() < deadline + 1.0:
            time.sleep(0.02)
        assert worker_tasks() == 0  # skipped, or the one batch each worker had begun
        client = grpcclient.InferenceServerClient(daemon.grpc_url)
        x = images(2, seed=9)
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        assert client.infer("ensemble", [inp]).as_numpy("probs").shape[0] == 2
    finally:
        assert daemon.stop() == 0
