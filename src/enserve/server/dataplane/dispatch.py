"""Descriptors out, completions in: which replica gets a task, how long it may wait to fill a batch,
one write per worker per event-loop turn (never blocking: what a full pipe cannot take waits for
room), the tasks each worker holds, and the completion frames read back.

Two rules keep an answer from ever being computed from someone else's rows or slots: a task holds
its request's rows in the ring until its worker says it is done or skipped it (``slots``), and a
worker never holds two tasks of one request on the same rows at once (its output slots keep one
answer per row until the orchestrator has read it): a retried task that would is deferred behind
the other."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable, Sequence

from enserve.server.dataplane.request import InflightRequest
from enserve.server.dataplane.runtime import GroupRuntime
from enserve.server.dataplane.supervisor import WorkerProcess, WorkerState
from enserve.server.protocol import BURST, COMBINE, FLAGS, TASK, Done, DoneReader, Task

log = logging.getLogger("enserve")
MAX_QUEUED_TASKS = 4096  # per replica: beyond this on every replica of a group, new requests are refused


def overlaps(w: WorkerProcess, task: Task) -> bool:
    """Whether ``w`` holds a task of the same request on any of ``task``'s rows."""
    end = task.start + task.count
    return any(t.rid == task.rid and t.start < end and task.start < t.start + t.count for t in w.tasks.values())


def wait_budget(max_wait_us: int, slowest_ns: float, own_ns: float) -> int:
    """Microseconds a group may hold a request to fill its batch.

    Under concurrent load the ensemble answers when its slowest group does, so a faster group
    can wait for the difference in batch time without delaying any answer; bigger batches cost
    less CPU per image. Never negative, never above ``max_wait_us``."""
    return int(max(0.0, min(float(max_wait_us), (slowest_ns - own_ns) / 1000)))


QUIET_LOAD = 1.5  # below this many requests in flight on average, a lone request may use every core


def recent_load(previous: float, in_flight: int, weight: float = 0.1) -> float:
    """The requests in flight that recent arrivals found, counting themselves (an exponential
    average over about ten arrivals). One client in a closed loop keeps it at 1; four keep it
    near 2-4 even when one of their requests finds the server empty between answers, where
    giving it every core (``BURST``) would take them from the requests about to follow."""
    return previous + weight * (in_flight - previous)


def split_members(costs: Sequence[float], mask: int, shares: int) -> list[int]:
    """The members in ``mask`` dealt into at most ``shares`` masks of near-equal cost (longest first,
    each to the lightest share; ties to the earlier share), for one request that idle replicas
    run side by side. Empty shares are left out; costs are one image's compute per member."""
    if shares < 1:
        raise ValueError(f"shares is {shares}, but must be >= 1")
    members = sorted((k for k in range(len(costs)) if mask >> k & 1), key=lambda k: (-costs[k], k))
    loads = [0.0] * min(shares, len(members))
    masks = [0] * len(loads)
    for k in members:
        i = loads.index(min(loads))
        loads[i] += costs[k]
        masks[i] |= 1 << k
    return masks


def shares(start: int, count: int, idle: int, costs: Sequence[float], mask: int,
           alone: bool) -> list[tuple[int, int, int]]:
    """How ``idle`` idle replicas of a group run its part of one request side by side: (first row,
    rows, member mask) each. Several rows are split between them; the one row of a request
    ``alone`` in the server has its members dealt by cost (``split_members``), the heaviest share
    keeping a ``BURST`` flag. Otherwise (one idle replica, no costs measured yet, or other requests
    in flight, which rows-based replica choice could not balance) the part stays whole."""
    if idle >= 2 and count > 1:
        n = min(idle, count)
        out, lo = [], start
        for k in range(n):
            rows = (count - (lo - start)) // (n - k)
            out.append((lo, rows, mask & ~BURST))
            lo += rows
        return out
    if idle >= 2 and costs and alone:
        masks = split_members(costs, mask & ~FLAGS, idle)
        return [(start, count, m | (mask & COMBINE) | (mask & BURST if k == 0 else 0)) for k, m in enumerate(masks)]
    return [(start, count, mask)]


