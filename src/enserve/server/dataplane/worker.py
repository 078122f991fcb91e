"""A worker: one child process of a worker group, pinned to its device, hosting one or more members.

It builds its members' ONNX Runtime sessions inside the child, reads input rows straight from the
shared input ring, runs the members a task names back to back on the same batch, and writes
their running sum (and the first output's sum of squares) into its own shared output slots.
It talks to the orchestrator only through fixed-size descriptors (``server.protocol``); its ready
frame carries one image's compute per member, which balances a lone request's members over
idle replicas.
Run as ``python -m enserve.server.dataplane.worker '<json spec>'``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

from enserve import combiners
from enserve.optimizer.sessions import session_for
from enserve.server.dataplane.shm import Arena
from enserve.server.protocol import (
    BURST,
    FLAGS,
    SPACE_MASK,
    SPACE_SHIFT,
    STATUS_CANCELLED,
    STATUS_ERROR,
    STATUS_LOAD_FAILED,
    STATUS_OK,
    STATUS_READY,
    WEIGHTED,
    TaskReader,
    pack_done,
    write_done,
)

Slot = tuple[str, str, list[int], str]  # name, numpy dtype, dims, arena name
WORKER_MODULE = "enserve.server.dataplane.worker"  # started as python -P -m WORKER_MODULE '<WorkerSpec JSON>'


@dataclass
class WorkerSpec:
    """What the orchestrator tells a worker (JSON on its command line)."""

    members: list[tuple[str, str]]  # (name, model path) in mask-bit order
    device: str  # "cpu" or "gpu:<index>"
    cpu_cores: list[int] | None
    threads: int
    batch_size: int
    queue_delay_us: int
    capacity: int  # rows in the shared ring
    inputs: list[Slot]
    live: str  # arena of the ring's live flags (uint8 per row): tasks on rows reading 0 are skipped
    outputs: list[Slot]  # the group's sums, one per output, then the first output's squares
    task_fd: int
    done_fd: int  # shared by all workers: frames are atomic writes
    lifeline_fd: int  # held open, never written: its EOF tells the orchestrator we are gone
    index: int  # this worker's index in the orchestrator's table
    burst_threads: int = 0  # >threads: also sessions with this many threads, for tasks flagged BURST
    weights: list[float] | None = None  # per member: its ensemble weight, for tasks flagged WEIGHTED

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        return cls(**json.loads(text))

    @property
    def label(self) -> str:
        return "+".join(name for name, _ in self.members)


def build_sessions(spec: WorkerSpec, threads: int) -> list:
    """An ONNX Runtime session per member on the worker's device; raises with what is missing."""
    return [session_for(path, threads=max(1, threads), device=spec.device, what=f"member '{name}'")
            for name, path in spec.members]


def collect(
    fd: int,
    reader: TaskReader,
    backlog: deque,
    batch_size: int,
    delay_s: float,
    live: np.ndarray | None = None,
    skipped: list[int] | None = None,
) -> list[tuple[int, int, int, int, int, int]]:
    """Block for the first task, then gather up to ``batch_size`` rows for at most ``delay_s``,
    or for the first task's wait budget when that is longer.

    Tasks are (task id, first row, rows, wait budget us, member mask, arrival ns). A task whose first
    row is not ``live`` (its request was cancelled) is not run: its id goes to ``skipped``, when it
    is read and again when the batch is taken; an empty batch comes back when only such tasks came,
    so that they are reported at once. Raises EOFError when the orchestrator closed the pipe and
    nothing is left.
    """

    if skipped is None:
        skipped = []  # (a caller passing ``live`` passes its list, to report what was skipped)

    def is_live(t) -> bool:
        if live is None or live[t[1]]:
            return True
        skipped.append(t[0])
        return False

    def read_some() -> bool:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return False
        now = time.perf_counter_ns()
        backlog.extend((*t, now) for t in reader.feed(chunk) if is_live(t))
        return True

    open_pipe = True
    while not backlog:
        if not read_some():
            raise EOFError
        if skipped and not backlog:
            return []
    deadline = time.monotonic() + max(delay_s, backlog[0][3] / 1e6)
    rows = sum(t[2] for t in backlog)
    while open_pipe and rows < batch_size:
        timeout = deadline - time.monotonic()
        if timeout <= 0 or not select.select([fd], [], [], timeout)[0]:
            break
        before = len(backlog)
        open_pipe = read_some()
        rows += sum(backlog[i][2] for i in range(before, len(backlog)))
    batch = []
    taken = 0
    while backlog and (not batch or taken + backlog[0][2] <= batch_size):
        task = backlog.popleft()
        if is_live(task):  # cancelled while it waited
            taken += task[2]
            batch.append(task)
    return batch


