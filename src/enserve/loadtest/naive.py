"""The naive baseline: one process, members run one after another per request, no batching.

It answers ``ModelInfer`` for the ensemble like a hand-written single-process server would
(what a user gets by wrapping ONNX Runtime sessions in a gRPC handler). Benchmarks only.
Run as ``python -m enserve.loadtest.naive <repository> <port> [--tuned]``: ONNX Runtime's default
session options (what a hand-written server gets), or ``--tuned`` with thread spinning off.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from enserve.loadtest.members import input_of, member_files, output_of
from enserve.optimizer.sessions import session_for


class NaiveServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: Path, tuned: bool) -> None:
        paths = [str(p) for p in member_files(repository)]
        if tuned:  # enserve's own session options, all cores
            self.sessions = [session_for(p, threads=len(os.sched_getaffinity(0))) for p in paths]
        else:  # ONNX Runtime's defaults, as a hand-written server gets them
            self.sessions = [ort.InferenceSession(p, providers=["CPUExecutionProvider"]) for p in paths]
        self.input = input_of(self.sessions[0])
        self.output, _ = output_of(self.sessions[0])

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelInfer(self, request, context):
        t = request.inputs[0]
        x = np.frombuffer(request.raw_input_contents[0], self.input.np_dtype).reshape(list(t.shape))
        mean = np.mean([s.run(None, {t.name: x})[0] for s in self.sessions], axis=0)
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        response.outputs.add(name=self.output, datatype="FP32", shape=mean.shape)
        response.raw_output_contents.append(mean.astype(np.float32).tobytes())
        return response


async def serve_until_signal(servicer, port: int) -> None:
    """Serve ``servicer`` over grpc.aio on 127.0.0.1:``port`` until SIGINT or SIGTERM."""
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1)


if __name__ == "__main__":
    asyncio.run(serve_until_signal(NaiveServicer(Path(sys.argv[1]), "--tuned" in sys.argv[3:]), int(sys.argv[2])))