def hung_for(waiting_since: float | None, now: float, limit_s: float) -> float | None:
    """How long a worker has been silent while holding tasks, when that is beyond ``limit_s``; else
    None. ``waiting_since`` is when it last answered anything, or was handed its oldest task if
    that came later (``Dispatch.waiting_since``); None when it holds nothing."""
    if waiting_since is None or now - waiting_since <= limit_s:
        return None
    return now - waiting_since


def least_loaded(workers: Iterable[WorkerProcess]) -> WorkerProcess | None:
    """The ready replica with the fewest rows in flight (the first of equals), or None."""
    best = None
    for w in workers:
        if w.state is WorkerState.READY and (best is None or w.rows < best.rows):
            best = w
    return best


class Dispatch:
    def __init__(self, loop: asyncio.AbstractEventLoop, done_r: int,
                 mask_cost: Callable[[int, int], float] | None = None) -> None:
        self.loop = loop
        self.done_r = done_r
        self.reader = DoneReader()
        self.outbox: dict[WorkerProcess, list[bytes]] = {}
        self.flush_scheduled = False
        self.next_task = 0
        self.out = 0  # tasks handed to a worker and not yet done, skipped or dropped (0: every replica idle)
        # (group, member mask) -> one image's compute through those members (0 until measured); None:
        # no served front, nothing to predict, and no work counted on the hot path
        self.mask_cost = mask_cost

    def task_ns(self, w: WorkerProcess, task: Task) -> float:
        """``task``'s compute on ``w`` at its members' one-image costs (0 before they are measured, or
        when nothing predicts)."""
        if self.mask_cost is None:
            return 0.0
        return task.count * self.mask_cost(w.group, task.mask & ~FLAGS)

    def send(self, w: WorkerProcess, task: Task, wait_us: int = 0) -> None:
        """Give ``w`` a task under a task id of its own (a request split over replicas, or retried,
        may have several tasks on one worker). Descriptors of one loop turn go out in one write per
        worker."""
        tid = self.next_task
        self.next_task = (tid + 1) & 0xFFFFFFFF
        w.tasks[tid] = task
        self.out += 1
        w.sent_at[tid] = self.loop.time()
        w.rows += task.count
        w.work_ns += self.task_ns(w, task)
        self.outbox.setdefault(w, []).append(TASK.pack(tid, task.start, task.count, wait_us, task.mask))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def route(self, rt: GroupRuntime, task: Task, wait_us: int = 0) -> None:
        """A new request's task to the least-loaded ready replica of ``rt``; with none ready yet, the
        first that starts takes it."""
        w = least_loaded(rt.workers)
        if w is None:
            rt.held.append(task)
        else:
            self.send(w, task, wait_us)

    def reroute(self, rt: GroupRuntime, task: Task) -> None:
        """A task computed again (its worker died) or held until a replica was ready: to the
        least-loaded ready replica that holds no task of its request on its rows, or else deferred
        behind that task on the least loaded one; held while no replica is ready."""
        ready = [w for w in rt.workers if w.state is WorkerState.READY]
        if not ready:
            rt.held.append(task)
            return
        w = least_loaded(x for x in ready if not overlaps(x, task))
        if w is not None:
            self.send(w, task)
        else:
            least_loaded(ready).deferred.append(task)

    def send_part(self, rt: GroupRuntime, request: InflightRequest, mask: int, alone: bool, wait_us: int) -> int:
        """A group's part of a new request: shared out over the group's idle replicas (``shares``),
        or whole to the least-loaded one. Returns how many tasks it became."""
        idle = [w for w in rt.workers if w.state is WorkerState.READY and w.rows == 0]
        parts = shares(request.start, request.count, len(idle), rt.member_ns, mask, alone)
        if len(parts) == 1:
            self.route(rt, Task(request.rid, request.start, request.count, mask, request.start), wait_us)
            return 1
        for w, (start, count, share) in zip(idle, parts):
            self.send(w, Task(request.rid, start, count, share, request.start), wait_us)
        return len(parts)

    @staticmethod
    def queued(rt: GroupRuntime) -> int:
        """Tasks of ``rt`` not yet done or skipped: held, deferred or at a replica (live or cancelled)."""
        return len(rt.held) + sum(len(w.tasks) + len(w.deferred) for w in rt.workers)

    @staticmethod
    def waiting_since(w: WorkerProcess) -> float | None:
        """Since when ``w`` owes an answer: it holds tasks (live or cancelled: a working worker skips
        a cancelled one at once) and has written no frame since the later of its last frame and its
        oldest task. None when it holds nothing. A worker that answers anything is not hung."""
        if not w.sent_at:
            return None
        return max(min(w.sent_at.values()), w.heard_at)

    def heard(self, w: WorkerProcess) -> None:
        """``w`` wrote a frame (ready, done, failed or skipped)."""
        w.heard_at = self.loop.time()

    def saturated(self, rt: GroupRuntime) -> bool:
        """Whether every replica of ``rt`` (or its held list, while none is ready) has
        ``MAX_QUEUED_TASKS`` tasks: admission refuses new requests for it then."""
        ready = [w for w in rt.workers if w.state is WorkerState.READY]
        if not ready:
            return len(rt.held) >= MAX_QUEUED_TASKS
        return all(len(w.tasks) + len(w.deferred) >= MAX_QUEUED_TASKS for w in ready)

    def flush(self) -> None:
        self.flush_scheduled = False
        outbox, self.outbox = self.outbox, {}
        for w, descriptors in outbox.items():
            if w.task_w < 0:
                continue  # gone: its exit hands its tasks on
            data = b"".join(descriptors)
            if w.unsent:  # earlier descriptors still wait for room: keep the order
                w.unsent += data
            else:
                self._write(w, data)

    def _write(self, w: WorkerProcess, data: bytes | bytearray) -> None:
        """As much of ``data`` as the pipe takes now; the rest waits in ``w.unsent`` and goes out when
        the pipe has room (a descriptor cut in two is reassembled by the worker's reader)."""
        try:
            n = os.write(w.task_w, data)
        except BlockingIOError:
            n = 0
        except OSError as exc:  # a dead worker must not hold up the others' descriptors
            log.warning("cannot hand tasks to %s: %s", w.label, exc)
            return
        if n < len(data):
            w.unsent[:] = memoryview(data)[n:]
            self.loop.add_writer(w.task_w, self._resume, w)

    def _resume(self, w: WorkerProcess) -> None:
        try:
            n = os.write(w.task_w, w.unsent)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("cannot hand tasks to %s: %s", w.label, exc)
            n = len(w.unsent)
        del w.unsent[:n]
        if not w.unsent:
            self.loop.remove_writer(w.task_w)

    def finished(self, w: WorkerProcess, tid: int) -> Task | None:
        """Task ``tid`` of ``w`` is over (done, failed or skipped): the task, or None if not ``w``'s.
        Tasks deferred behind it go out now."""
        task = w.tasks.pop(tid, None)
        if task is None:
            return None
        self.out -= 1
        w.sent_at.pop(tid, None)
        w.rows -= task.count
        w.work_ns = max(0.0, w.work_ns - self.task_ns(w, task)) if w.tasks else 0.0
        if w.deferred:
            waiting, w.deferred = w.deferred, []
            for t in waiting:
                if overlaps(w, t):
                    w.deferred.append(t)
                else:
                    self.send(w, t)
        return task

    @staticmethod
    def abandon(w: WorkerProcess) -> None:
        """``w`` is being killed as hung: its tasks no longer count as waiting (its exit hands them on)."""
        w.sent_at.clear()

    @staticmethod
    def take_held(rt: GroupRuntime) -> list[Task]:
        """The tasks held while no replica of ``rt`` was ready, for the caller to route or drop."""
        held, rt.held = rt.held, []
        return held

    def dropped(self, w: WorkerProcess) -> list[Task]:
        """``w`` is gone: the tasks it held (and those deferred behind them), for the caller to hand on;
        descriptors not yet written to it are dropped (its restarted process must not get them)."""
        self.outbox.pop(w, None)
        self.out -= len(w.tasks)
        tasks = [*w.tasks.values(), *w.deferred]
        w.tasks.clear()
        w.sent_at.clear()
        w.deferred.clear()
        w.unsent.clear()
        w.rows = 0
        w.work_ns = 0.0
        return tasks

    def completions(self) -> list[Done]:
        """Every frame one read brings (workers share the pipe; each frame is one atomic write)."""
        try:
            chunk = os.read(self.done_r, 1 << 16)
        except BlockingIOError:
            return []
        return self.reader.feed(chunk)