class Runner:
    """Runs a batch of tasks through the members they name, reading and writing shared rows."""

    def __init__(self, spec: WorkerSpec, sessions: list, burst: list | None = None) -> None:
        self.spec = spec
        self.sessions = sessions
        self.burst = burst or sessions  # for a task alone on the worker's cores: more threads
        self.arenas: list[Arena] = []
        self.inputs = [self._view(a) for a in spec.inputs]
        self.live = self._view(("live", "|u1", [], spec.live))
        slots = [self._view(a) for a in spec.outputs]
        self.sums, self.squares = slots[:-1], slots[-1]
        self.input_names = [a[0] for a in spec.inputs]
        self.output_names = [a[0] for a in spec.outputs[:-1]]

    def _view(self, entry: Slot) -> np.ndarray:
        _, dtype, dims, arena_name = entry
        arena = Arena(arena_name, 0, create=False)
        self.arenas.append(arena)
        return arena.array(np.dtype(dtype), (self.spec.capacity, *dims))

    def run(self, batch: list[tuple[int, int, int, int, int, int]]) -> tuple[int, int, int, int]:
        """Compute the batch; returns (queue, input, infer, output) nanoseconds."""
        t0 = time.perf_counter_ns()
        queue_ns = sum(t0 - t[5] for t in batch)
        by_mask: dict[int, list] = {}
        for t in batch:
            by_mask.setdefault(t[4], []).append(t)
        input_ns = infer_ns = output_ns = 0
        for flagged, tasks in by_mask.items():
            sessions = self.burst if flagged & BURST and len(batch) == 1 else self.sessions
            mask = flagged & ~FLAGS
            weights = self.spec.weights if flagged & WEIGHTED else None
            space = (flagged & SPACE_MASK) >> SPACE_SHIFT
            t1 = time.perf_counter_ns()
            first, total = tasks[0][1], sum(t[2] for t in tasks)
            contiguous = all(tasks[i][1] == tasks[i - 1][1] + tasks[i - 1][2] for i in range(1, len(tasks)))
            if contiguous:
                feeds = [arr[first : first + total] for arr in self.inputs]
            else:
                feeds = [np.concatenate([arr[s : s + n] for _, s, n, *_ in tasks]) for arr in self.inputs]
            t2 = time.perf_counter_ns()
            input_ns += t2 - t1
            written = False
            for k, session in enumerate(sessions):
                if not mask >> k & 1:
                    continue
                t2 = time.perf_counter_ns()
                values = self._infer(session, feeds, total)
                t3 = time.perf_counter_ns()
                self._store(values, tasks, first, total, contiguous, add=written, space=space,
                            scale=None if weights is None else weights[k])
                written = True
                t4 = time.perf_counter_ns()
                infer_ns += t3 - t2
                output_ns += t4 - t3
        return queue_ns, input_ns, infer_ns, output_ns

    def _infer(self, session, feeds: list[np.ndarray], total: int) -> list[np.ndarray]:
        step = self.spec.batch_size
        results = []
        for lo in range(0, total, step):
            results.append(session.run(self.output_names,
                                       {name: f[lo : lo + step] for name, f in zip(self.input_names, feeds)}))
        values = results[0] if len(results) == 1 else [np.concatenate(r) for r in zip(*results)]
        for name, v in zip(self.output_names, values):
            if v.shape[0] != total:
                raise RuntimeError(f"output '{name}' has {v.shape[0]} rows for {total} inputs")
        return values

    def _store(self, values: list[np.ndarray], tasks: list, first: int, total: int, contiguous: bool,
               add: bool, space: int = 0, scale: float | None = None) -> None:
        """Write (first member) or add (the others) each output's term in the combiner's ``space``
        (``combiners.member_terms``: the output itself for a mean) and the first term's square; with
        ``scale`` (the member's weight w): w t and w t^2."""
        values, square = combiners.member_terms(values, space, scale)
        pairs = [*zip(self.sums, values), (self.squares, square)]
        for slot, v in pairs:
            if contiguous:
                rows = slot[first : first + total]
                if add:
                    rows += v
                else:
                    rows[...] = v
                continue
            lo = 0
            for _, s, n, *_ in tasks:
                if add:
                    slot[s : s + n] += v[lo : lo + n]
                else:
                    slot[s : s + n] = v[lo : lo + n]
                lo += n


