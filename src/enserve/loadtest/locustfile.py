"""Locust users for enserve: gRPC (tritonclient.grpc on gevent) and HTTP (KServe v2 JSON and binary).

Every response is validated: its shape and, for an ensemble, equality with the mean of what the
server's own member models answer (asked one by one, before the load starts; and rows that sum to 1
when the members' do). It speaks only the protocol, for any model: the input's name, type and shape
and the output's name come from the model's metadata. A wrong answer is a failure named
"wrong answer: ...".

    locust -f src/enserve/loadtest/locustfile.py --headless -u 32 -r 32 -t 1m --host http://127.0.0.1:8000 \\
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
from locust import FastHttpUser, User, between, events, task  # noqa: E402
from tritonclient.utils import InferenceServerException, triton_to_np_dtype  # noqa: E402

from enserve.deploy import DEFAULT_PORTS  # noqa: E402
from enserve.loadtest.signature import Signature, signature  # noqa: E402
from enserve.server.served.repository import DEFAULT_ENSEMBLE  # noqa: E402

MODEL = os.environ.get("ENSERVE_MODEL", DEFAULT_ENSEMBLE)
GRPC_URL = os.environ.get("ENSERVE_GRPC_URL", f"127.0.0.1:{DEFAULT_PORTS[1]}")
MAX_IMAGES = int(os.environ.get("ENSERVE_MAX_IMAGES", "4"))
HEADER_LENGTH = "Inference-Header-Content-Length"


class WrongAnswer(Exception):
    pass


# Each gRPC user's client, closed and dropped by the user's on_stop or, for a user stopped before
# it could, when Locust quits. A client still alive when the interpreter exits is closed again by
# its __del__ during the final garbage collection, which can block forever under gevent (seen as
# Locust printing its report and never exiting): no client may outlive the run.
_clients: dict[User, grpcclient.InferenceServerClient] = {}


@events.quit.add_listener
def _close_clients(**_kwargs) -> None:
    while _clients:
        _clients.popitem()[1].close()


@lru_cache(maxsize=1)
def model_signature() -> Signature:
    return signature(GRPC_URL, MODEL)


@lru_cache(maxsize=1)
def cases() -> list[tuple[np.ndarray, np.ndarray | None]]:
    """A fixed set of input batches and their reference answers: the mean of what the server's own
    member models answer (from the ensemble's config), asked one by one; none for a single model."""
    rng = np.random.default_rng(1234)
    sig = model_signature()
    inputs = [sig.batch(rng, 1 + i % MAX_IMAGES) for i in range(16)]
    with grpcclient.InferenceServerClient(GRPC_URL) as client:
        members = [s.model_name for s in client.get_model_config(MODEL).config.ensemble_scheduling.step]
        if not members:
            return [(x, None) for x in inputs]

        def member_answer(member: str, x: np.ndarray) -> np.ndarray:
            return client.infer(member, [grpc_input(sig, x)]).as_numpy(sig.output)

        return [(x, np.mean([member_answer(m, x) for m in members], axis=0)) for x in inputs]


def grpc_input(sig: Signature, x: np.ndarray) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(sig.input, list(x.shape), sig.datatype)
    inp.set_data_from_numpy(x)
    return inp


def validate(out: np.ndarray | None, x: np.ndarray, expected: np.ndarray | None) -> None:
    if out is None or out.shape[:1] != x.shape[:1] or (expected is not None and out.shape != expected.shape):
        raise WrongAnswer(f"wrong answer: shape {None if out is None else out.shape}")
    if expected is None:
        return
    if not np.allclose(out, expected, atol=1e-5):
        raise WrongAnswer("wrong answer: differs from the mean of the members")
    sums = expected.reshape(len(expected), -1).sum(axis=1)
    if np.allclose(sums, 1.0, atol=1e-4) and not np.allclose(out.reshape(len(out), -1).sum(axis=1), 1.0, atol=1e-4):
        raise WrongAnswer("wrong answer: probabilities do not sum to 1")


class GrpcUser(User):
    """KServe v2 gRPC through tritonclient.grpc."""

    wait_time = between(0, 0.01)

    def on_start(self) -> None:
        cases()  # an unknown model or an unreachable server fails here, and the soak says so
        _clients[self] = grpcclient.InferenceServerClient(GRPC_URL)

    def on_stop(self) -> None:
        client = _clients.pop(self, None)
        if client is not None:
            client.close()

    @task
    def infer(self) -> None:
        x, expected = random.choice(cases())
        sig = model_signature()
        start = time.perf_counter()
        exc: Exception | None = None
        length = 0
        try:
            result = _clients[self].infer(MODEL, [grpc_input(sig, x)], client_timeout=30)
            out = result.as_numpy(sig.output)
            length = 0 if out is None else out.nbytes
            validate(out, x, expected)
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
        sig = model_signature()
        body = {"inputs": [{"name": sig.input, "datatype": sig.datatype, "shape": list(x.shape),
                            "data": x.ravel().tolist()}],
                "outputs": [{"name": sig.output, "parameters": {"binary_data": False}}]}
        with self.client.post(f"/v2/models/{MODEL}/infer", json=body, name="infer json",
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {_error(r)}")
                return
            try:
                out = r.json()["outputs"][0]
                validate(np.asarray(out["data"], triton_to_np_dtype(out["datatype"])).reshape(out["shape"]), x,
                         expected)
            except (WrongAnswer, KeyError, ValueError) as e:
                r.failure(str(e))


class HttpBinaryUser(FastHttpUser):
    """KServe v2 REST with Triton's binary tensor extension."""

    wait_time = between(0, 0.01)

    @task
    def infer(self) -> None:
        import json

        x, expected = random.choice(cases())
        sig = model_signature()
        head = json.dumps({"inputs": [{"name": sig.input, "datatype": sig.datatype, "shape": list(x.shape),
                                       "parameters": {"binary_data_size": x.nbytes}}],
                           "outputs": [{"name": sig.output, "parameters": {"binary_data": True}}]}).encode()
        with self.client.post(f"/v2/models/{MODEL}/infer", data=head + x.tobytes(), name="infer binary",
                              headers={HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"},
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {_error(r)}")
                return
            try:
                n = int(r.headers[HEADER_LENGTH])
                out = json.loads(r.content[:n])["outputs"][0]
                values = np.frombuffer(r.content[n:n + out["parameters"]["binary_data_size"]],
                                       triton_to_np_dtype(out["datatype"]))
                validate(values.reshape(out["shape"]), x, expected)
            except (WrongAnswer, KeyError, ValueError) as e:
                r.failure(str(e))


def _error(response) -> str:
    try:
        return response.json()["error"]
    except Exception:
        return (response.text or "")[:200]
