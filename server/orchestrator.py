"""The orchestrator: spawns one worker per member, feeds them descriptors, averages their outputs.

Inputs are copied once into a shared input ring that every worker of the same input
signature reads; each worker writes its outputs into its own shared slots, indexed by the
same rows. The orchestrator accumulates a running sum (and sum of squares) per request as
members finish, and divides once when the last member is done.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from enserve.server.config import ServeOptions
from enserve.server.errors import (
    DeadlineExceeded,
    EnserveError,
    Internal,
    RepositoryError,
    ResourceExhausted,
    Unavailable,
)
from enserve.server.protocol import (
    STATUS_LOAD_FAILED,
    STATUS_OK,
    STATUS_READY,
    TASK,
    Done,
    DoneReader,
)
from enserve.server.repository import (
    ENTROPY_OUTPUT,
    VARIANCE_OUTPUT,
    MemberSpec,
    Repository,
    TensorSpec,
)
from enserve.server.rows import RowRing
from enserve.server.shm import Arena, arena_name
from enserve.server.stats import ModelStats
from enserve.server.worker import WorkerSpec

log = logging.getLogger("enserve")
F_SETPIPE_SZ = 1031
MAX_RING_ROWS = 16384


class RowSpace:
    """The shared input ring of one input signature."""

    def __init__(self, index: int, inputs: list[TensorSpec], capacity: int) -> None:
        self.inputs = inputs
        self.capacity = capacity
        self.arenas = [
            Arena(arena_name(os.getpid(), f"in{index}.{k}"), capacity * t.row_bytes, create=True)
            for k, t in enumerate(inputs)
        ]
        self.views = [a.array(t.np_dtype, (capacity, *t.dims)) for a, t in zip(self.arenas, inputs)]
        self.ring = RowRing(capacity)


@dataclass(eq=False)
class Member:
    """The orchestrator's side of one member worker."""

    spec: MemberSpec
    space: RowSpace
    cores: tuple[int, ...]
    threads: int
    stats: ModelStats
    out_arenas: list[Arena] = field(default_factory=list)
    out_views: list[np.ndarray] = field(default_factory=list)
    index: int = 0
    proc: subprocess.Popen | None = None
    task_w: int = -1
    lifeline_r: int = -1  # EOF when the worker is gone
    inflight: dict[int, tuple[int, int]] = field(default_factory=dict)
    held: list[tuple[int, int, int]] = field(default_factory=list)
    state: str = "starting"  # starting | ready | down
    down_reason: str = ""
    ready: asyncio.Future | None = None
    batch_ns: float = 0.0  # moving average of one batch's compute time (input + infer + output)
    outbox: list[bytes] = field(default_factory=list)  # descriptors written at the end of this loop turn

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(eq=False)
class Target:
    """A servable model: an ensemble, or one member on its own."""

    name: str
    kind: str  # "ensemble" | "member"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    members: list[Member]
    space: RowSpace
    max_batch_size: int
    stats: ModelStats
    inflight: int = 0


class Pending:
    __slots__ = (
        "rid", "target", "start", "count", "outstanding", "sums", "sumsq", "error",
        "future", "t0", "t_submit", "retried", "timer",
    )

    def __init__(self, rid: int, target: Target, start: int, count: int, future: asyncio.Future) -> None:
        self.rid = rid
        self.target = target
        self.start = start
        self.count = count
        self.outstanding = len(target.members)
        self.sums: list[np.ndarray] | None = None
        self.sumsq: np.ndarray | None = None
        self.error: EnserveError | None = None
        self.future = future
        self.t0 = 0
        self.t_submit = 0
        self.retried: set[str] | None = None
        self.timer: asyncio.TimerHandle | None = None


