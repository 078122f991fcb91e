"""Closed-loop gRPC benchmark: enserve vs the bare ONNX Runtime ceiling vs a naive server.

Every cell (concurrency x images per request) runs ``concurrency`` clients that each send
their next request as soon as the previous answer arrives, for a fixed time, after a warm-up.
The ceiling and the naive server are measured in the same run, on the same machine.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from enserve.child import python_module
from enserve.loadtest.launcher import free_ports, start_server
from enserve.loadtest.signature import Signature, signature
from enserve.server.served.repository import DEFAULT_ENSEMBLE


@dataclass
class Cell:
    server: str
    concurrency: int
    images: int
    requests: int
    seconds: float
    latencies_ms: np.ndarray
    errors: int
    front_cpu_s: float = float("nan")  # CPU of the server's frontend process during the window
    total_cpu_s: float = float("nan")  # CPU of all its processes (frontend + workers)

    @property
    def images_per_s(self) -> float:
        return self.requests * self.images / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else float("nan")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    out = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return out
    for c in children:
        out.extend(_tree(int(c)))
    return out


def cpu_sample(pid: int | None) -> tuple[float, float]:
    """(frontend CPU s, whole process tree CPU s) of a server, or NaN without a pid."""
    if pid is None:
        return float("nan"), float("nan")
    return _cpu_seconds(pid), sum(_cpu_seconds(p) for p in _tree(pid))


def ceiling(repository: Path, model: str = DEFAULT_ENSEMBLE, batch_sizes=(1, 2, 4, 8, 16, 32, 64),
            seconds: float = 1.5) -> tuple[dict, float]:
    """Images/s of the members back to back in this process, per batch size; and batch-1 latency (ms)."""
    from enserve.loadtest.members import input_of, member_files
    from enserve.optimizer.sessions import session_for

    sessions = [session_for(str(p), threads=len(os.sched_getaffinity(0))) for p in member_files(repository, model)]
    spec = input_of(sessions[0])
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


async def closed_loop(url: str, model: str, concurrency: int, images: int, seconds: float,
                       sig: Signature, warmup: float = 1.0,
                       pid: int | None = None) -> tuple[int, list[float], int, tuple[float, float]]:
    """``concurrency`` users over one channel; each request is serialised once, like perf_analyzer."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    x = sig.batch(np.random.default_rng(1), images)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=sig.input, datatype=sig.datatype, shape=list(x.shape))
    request.outputs.add(name=sig.output)
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
                if len(reply.raw_output_contents[0]) != images * sig.row_bytes:
                    errors += 1
                elif t0 >= t_start and t1 <= t_end:
                    lat.append((t1 - t0) * 1e3)

        async def cpu() -> tuple[float, float]:
            await asyncio.sleep(t_start - time.perf_counter())
            before = cpu_sample(pid)
            await asyncio.sleep(t_end - time.perf_counter())
            after = cpu_sample(pid)
            return after[0] - before[0], after[1] - before[1]

        *_, used = await asyncio.gather(*(user() for _ in range(concurrency)), cpu())
    return len(lat), lat, errors, used


def measure(server: str, url: str, model: str, concurrency: int, images: int, seconds: float,
            sig: Signature, pid: int | None = None) -> Cell:
    n, lat, errors, (front, total) = asyncio.run(
        closed_loop(url, model, concurrency, images, seconds, sig, pid=pid))
    return Cell(server, concurrency, images, n, seconds, np.array(lat), errors, front, total)


BASELINES = {
    "naive": "one process, members one after another per request, ONNX Runtime default options",
    "naive-t": "the same with enserve's session options (intra-op threads = cores, spinning off)",
    "repl": "k processes each running every member back to back behind one gRPC frontend, "
            "1 request at a time, k = cores (Triton's python backend with k instances)",
}


