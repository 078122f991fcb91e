"""Locust users for enserve: gRPC (tritonclient.grpc on gevent) and HTTP (KServe v2 JSON and binary).

Every response is validated: shape, probabilities that sum to 1, and, for an ensemble, equality
with the mean of what the server's own member models answer (asked one by one, before the load
starts). It speaks only the protocol. A wrong answer is a failure named "wrong answer: ...".

    locust -f loadtest/locustfile.py --headless -u 32 -r 32 -t 1m --host http://127.0.0.1:8000 \\
        --csv results/enserve --html results/enserve.html GrpcUser HttpJsonUser HttpBinaryUser

Environment: ENSERVE_GRPC_URL (default 127.0.0.1:8001), ENSERVE_MODEL (default ensemble),
ENSERVE_MAX_IMAGES (images per request, default 4).
"""

from __future__ import annotations

import os
import random
import time
from functools import lru_cache

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before any gRPC object exists: make gRPC cooperate with gevent

import numpy as np  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from locust import FastHttpUser, User, between, task  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = os.environ.get("ENSERVE_MODEL", "ensemble")
GRPC_URL = os.environ.get("ENSERVE_GRPC_URL", "127.0.0.1:8001")
MAX_IMAGES = int(os.environ.get("ENSERVE_MAX_IMAGES", "4"))
HEADER_LENGTH = "Inference-Header-Content-Length"


class WrongAnswer(Exception):
    pass


@lru_cache(maxsize=1)
def cases() -> list[tuple[np.ndarray, np.ndarray | None]]:
    """A fixed set of input batches and their reference answers: the mean of what the server's own
    member models answer (from the ensemble's config), asked one by one; none for a single model."""
    rng = np.random.default_rng(1234)
    client = grpcclient.InferenceServerClient(GRPC_URL)
    meta = client.get_model_metadata(MODEL)
    dims = [int(d) for d in meta.inputs[0].shape[1:]]
    inputs = [rng.random((1 + i % MAX_IMAGES, *dims), dtype=np.float32) for i in range(16)]
    members = [s.model_name for s in client.get_model_config(MODEL).config.ensemble_scheduling.step]
    if not members:
        return [(x, None) for x in inputs]

    def member_answer(member: str, x: np.ndarray) -> np.ndarray:
        inp = grpcclient.InferInput(meta.inputs[0].name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer(member, [inp]).as_numpy("probs")

    return [(x, np.mean([member_answer(m, x) for m in members], axis=0)) for x in inputs]


def validate(probs: np.ndarray | None, x: np.ndarray, expected: np.ndarray | None) -> None:
    if probs is None or probs.ndim != 2 or probs.shape[0] != x.shape[0]:
        raise WrongAnswer(f"wrong answer: shape {None if probs is None else probs.shape}")
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4):
        raise WrongAnswer("wrong answer: probabilities do not sum to 1")
    if expected is not None and not np.allclose(probs, expected, atol=1e-5):
        raise WrongAnswer("wrong answer: differs from the mean of the members")


class GrpcUser(User):
    """KServe v2 gRPC through tritonclient.grpc."""

    wait_time = between(0, 0.01)

    def on_start(self) -> None:
        self.client = grpcclient.InferenceServerClient(GRPC_URL)
        cases()

    def on_stop(self) -> None:
        self.client.close()  # an open gRPC channel keeps a gevent-patched process from exiting

    @task
    def infer(self) -> None:
        x, expected = random.choice(cases())
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        start = time.perf_counter()
        exc: Exception | None = None
        length = 0
        try:
            result = self.client.infer(MODEL, [inp], client_timeout=30)
            probs = result.as_numpy("probs")
            length = probs.nbytes
            validate(probs, x, expected)
        except InferenceServerException as e:
            exc = RuntimeError(f"{e.status()}: {e.message()}")
        except WrongAnswer as e:
            exc = e
        self.environment.events.request.fire(
            request_type="grpc", name="ModelInfer", response_time=(time.perf_counter() - start) * 1000,
            response_length=length, exception=exc, context={},
        )


class HttpJsonUser(FastHttpUser):
    """KServe v2 REST with JSON tensors."""

    wait_time = between(0, 0.01)

    @task
    def infer(self) -> None:
        x, expected = random.choice(cases())
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                            "data": x.ravel().tolist()}],
                "outputs": [{"name": "probs", "parameters": {"binary_data": False}}]}
        with self.client.post(f"/v2/models/{MODEL}/infer", json=body, name="infer json",
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {_error(r)}")
                return
            try:
                out = r.json()["outputs"][0]
                validate(np.asarray(out["data"], np.float32).reshape(out["shape"]), x, expected)
            except (WrongAnswer, KeyError, ValueError) as e:
                r.failure(str(e))


class HttpBinaryUser(FastHttpUser):
    """KServe v2 REST with Triton's binary tensor extension."""

    wait_time = between(0, 0.01)

    @task
    def infer(self) -> None:
        import json

        x, expected = random.choice(cases())
        head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                       "parameters": {"binary_data_size": x.nbytes}}],
                           "outputs": [{"name": "probs", "parameters": {"binary_data": True}}]}).encode()
        with self.client.post(f"/v2/models/{MODEL}/infer", data=head + x.tobytes(), name="infer binary",
                              headers={HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"},
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {_error(r)}")
                return
            try:
                n = int(r.headers[HEADER_LENGTH])
                out = json.loads(r.content[:n])["outputs"][0]
                probs = np.frombuffer(r.content[n:n + out["parameters"]["binary_data_size"]], np.float32)
                validate(probs.reshape(out["shape"]), x, expected)
            except (WrongAnswer, KeyError, ValueError) as e:
                r.failure(str(e))


def _error(response) -> str:
    try:
        return response.json()["error"]
    except Exception:
        return (response.text or "")[:200]