class Orchestrator:
    def __init__(self, repo: Repository, options: ServeOptions) -> None:
        self.repo = repo
        self.options = options
        self.stats: dict[str, ModelStats] = {}
        self.members: dict[str, Member] = {}
        self.by_index: list[Member] = []
        self.done_r = -1  # the completion pipe all workers write to
        self.done_w = -1
        self.done_reader = DoneReader()
        self.targets: dict[str, Target] = {}
        self.spaces: dict[tuple, RowSpace] = {}
        self.pending: dict[int, Pending] = {}
        self.next_id = 0
        self.closing = False
        self.drained: asyncio.Event | None = None  # set when closing and nothing is pending
        self.loop: asyncio.AbstractEventLoop | None = None
        self.flush_scheduled = False

    # ------------------------------------------------------------------ set-up

    def _space_for(self, inputs: list[TensorSpec], max_batch: int) -> RowSpace:
        key = tuple(inputs)
        if key not in self.spaces:
            row_bytes = sum(t.row_bytes for t in inputs)
            rows = (self.options.arena_mib << 20) // max(1, row_bytes)
            capacity = int(min(MAX_RING_ROWS, max(4 * max_batch, rows)))
            self.spaces[key] = RowSpace(len(self.spaces), inputs, capacity)
        return self.spaces[key]

    def _placement(self, spec: MemberSpec) -> tuple[str, tuple[int, ...]]:
        opts = self.options
        device = opts.device or spec.device
        cores = opts.cpu_cores or spec.cpu_cores or tuple(sorted(os.sched_getaffinity(0)))
        return device, tuple(cores)

    def build(self) -> None:
        """Create shared memory and the model table (no process yet)."""
        pid = os.getpid()
        max_batch = max([m.max_batch_size for m in self.repo.members.values()], default=1)
        sharing: dict[tuple[int, ...], int] = {}
        placements = {}
        for spec in self.repo.members.values():
            device, cores = self._placement(spec)
            spec.device = device
            if self.options.batch_size is not None:
                spec.batch_size = self.options.batch_size
            if self.options.queue_delay_us is not None:
                spec.queue_delay_us = self.options.queue_delay_us
            placements[spec.name] = cores
            if not device.startswith("gpu"):
                sharing[cores] = sharing.get(cores, 0) + 1
        for spec in self.repo.members.values():
            cores = placements[spec.name]
            threads = self.options.threads_per_member or max(1, len(cores) // sharing.get(cores, 1))
            stats = self.stats[spec.name] = ModelStats(spec.name)
            space = self._space_for(spec.inputs, max_batch)
            member = Member(spec, space, cores, threads, stats, index=len(self.by_index))
            self.by_index.append(member)
            for k, t in enumerate(spec.outputs):
                arena = Arena(arena_name(pid, f"out.{spec.name}.{k}"), space.capacity * t.row_bytes, create=True)
                member.out_arenas.append(arena)
                member.out_views.append(arena.array(t.np_dtype, (space.capacity, *t.dims)))
            self.members[spec.name] = member
            self.targets[spec.name] = Target(
                spec.name, "member", spec.inputs, spec.outputs, [member], space, spec.max_batch_size, stats
            )
        for ens in self.repo.ensembles.values():
            members = [self.members[n] for n in ens.members]
            stats = self.stats[ens.name] = ModelStats(ens.name)
            self.targets[ens.name] = Target(
                ens.name, "ensemble", ens.inputs, ens.outputs, members, members[0].space, ens.max_batch_size, stats
            )

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.build()
        self.done_r, self.done_w = os.pipe()
        os.set_blocking(self.done_r, False)
        self.loop.add_reader(self.done_r, self._on_done)
        for m in self.members.values():
            self._spawn(m)
        waiters = [m.ready for m in self.members.values()]
        done, _ = await asyncio.wait(waiters, timeout=self.options.startup_timeout_s)
        failed = [m for m in self.members.values() if m.state != "ready"]
        if failed:
            reasons = "; ".join(m.down_reason or f"member '{m.name}' did not start in time" for m in failed)
            raise RepositoryError(reasons)

    def _spawn(self, m: Member) -> None:
        task_r, task_w = os.pipe()
        lifeline_r, lifeline_w = os.pipe()
        try:
            fcntl.fcntl(task_w, F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass  # the default 64 KiB still holds thousands of descriptors
        env = dict(os.environ)
        device = m.spec.device
        if device.startswith("gpu"):
            env["CUDA_VISIBLE_DEVICES"] = device.partition(":")[2] or "0"
            device = "gpu:0"
        spec = WorkerSpec(
            member=m.name,
            model_path=str(m.spec.path),
            device=device,
            cpu_cores=list(m.cores),
            threads=m.threads,
            batch_size=m.spec.batch_size,
            queue_delay_us=m.spec.queue_delay_us,
            capacity=m.space.capacity,
            inputs=[(t.name, t.np_dtype.str, list(t.dims), a.name) for t, a in zip(m.space.inputs, m.space.arenas)],
            outputs=[(t.name, t.np_dtype.str, list(t.dims), a.name) for t, a in zip(m.spec.outputs, m.out_arenas)],
            task_fd=task_r,
            done_fd=self.done_w,
            lifeline_fd=lifeline_w,
            index=m.index,
        )
        try:
            m.proc = subprocess.Popen(
                [sys.executable, "-m", "enserve.server.worker", spec.to_json()],
                pass_fds=(task_r, self.done_w, lifeline_w), env=env,
            )
        finally:
            os.close(task_r)
            os.close(lifeline_w)
        m.task_w, m.lifeline_r = task_w, lifeline_r
        m.state = "starting"
        m.ready = self.loop.create_future()
        self.loop.add_reader(lifeline_r, self._on_lifeline, m)

    # ------------------------------------------------------------------ requests

    def queue_depth(self) -> dict[str, int]:
        return {t.name: t.inflight for t in self.targets.values()}

    def submit(self, target: Target, arrays: list[np.ndarray], count: int, timeout_s: float | None = None) -> Pending:
        """Copy the inputs into shared rows and hand the rows to every member of ``target``."""
        if self.closing:
            raise Unavailable("the server is shutting down")
        for m in target.members:
            if m.state == "down":
                raise Unavailable(f"member '{m.name}' of model '{target.name}' is unavailable: {m.down_reason}")
        if target.inflight >= self.options.max_inflight:
            target.stats.rejected += 1
            raise ResourceExhausted(
                f"model '{target.name}' has {target.inflight} requests in flight, the limit is "
                f"{self.options.max_inflight}; retry later"
            )
        t0 = time.perf_counter_ns()
        start = target.space.ring.alloc(count)
        if start is None:
            target.stats.rejected += 1
            raise ResourceExhausted(
                f"the shared input ring of model '{target.name}' is full ({target.space.capacity} rows); retry later"
            )
        for view, arr in zip(target.space.views, arrays):
            view[start : start + count] = arr
        rid = self.next_id
        self.next_id = (rid + 1) & 0xFFFFFFFF
        p = Pending(rid, target, start, count, self.loop.create_future())
        p.t0 = t0
        self.pending[rid] = p
        target.inflight += 1
        timeout = timeout_s if timeout_s is not None else self.options.request_timeout_s
        p.timer = self.loop.call_later(timeout, self._expire, p, timeout)
        members = target.members
        if len(members) > 1 and target.inflight > 1 and self.options.max_adaptive_wait_us > 0:
            slowest = max(m.batch_ns for m in members)
            for m in members:
                self._send(m, rid, start, count, self._wait_budget(m, slowest))
        else:
            for m in members:
                self._send(m, rid, start, count, 0)
        p.t_submit = time.perf_counter_ns()
        return p

    async def infer(self, target: Target, arrays: list[np.ndarray], count: int,
                    timeout_s: float | None = None) -> dict[str, np.ndarray]:
        p = self.submit(target, arrays, count, timeout_s)
        result = await p.future
        if isinstance(result, EnserveError):
            raise result
        return result

    def _wait_budget(self, m: Member, slowest_ns: float) -> int:
        """Microseconds member ``m`` may hold a request to fill its batch.

        Under concurrent load the ensemble answers when its slowest member does, so a faster
        member can wait for the difference in batch time without delaying any answer; bigger
        batches cost less CPU per image. A lone request (nothing else in flight) never waits.
        """
        return int(min(self.options.max_adaptive_wait_us, (slowest_ns - m.batch_ns) / 1000))

    def _send(self, m: Member, rid: int, start: int, count: int, wait_us: int = 0) -> None:
        """Queue a descriptor; all descriptors of one loop turn go out in one write per worker."""
        if m.state != "ready":
            m.held.append((rid, start, count))
            return
        m.outbox.append(TASK.pack(rid, start, count, wait_us))
        m.inflight[rid] = (start, count)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        for m in self.members.values():
            if m.outbox:
                data = b"".join(m.outbox)
                m.outbox.clear()
                if m.task_w >= 0:
                    os.write(m.task_w, data)

    def _expire(self, p: Pending, timeout: float) -> None:
        p.timer = None
        if not p.future.done():
            p.future.set_result(DeadlineExceeded(
                f"request to model '{p.target.name}' did not finish within {timeout:g} s"
            ))

    # ------------------------------------------------------------------ worker events

    def _on_done(self) -> None:
        """Completion frames of every worker, as many as one read brings."""
        try:
            chunk = os.read(self.done_r, 1 << 16)
        except BlockingIOError:
            return
        for frame in self.done_reader.feed(chunk):
            m = self.by_index[frame.member]
            if frame.status == STATUS_READY:
                self._worker_ready(m)
            elif frame.status == STATUS_LOAD_FAILED:
                m.down_reason = frame.message
            else:
                self._member_done(m, frame)

    def _on_lifeline(self, m: Member) -> None:
        try:
            if os.read(m.lifeline_r, 1):
                return  # never written; ignore
        except BlockingIOError:
            return
        self._on_done()  # frames the worker wrote before it went
        self._worker_exited(m)

    def _worker_ready(self, m: Member) -> None:
        m.state = "ready"
        if not m.ready.done():
            m.ready.set_result(True)
        held, m.held = m.held, []
        for rid, start, count in held:
            self._send(m, rid, start, count)

    def _member_done(self, m: Member, frame: Done) -> None:
        stats = m.stats
        n = len(frame.ids)
        stats.execution_count += 1
        stats.inference_count += frame.rows
        stats.touch()
        d = stats.durations
        d["queue"].add(frame.queue_ns, n)
        d["compute_input"].add(frame.input_ns * n, n)
        d["compute_infer"].add(frame.infer_ns * n, n)
        d["compute_output"].add(frame.output_ns * n, n)
        per_request = frame.input_ns + frame.infer_ns + frame.output_ns
        if frame.rows and frame.status == STATUS_OK:
            m.batch_ns += 0.1 * (per_request - m.batch_ns)
        d["success" if frame.status == STATUS_OK else "fail"].add(frame.queue_ns + per_request * n, n)
        for rid in frame.ids:
            if m.inflight.pop(rid, None) is None:
                continue
            p = self.pending.get(rid)
            if p is None:
                continue
            if frame.status != STATUS_OK:
                if p.error is None:
                    p.error = Internal(f"member '{m.name}' failed on this request: {frame.message}")
            elif p.error is None:
                self._accumulate(p, m)
            p.outstanding -= 1
            if p.outstanding == 0:
                self._finish(p)

    def _accumulate(self, p: Pending, m: Member) -> None:
        lo, hi = p.start, p.start + p.count
        if p.target.kind == "member":
            p.sums = [v[lo:hi].copy() for v in m.out_views]
            return
        first = m.out_views[0][lo:hi]
        if p.sums is None:
            p.sums = [v[lo:hi].astype(np.float64) for v in m.out_views]
            p.sumsq = np.square(p.sums[0])
        else:
            for acc, v in zip(p.sums, m.out_views):
                acc += v[lo:hi]
            p.sumsq += np.square(first, dtype=np.float64)

    def _finish(self, p: Pending) -> None:
        target = p.target
        del self.pending[p.rid]
        target.space.ring.free(p.start)
        target.inflight -= 1
        if p.timer is not None:
            p.timer.cancel()
        t_done = time.perf_counter_ns()
        stats = target.stats
        if p.error is None:
            try:
                outputs = self._combine(p)
            except Exception as exc:  # never leave a caller waiting
                p.error = Internal(f"combining member outputs failed: {exc}")
        t_end = time.perf_counter_ns()
        if target.kind == "ensemble":
            stats.touch()
            if p.error is None:
                stats.inference_count += p.count
                stats.execution_count += 1
                d = stats.durations
                d["success"].add(t_end - p.t0)
                d["queue"].add(0)
                d["compute_input"].add(p.t_submit - p.t0)
                d["compute_infer"].add(t_done - p.t_submit)
                d["compute_output"].add(t_end - t_done)
            else:
                stats.durations["fail"].add(t_end - p.t0)
        if not p.future.done():
            p.future.set_result(p.error if p.error is not None else outputs)
        if self.closing and not self.pending and self.drained is not None:
            self.drained.set()

    def _combine(self, p: Pending) -> dict[str, np.ndarray]:
        target = p.target
        if target.kind == "member":
            return {t.name: v for t, v in zip(target.outputs, p.sums)}
        n = len(target.members)
        out: dict[str, np.ndarray] = {}
        member_outputs = target.outputs[: len(p.sums)]
        for t, acc in zip(member_outputs, p.sums):
            acc /= n
            out[t.name] = acc.astype(t.np_dtype)
        mean = p.sums[0].reshape(p.count, -1)
        var = (p.sumsq.reshape(p.count, -1) / n - np.square(mean)).clip(min=0.0)
        out[VARIANCE_OUTPUT] = var.mean(axis=1, keepdims=True).astype(np.float32)
        out[ENTROPY_OUTPUT] = (-(mean * np.log(mean.clip(min=1e-12))).sum(axis=1, keepdims=True)).astype(np.float32)
        return out

    def _worker_exited(self, m: Member) -> None:
        self.loop.remove_reader(m.lifeline_r)
        for fd in (m.lifeline_r, m.task_w):
            if fd >= 0:
                os.close(fd)
        m.lifeline_r = m.task_w = -1
        code = m.proc.wait() if m.proc is not None else None
        if self.closing:
            m.state = "down"
            m.down_reason = "the server is shutting down"
            self._fail_all(m, Unavailable(m.down_reason))
            return
        if m.state == "starting":
            m.state = "down"
            m.down_reason = m.down_reason or f"member '{m.name}' worker exited with code {code} while loading"
            log.error("%s", m.down_reason)
            if not m.ready.done():
                m.ready.set_result(False)
            self._fail_all(m, Unavailable(m.down_reason))
            return
        log.warning("worker of member '%s' exited with code %s; restarting it", m.name, code)
        retry: list[tuple[int, int, int]] = []
        for rid, (start, count) in m.inflight.items():
            p = self.pending.get(rid)
            if p is None:
                continue
            if p.retried and m.name in p.retried:
                self._drop(p, Unavailable(
                    f"the worker of member '{m.name}' died twice while computing this request"
                ))
            else:
                p.retried = (p.retried or set()) | {m.name}
                retry.append((rid, start, count))
        m.inflight.clear()
        m.outbox.clear()
        m.held = retry + m.held
        self._spawn(m)

    def _drop(self, p: Pending, error: EnserveError) -> None:
        """One member will never answer ``p``."""
        if p.error is None:
            p.error = error
        p.outstanding -= 1
        if p.outstanding == 0:
            self._finish(p)

    def _fail_all(self, m: Member, error: EnserveError) -> None:
        items = [rid for rid in m.inflight] + [rid for rid, _, _ in m.held]
        m.inflight.clear()
        m.held.clear()
        for rid in items:
            p = self.pending.get(rid)
            if p is not None:
                self._drop(p, error)

    # ------------------------------------------------------------------ shut-down

    async def close(self) -> None:
        """Finish what is in flight (bounded), stop the workers, unlink shared memory."""
        self.closing = True
        if self.pending:
            self.drained = asyncio.Event()
            try:
                await asyncio.wait_for(self.drained.wait(), self.options.drain_timeout_s)
            except asyncio.TimeoutError:
                log.warning("%d requests still in flight after %g s; stopping anyway",
                            len(self.pending), self.options.drain_timeout_s)
        for m in self.members.values():
            if m.task_w >= 0:
                os.close(m.task_w)  # EOF: the worker finishes its batch and exits
                m.task_w = -1
        for m in self.members.values():
            if m.proc is None:
                continue
            try:
                await asyncio.wait_for(asyncio.to_thread(m.proc.wait), 5)
            except asyncio.TimeoutError:
                m.proc.kill()
                m.proc.wait()
            if m.lifeline_r >= 0:
                self.loop.remove_reader(m.lifeline_r)
                os.close(m.lifeline_r)
                m.lifeline_r = -1
        if self.done_r >= 0:
            self.loop.remove_reader(self.done_r)
            os.close(self.done_r)
            os.close(self.done_w)
            self.done_r = self.done_w = -1
        for p in list(self.pending.values()):
            if not p.future.done():
                p.future.set_result(Unavailable("the server shut down before this request finished"))
        self.pending.clear()
        self.release_memory()

    def release_memory(self) -> None:
        for m in self.members.values():
            for a in m.out_arenas:
                a.close()
        for s in self.spaces.values():
            for a in s.arenas:
                a.close()

    def worker_pids(self) -> dict[str, int]:
        return {m.name: m.proc.pid for m in self.members.values() if m.proc is not None}
