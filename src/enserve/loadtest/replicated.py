"""The replicated whole-ensemble baseline: k worker processes, each running every member back to back.

This is what Triton's python backend with ``instance_group { count: k }`` does with a model that
holds one ONNX Runtime session per member: a frontend process takes requests and hands each to
the next free instance, which runs the members one after another and averages them. Each
instance has ``cores / k`` intra-op threads and spinning off. Benchmarks only.
Run as ``python -m enserve.loadtest.replicated <repository> <port> [--instances K]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from enserve.child import python_module
from enserve.loadtest.naive import serve_until_signal

HEADER = struct.Struct("<II")  # rows, payload bytes


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def instance(repository: str, fd: int, threads: int) -> None:
    """One instance: every member's session; reads (rows, input bytes), answers the mean's bytes."""
    from enserve.loadtest.members import input_of, member_files
    from enserve.optimizer.sessions import session_for

    sessions = [session_for(str(p), threads=threads) for p in member_files(Path(repository))]
    spec = input_of(sessions[0])
    sock = socket.socket(fileno=fd)
    sock.sendall(b"R")  # loaded
    while True:
        head = _read_exactly(sock, HEADER.size)
        if head is None:
            return
        rows, size = HEADER.unpack(head)
        x = np.frombuffer(_read_exactly(sock, size), spec.np_dtype).reshape(rows, *spec.dims)
        mean = sessions[0].run(None, {spec.name: x})[0].astype(np.float32)
        for s in sessions[1:]:
            mean += s.run(None, {spec.name: x})[0]
        mean /= len(sessions)
        out = mean.tobytes()
        sock.sendall(HEADER.pack(rows, len(out)) + out)


class ReplicatedServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: Path, instances: int) -> None:
        import onnxruntime as ort

        from enserve.loadtest.members import member_files, output_of

        self.repository = repository
        self.instances = instances
        first = ort.InferenceSession(str(member_files(repository)[0]), providers=["CPUExecutionProvider"])
        self.output, self.dims = output_of(first)  # what the answers are called and shaped
        self.queue: asyncio.Queue = asyncio.Queue()
        self.procs: list[subprocess.Popen] = []
        self.feeders: list[asyncio.Task] = []  # held: the loop keeps only weak references to tasks

    async def start(self) -> None:
        threads = max(1, len(os.sched_getaffinity(0)) // self.instances)
        for _ in range(self.instances):
            ours, theirs = socket.socketpair()
            proc = subprocess.Popen(
                python_module("enserve.loadtest.replicated", "--instance", str(self.repository),
                              str(theirs.fileno()), str(threads)), pass_fds=(theirs.fileno(),))
            theirs.close()
            self.procs.append(proc)
            reader, writer = await asyncio.open_connection(sock=ours)
            await reader.readexactly(1)  # the instance has loaded its sessions
            self.feeders.append(asyncio.ensure_future(self._feed(reader, writer)))

    async def _feed(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One instance takes the next request whenever it is free (least loaded by construction)."""
        while True:
            rows, payload, future = await self.queue.get()
            writer.write(HEADER.pack(rows, len(payload)) + payload)
            rows, size = HEADER.unpack(await reader.readexactly(HEADER.size))
            future.set_result((rows, await reader.readexactly(size)))

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelInfer(self, request, context):
        t = request.inputs[0]
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((int(t.shape[0]), request.raw_input_contents[0], future))
        rows, body = await future
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        response.outputs.add(name=self.output, datatype="FP32", shape=[rows, *self.dims])
        response.raw_output_contents.append(body)
        return response

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait()


async def main(repository: str, port: int, instances: int) -> None:
    servicer = ReplicatedServicer(Path(repository), instances)
    await servicer.start()
    try:
        await serve_until_signal(servicer, port)
    finally:
        servicer.stop()


if __name__ == "__main__":
    if sys.argv[1] == "--instance":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        instance(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        parser = argparse.ArgumentParser(description=__doc__)
        parser.add_argument("repository")
        parser.add_argument("port", type=int)
        parser.add_argument("--instances", type=int, default=len(os.sched_getaffinity(0)))
        args = parser.parse_args()
        asyncio.run(main(args.repository, args.port, args.instances))