def member_cost(session, output_names: list[str], feeds: dict, runs: int = 5) -> int:
    """Nanoseconds one image takes through ``session`` (the fastest of a few runs)."""
    best = None
    for _ in range(runs):
        t = time.perf_counter_ns()
        session.run(output_names, feeds)
        best = min(best or 1 << 62, time.perf_counter_ns() - t)
    return best


def serve(spec: WorkerSpec, runner: Runner) -> None:
    reader = TaskReader()
    backlog: deque = deque()
    skipped: list[int] = []
    delay = spec.queue_delay_us / 1e6
    while True:
        try:
            batch = collect(spec.task_fd, reader, backlog, spec.batch_size, delay, runner.live, skipped)
        except EOFError:
            return
        finally:
            if skipped:  # their rows go back to the ring as soon as we say so
                write_done(spec.done_fd, pack_done(spec.index, STATUS_CANCELLED, skipped))
                skipped.clear()
        if not batch:
            continue
        ids = [t[0] for t in batch]
        rows = sum(t[2] for t in batch)
        try:
            times = runner.run(batch)
        except Exception as exc:  # the request fails, the worker keeps serving
            write_done(spec.done_fd, pack_done(spec.index, STATUS_ERROR, ids, f"{type(exc).__name__}: {exc}", rows))
            continue
        write_done(spec.done_fd, pack_done(spec.index, STATUS_OK, ids, "", rows, times))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = WorkerSpec.from_json(argv[0])
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C or a stop sent to the whole process group:
        signal.signal(sig, signal.SIG_IGN)  # the orchestrator decides when we stop (EOF on our task pipe)
    try:
        if spec.cpu_cores and not spec.device.startswith("gpu"):
            os.sched_setaffinity(0, spec.cpu_cores)
        sessions = build_sessions(spec, spec.threads)
        burst = build_sessions(spec, spec.burst_threads) if spec.burst_threads > spec.threads else None
        runner = Runner(spec, sessions, burst)
        # one warm-up run so the first request does not pay for lazy initialisation
        warm = {n: np.zeros((1, *d), dtype=np.dtype(t)) for n, t, d, _ in spec.inputs}
        for session in sessions + (burst or []):
            session.run(runner.output_names, warm)
        costs = [member_cost(session, runner.output_names, warm) for session in sessions]
    except Exception as exc:
        paths = ", ".join(path for _, path in spec.members)
        msg = f"member '{spec.label}' failed to load from {paths}: {type(exc).__name__}: {exc}"
        write_done(spec.done_fd, pack_done(spec.index, STATUS_LOAD_FAILED, (), msg))
        return 1
    write_done(spec.done_fd, pack_done(spec.index, STATUS_READY, (), json.dumps(costs)))
    serve(spec, runner)
    return 0


if __name__ == "__main__":
    sys.exit(main())
