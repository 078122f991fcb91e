"""Descriptors out, completions in: which replica gets a batch, how long it may wait to fill it,
one write per worker per event-loop turn, and the completion frames read back."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Sequence

from enserve.server.protocol import BURST, FLAGS, TASK, WEIGHTED, Done, DoneReader
from enserve.server.request import InflightRequest
from enserve.server.runtime import GroupRuntime
from enserve.server.supervisor import WorkerProcess, WorkerState

log = logging.getLogger("enserve")


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
        return [(start, count, m | (mask & WEIGHTED) | (mask & BURST if k == 0 else 0)) for k, m in enumerate(masks)]
    return [(start, count, mask)]


def hung_for(sent_at: dict[int, float], now: float, limit_s: float) -> float | None:
    """How long the oldest task has waited, when that is beyond ``limit_s``; else None."""
    oldest = min(sent_at.values(), default=None)
    return None if oldest is None or now - oldest <= limit_s else now - oldest


def least_loaded(workers: Iterable[WorkerProcess]) -> WorkerProcess | None:
    """The ready replica with the fewest rows in flight (the first of equals), or None."""
    best = None
    for w in workers:
        if w.state is WorkerState.READY and (best is None or w.rows < best.rows):
            best = w
    return best


class Dispatch:
    def __init__(self, loop: asyncio.AbstractEventLoop, done_r: int) -> None:
        self.loop = loop
        self.done_r = done_r
        self.reader = DoneReader()
        self.outbox: dict[WorkerProcess, list[bytes]] = {}
        self.flush_scheduled = False
        self.next_task = 0

    def send(self, w: WorkerProcess, rid: int, start: int, count: int, wait_us: int, mask: int) -> None:
        """Give ``w`` a task (rows of request ``rid``) under a task id of its own: a request split
        over replicas, or retried, may have several tasks on one worker. Descriptors of one loop
        turn go out in one write per worker."""
        tid = self.next_task
        self.next_task = (tid + 1) & 0xFFFFFFFF
        w.tasks[tid] = (rid, start, count, mask)
        w.sent_at[tid] = self.loop.time()
        w.rows += count
        self.outbox.setdefault(w, []).append(TASK.pack(tid, start, count, wait_us, mask))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def route(self, rt: GroupRuntime, rid: int, start: int, count: int, mask: int, wait_us: int = 0) -> None:
        """A task to the least-loaded ready replica of ``rt``; with none ready yet, the first that
        starts takes it."""
        w = least_loaded(rt.workers)
        if w is None:
            rt.held.append((rid, start, count, mask))
        else:
            self.send(w, rid, start, count, wait_us, mask)

    def send_part(self, rt: GroupRuntime, request: InflightRequest, mask: int, alone: bool, wait_us: int) -> int:
        """A group's part of a request: shared out over the group's idle replicas (``shares``), or
        whole to the least-loaded one. Returns how many tasks it became."""
        idle = [w for w in rt.workers if w.state is WorkerState.READY and w.rows == 0]
        parts = shares(request.start, request.count, len(idle), rt.member_ns, mask, alone)
        if len(parts) == 1:
            self.route(rt, request.rid, request.start, request.count, mask, wait_us)
            return 1
        for w, (start, count, share) in zip(idle, parts):
            self.send(w, request.rid, start, count, wait_us, share)
        return len(parts)

    def flush(self) -> None:
        self.flush_scheduled = False
        outbox, self.outbox = self.outbox, {}
        for w, descriptors in outbox.items():
            if w.task_w < 0:
                continue  # gone: its exit hands its tasks on
            try:
                os.write(w.task_w, b"".join(descriptors))
            except OSError as exc:  # a dead worker must not hold up the others' descriptors
                log.warning("cannot hand tasks to %s: %s", w.label, exc)

    @staticmethod
    def finished(w: WorkerProcess, tid: int) -> tuple[int, int, int, int] | None:
        """Task ``tid`` of ``w`` is over: (request id, start, count, mask), or None if not ``w``'s."""
        task = w.tasks.pop(tid, None)
        w.sent_at.pop(tid, None)
        if task is not None:
            w.rows -= task[2]
        return task

    def completions(self) -> list[Done]:
        """Every frame one read brings (workers share the pipe; each frame is one atomic write)."""
        try:
            chunk = os.read(self.done_r, 1 << 16)
        except BlockingIOError:
            return []
        return self.reader.feed(chunk)