def median_cell(cells: list[Cell]) -> Cell:
    """The round with the median images/s (the lower middle one of an even count)."""
    return sorted(cells, key=lambda c: c.images_per_s)[(len(cells) - 1) // 2]


def print_table(cells: list[Cell], ceiling_rate: float, single_ms: float,
                rounds: dict[tuple[int, int], tuple[float, float]] | None = None) -> None:
    """``x ceil`` divides by the ceiling of the cell's own round when ``rounds`` has it (measured
    right after the servers' runs of that cell: the same moment of a drifting machine), else by
    ``ceiling_rate``; ``x best`` always by ``ceiling_rate``, the best of all measurements."""
    rounds = rounds or {}
    for name, what in BASELINES.items():
        print(f"{name}: {what}")
    print(f"\nbare ONNX Runtime ceiling: {ceiling_rate:.0f} images/s at its best batch size; "
          f"single-image latency {single_ms:.2f} ms (the better of the measurements before and after)")
    for (images, conc), (rate, single) in sorted(rounds.items()):
        print(f"  ceiling in the round of c{conc} x {images}: {rate:.0f} images/s, single-image {single:.2f} ms")
    by = {(c.server, c.concurrency, c.images): c for c in cells}

    def ratio(c: Cell, base: str) -> str:
        b = by.get((base, c.concurrency, c.images))
        return f"{c.images_per_s / b.images_per_s:.2f}" if b and b is not c and b.images_per_s else "-"

    head = (f"{'server':<8} {'conc':>4} {'img/req':>7} {'req/s':>7} {'img/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'x ceil':>6} {'x best':>6} {'x repl':>6} {'x nv-t':>6} {'front ms/req':>12} {'cores':>5} {'err':>4}")
    print(head)
    print("-" * len(head))
    servers = list(dict.fromkeys(c.server for c in cells))
    for c in sorted(cells, key=lambda c: (servers.index(c.server), c.images, c.concurrency)):
        front = c.front_cpu_s / c.requests * 1e3 if c.requests else float("nan")
        print(f"{c.server:<8} {c.concurrency:>4} {c.images:>7} {c.requests / c.seconds:>7.0f} "
              f"{c.images_per_s:>7.0f} {c.pct(50):>7.2f} {c.pct(99):>7.2f} "
              f"{c.images_per_s / rounds.get((c.images, c.concurrency), (ceiling_rate,))[0]:>6.2f} "
              f"{c.images_per_s / ceiling_rate:>6.2f} {ratio(c, 'repl'):>6} {ratio(c, 'naive-t'):>6} "
              f"{front:>12.3f} {c.total_cpu_s / c.seconds:>5.2f} {c.errors:>4}")


def run_bench(args) -> int:
    concurrencies = list(args.concurrency)
    image_counts = list(args.images)
    rates, single_ms = ceiling(args.model_repository, args.model)
    print("ceiling images/s by batch size (before): " + ", ".join(f"{b}: {r:.0f}" for b, r in rates.items()))
    repo_arg = str(args.model_repository)
    servers: list[tuple[str, list[str] | None]] = [
        ("enserve", None if args.url else [*python_module("enserve", "serve"), "--model-repository",
                                           repo_arg, "--http-port", "{http}", "--grpc-port", "{port}",
                                           "--metrics-port", "{metrics}", *args.serve_args]),
    ]
    if not args.no_naive:
        servers += [
            ("repl", python_module("enserve.loadtest.replicated", repo_arg, "{port}")),
            ("naive-t", python_module("enserve.loadtest.naive", repo_arg, "{port}", "--tuned")),
            ("naive", python_module("enserve.loadtest.naive", repo_arg, "{port}")),
        ]
    # every server up at once (idle ones use no CPU), then each cell measured on each server in
    # turn: the machine's drift over the run then hits every server alike, not one of them
    running: list[tuple[str, str, int | None]] = []
    rounds: dict[tuple[int, int], tuple[float, float]] = {}  # (images, concurrency) -> ceiling img/s, single ms
    started = []
    cells: list[Cell] = []
    try:
        for label, template in servers:
            if template is None:
                running.append((label, args.url, None))
                continue
            http, port, metrics = free_ports(3)
            server = start_server([part.format(http=http, port=port, metrics=metrics) for part in template], port)
            started.append(server)
            running.append((label, server.grpc_url, server.pid))
        sig = signature(running[0][1], args.model)  # enserve's ModelMetadata
        best_batch = max(rates, key=rates.get)
        for k, (images, conc) in enumerate((i, c) for i in image_counts for c in concurrencies):
            measured: dict[str, list[Cell]] = {}
            for r in range(args.repeat):
                turn = (k + r) % len(running)
                for label, url, pid in running[turn:] + running[:turn]:  # who goes first rotates
                    measured.setdefault(label, []).append(
                        measure(label, url, args.model, conc, images, args.seconds, sig, pid=pid))
            cells += [median_cell(measured[label]) for label, *_ in running]
            # the ceiling of this round, measured right after its cells (the servers idle meanwhile)
            round_rates, round_single = ceiling(args.model_repository, args.model, tuple(sorted({1, best_batch})),
                                                seconds=1.0)
            rounds[(images, conc)] = (round_rates[best_batch], round_single)
    finally:
        for server in started:
            server.stop()
    # measured again after the servers: on a shared machine the better of the two is the honest bar
    after, single_after = ceiling(args.model_repository, args.model)
    print("ceiling images/s by batch size (after):  " + ", ".join(f"{b}: {r:.0f}" for b, r in after.items()))
    best = max(list(rates.items()) + list(after.items()), key=lambda kv: kv[1])
    print(f"(ceiling: best batch size {best[0]}, the better of the two measurements)")
    print_table(cells, best[1], min(single_ms, single_after), rounds)
    return 0
