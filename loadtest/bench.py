"""Closed-loop gRPC benchmark: enserve vs the bare ONNX Runtime ceiling vs a naive server.

Every cell (concurrency x images per request) runs ``concurrency`` clients that each send
their next request as soon as the previous answer arrives, for a fixed time, after a warm-up.
The ceiling and the naive server are measured in the same run, on the same machine.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Cell:
    server: str
    concurrency: int
    images: int
    requests: int
    seconds: float
    latencies_ms: np.ndarray
    errors: int

    @property
    def images_per_s(self) -> float:
        return self.requests * self.images / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else float("nan")


def ceiling(repository: Path, batch_sizes=(1, 2, 4, 8, 16, 32, 64), seconds: float = 1.5) -> tuple[dict, float]:
    """Images/s of the members back to back in this process, per batch size; and batch-1 latency (ms)."""
    import onnxruntime as ort

    from enserve.server.repository import load_repository

    repo = load_repository(repository)
    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = [ort.InferenceSession(str(m.path), options, providers=["CPUExecutionProvider"])
                for m in repo.members.values()]
    spec = next(iter(repo.members.values())).inputs[0]
    rates = {}
    single_ms = float("nan")
    for b in batch_sizes:
        x = np.random.default_rng(0).random((b, *spec.dims)).astype(spec.np_dtype)
        for s in sessions:
            s.run(None, {spec.name: x})
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            np.mean([s.run(None, {spec.name: x})[0] for s in sessions], axis=0)
            times.append(time.perf_counter() - t)
        rates[b] = b / float(np.median(times))
        if b == 1:
            single_ms = float(np.median(times)) * 1e3
    return rates, single_ms


async def _closed_loop(url: str, model: str, concurrency: int, images: int, seconds: float,
                       dims: tuple[int, ...], warmup: float = 1.0, row_bytes: int = 40) -> tuple[int, list[float], int]:
    """``concurrency`` users over one channel; each request is serialised once, like perf_analyzer."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    x = np.random.default_rng(1).random((images, *dims)).astype(np.float32)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.outputs.add(name="probs")
    request.raw_input_contents.append(x.tobytes())
    payload = request.SerializeToString()
    lat: list[float] = []
    errors = 0
    t_start = time.perf_counter() + warmup
    t_end = t_start + seconds
    async with grpc.aio.insecure_channel(url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")

        async def user() -> None:
            nonlocal errors
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                try:
                    reply = pb.ModelInferResponse.FromString(await infer(payload))
                except grpc.RpcError:
                    errors += 1
                    continue
                t1 = time.perf_counter()
                if len(reply.raw_output_contents[0]) != images * row_bytes:
                    errors += 1
                elif t0 >= t_start and t1 <= t_end:
                    lat.append((t1 - t0) * 1e3)

        await asyncio.gather(*(user() for _ in range(concurrency)))
    return len(lat), lat, errors


def measure(server: str, url: str, model: str, concurrency: int, images: int, seconds: float,
            dims: tuple[int, ...], row_bytes: int = 40) -> Cell:
    n, lat, errors = asyncio.run(_closed_loop(url, model, concurrency, images, seconds, dims, row_bytes=row_bytes))
    return Cell(server, concurrency, images, n, seconds, np.array(lat), errors)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if client.is_server_ready():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server at {url} not ready after {timeout} s")


def _start(cmd: list[str], url: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_ready(url, proc)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def print_table(cells: list[Cell], ceiling_rate: float, single_ms: float, naive: dict) -> None:
    print("naive: one process, members one after another per request, ONNX Runtime default options; "
          "naive-t: the same with intra-op threads = cores and spinning off")
    print(f"\nbare ONNX Runtime ceiling: {ceiling_rate:.0f} images/s at its best batch size; "
          f"single-image latency {single_ms:.2f} ms")
    head = f"{'server':<8} {'conc':>4} {'img/req':>7} {'req/s':>8} {'img/s':>8} {'p50 ms':>7} {'p90 ms':>7} " \
           f"{'p99 ms':>7} {'x ceiling':>9} {'x naive':>7} {'errors':>6}"
    print(head)
    print("-" * len(head))
    for c in cells:
        base = naive.get((c.concurrency, c.images))
        vs_naive = f"{c.images_per_s / base:.2f}" if base and c.server != "naive" else "-"
        print(f"{c.server:<8} {c.concurrency:>4} {c.images:>7} {c.requests / c.seconds:>8.0f} "
              f"{c.images_per_s:>8.0f} {c.pct(50):>7.2f} {c.pct(90):>7.2f} {c.pct(99):>7.2f} "
              f"{c.images_per_s / ceiling_rate:>9.2f} {vs_naive:>7} {c.errors:>6}")


def run_bench(args) -> int:
    from enserve.server.repository import load_repository

    repo = load_repository(args.model_repository)
    first = next(iter(repo.members.values()))
    dims, row_bytes = first.inputs[0].dims, first.outputs[0].row_bytes
    concurrencies = [int(c) for c in str(args.concurrency).split(",")]
    image_counts = [int(i) for i in str(args.images).split(",")]
    rates, single_ms = ceiling(args.model_repository)
    print("ceiling images/s by batch size (before): " + ", ".join(f"{b}: {r:.0f}" for b, r in rates.items()))
    cells: list[Cell] = []
    procs = []
    try:
        url = args.url
        if url is None:
            ports = [_free_port() for _ in range(3)]
            url = f"127.0.0.1:{ports[1]}"
            procs.append(_start([sys.executable, "-m", "enserve", "serve", "--model-repository",
                                 str(args.model_repository), "--http-port", str(ports[0]), "--grpc-port",
                                 str(ports[1]), "--metrics-port", str(ports[2]), *args.serve_args], url))
        for images in image_counts:
            for conc in concurrencies:
                cells.append(measure("enserve", url, args.model, conc, images, args.seconds, dims, row_bytes))
        if procs:
            _stop(procs.pop())
        naive: dict = {}
        variants = [] if args.no_naive else [("naive", []), ("naive-t", ["--tuned"])]
        for label, flags in variants:
            port = _free_port()
            naive_url = f"127.0.0.1:{port}"
            procs.append(_start([sys.executable, "-m", "enserve.loadtest.naive", str(args.model_repository), str(port),
                                 *flags], naive_url))
            for images in image_counts:
                for conc in concurrencies:
                    cell = measure(label, naive_url, args.model, conc, images, args.seconds, dims, row_bytes)
                    if label == "naive":
                        naive[(conc, images)] = cell.images_per_s
                    cells.append(cell)
            _stop(procs.pop())
    finally:
        for p in procs:
            _stop(p)
    # measured again after the servers: on a shared machine the better of the two is the honest bar
    after, single_after = ceiling(args.model_repository)
    print("ceiling images/s by batch size (after):  " + ", ".join(f"{b}: {r:.0f}" for b, r in after.items()))
    best = max(list(rates.items()) + list(after.items()), key=lambda kv: kv[1])
    print(f"(ceiling: best batch size {best[0]}, the better of the two measurements)")
    print_table(cells, best[1], min(single_ms, single_after), naive)
    return 0
