"""A member worker: one child process per ensemble member, pinned to its device.

It builds its ONNX Runtime session inside the child, reads input rows straight from the
shared input ring, writes its outputs into its own shared output slots, and talks to the
orchestrator only through fixed-size descriptors (``server.protocol``).
Run as ``python -m enserve.server.worker '<json spec>'``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from enserve.server.protocol import (
    STATUS_ERROR,
    STATUS_LOAD_FAILED,
    STATUS_OK,
    STATUS_READY,
    TaskReader,
    pack_done,
)
from enserve.server.shm import Arena


@dataclass
class WorkerSpec:
    """What the orchestrator tells a worker (JSON on its command line)."""

    member: str
    model_path: str
    device: str  # "cpu" or "gpu:<index>"
    cpu_cores: list[int] | None
    threads: int
    batch_size: int
    queue_delay_us: int
    capacity: int  # rows in the shared ring
    inputs: list[tuple[str, str, list[int], str]]  # name, numpy dtype, dims, arena name
    outputs: list[tuple[str, str, list[int], str]]
    task_fd: int
    done_fd: int  # shared by all workers: frames are atomic writes
    lifeline_fd: int  # held open, never written: its EOF tells the orchestrator we are gone
    index: int  # this member's index in the orchestrator's table

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


def build_session(spec: WorkerSpec):
    """An ONNX Runtime session for the member on its device; raises with what is missing."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, spec.threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if spec.device.startswith("gpu"):
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(
                f"member '{spec.member}' is placed on {spec.device}, but onnxruntime offers only "
                f"{available}: install onnxruntime-gpu (pip install 'enserve[gpu]') on a machine with "
                "an NVIDIA driver, or place the member on a CPU device"
            )
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if "TensorrtExecutionProvider" in available:
            providers.insert(0, "TensorrtExecutionProvider")
    else:
        providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(spec.model_path, options, providers=providers)


def collect(
    fd: int,
    reader: TaskReader,
    backlog: deque,
    batch_size: int,
    delay_s: float,
) -> list[tuple[int, int, int, int, int]]:
    """Block for the first task, then gather up to ``batch_size`` rows for at most ``delay_s``,
    or for the first task's wait budget when that is longer.

    Tasks are (request id, first row, rows, wait budget us, arrival ns). Raises EOFError when
    the orchestrator closed the pipe and nothing is left.
    """

    def read_some() -> bool:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return False
        now = time.perf_counter_ns()
        backlog.extend((*t, now) for t in reader.feed(chunk))
        return True

    open_pipe = True
    while not backlog:
        if not read_some():
            raise EOFError
    deadline = time.monotonic() + max(delay_s, backlog[0][3] / 1e6)
    rows = sum(t[2] for t in backlog)
    while open_pipe and rows < batch_size:
        timeout = deadline - time.monotonic()
        if timeout <= 0 or not select.select([fd], [], [], timeout)[0]:
            break
        before = len(backlog)
        open_pipe = read_some()
        rows += sum(backlog[i][2] for i in range(before, len(backlog)))
    batch = [backlog.popleft()]
    taken = batch[0][2]
    while backlog and taken + backlog[0][2] <= batch_size:
        taken += backlog[0][2]
        batch.append(backlog.popleft())
    return batch


class Runner:
    """Runs a batch of tasks through the session, reading and writing shared rows."""

    def __init__(self, spec: WorkerSpec, session) -> None:
        self.spec = spec
        self.session = session
        self.arenas: list[Arena] = []
        self.inputs = [self._view(a) for a in spec.inputs]
        self.outputs = [self._view(a) for a in spec.outputs]
        self.input_names = [a[0] for a in spec.inputs]
        self.output_names = [a[0] for a in spec.outputs]

    def _view(self, entry: tuple[str, str, list[int], str]) -> np.ndarray:
        _, dtype, dims, arena_name = entry
        arena = Arena(arena_name, 0, create=False)
        self.arenas.append(arena)
        return arena.array(np.dtype(dtype), (self.spec.capacity, *dims))

    def run(self, batch: list[tuple[int, int, int, int, int]]) -> tuple[int, int, int, int]:
        """Compute the batch; returns (queue, input, infer, output) nanoseconds."""
        t0 = time.perf_counter_ns()
        queue_ns = sum(t0 - t[4] for t in batch)
        first, total = batch[0][1], sum(t[2] for t in batch)
        contiguous = all(batch[i][1] == batch[i - 1][1] + batch[i - 1][2] for i in range(1, len(batch)))
        if contiguous:
            feeds = [arr[first : first + total] for arr in self.inputs]
        else:
            feeds = [np.concatenate([arr[s : s + n] for _, s, n, *_ in batch]) for arr in self.inputs]
        t1 = time.perf_counter_ns()
        step = self.spec.batch_size
        results: list[list[np.ndarray]] = []
        for lo in range(0, total, step):
            feed = {name: f[lo : lo + step] for name, f in zip(self.input_names, feeds)}
            results.append(self.session.run(self.output_names, feed))
        t2 = time.perf_counter_ns()
        for k, out in enumerate(self.outputs):
            values = results[0][k] if len(results) == 1 else np.concatenate([r[k] for r in results])
            if values.shape[0] != total:
                raise RuntimeError(f"output '{self.output_names[k]}' has {values.shape[0]} rows for {total} inputs")
            if contiguous:
                out[first : first + total] = values
            else:
                lo = 0
                for _, s, n, *_ in batch:
                    out[s : s + n] = values[lo : lo + n]
                    lo += n
        t3 = time.perf_counter_ns()
        return queue_ns, t1 - t0, t2 - t1, t3 - t2


def serve(spec: WorkerSpec, runner: Runner) -> None:
    reader = TaskReader()
    backlog: deque = deque()
    delay = spec.queue_delay_us / 1e6
    while True:
        try:
            batch = collect(spec.task_fd, reader, backlog, spec.batch_size, delay)
        except EOFError:
            return
        ids = [t[0] for t in batch]
        rows = sum(t[2] for t in batch)
        try:
            times = runner.run(batch)
        except Exception as exc:  # the request fails, the worker keeps serving
            os.write(spec.done_fd, pack_done(spec.index, STATUS_ERROR, ids, f"{type(exc).__name__}: {exc}", rows))
            continue
        os.write(spec.done_fd, pack_done(spec.index, STATUS_OK, ids, "", rows, times))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = WorkerSpec(**json.loads(argv[0]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator decides when we stop
    try:
        if spec.cpu_cores and not spec.device.startswith("gpu"):
            os.sched_setaffinity(0, spec.cpu_cores)
        runner = Runner(spec, build_session(spec))
        # one warm-up run so the first request does not pay for lazy initialisation
        warm = {n: np.zeros((1, *d), dtype=np.dtype(t)) for n, t, d, _ in spec.inputs}
        runner.session.run(runner.output_names, warm)
    except Exception as exc:
        msg = f"member '{spec.member}' failed to load from {spec.model_path}: {type(exc).__name__}: {exc}"
        os.write(spec.done_fd, pack_done(spec.index, STATUS_LOAD_FAILED, (), msg))
        return 1
    os.write(spec.done_fd, pack_done(spec.index, STATUS_READY))
    serve(spec, runner)
    return 0


if __name__ == "__main__":
    sys.exit(main())
