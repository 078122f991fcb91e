"""Worker processes: spawn each replica with its descriptors, notice it go (its lifeline pipe hits
EOF), tell the orchestrator through callbacks, and restart it; what happens to its tasks is the
orchestrator's business."""

from __future__ import annotations

import asyncio
import enum
import fcntl
import logging
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from enserve.child import python_module
from enserve.server.dataplane.slots import OutputSlots
from enserve.server.dataplane.worker import WORKER_MODULE, WorkerSpec
from enserve.server.lifecycle import Lifecycle
from enserve.server.protocol import Task
from enserve.server.served.placement import Replica

log = logging.getLogger("enserve")
F_SETPIPE_SZ = 1031
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0  # back-off of a replica whose restart fails: 1, 2, 4 ... 30 s


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DOWN = "down"  # failed to load, or the server is stopping


@dataclass(eq=False)
class WorkerProcess:
    """The orchestrator's side of one replica process."""

    index: int  # in the orchestrator's worker table: the index its completion frames carry
    group: int
    replica: Replica
    spec: WorkerSpec  # fds are filled in at each spawn
    proc: subprocess.Popen | None = None
    task_w: int = -1
    lifeline_r: int = -1
    state: WorkerState = WorkerState.STARTING
    reason: str = ""
    ready: asyncio.Future | None = None
    served: bool = False  # was ready once: a failed start after that is retried, not final
    failures: int = 0  # restarts that failed in a row (the back-off)
    retry: asyncio.TimerHandle | None = None
    # its tasks, owned by ``dispatch``: task id -> Task, until the worker says it is done or skipped it
    tasks: dict[int, Task] = field(default_factory=dict)
    rows: int = 0  # rows of its tasks not yet answered: the load that replica choice balances
    work_ns: float = 0.0  # those tasks' compute at its members' one-image costs (``Dispatch.task_ns``)
    sent_at: dict[int, float] = field(default_factory=dict)  # task id -> when it was handed over (loop clock)
    heard_at: float = 0.0  # when it last wrote a frame (loop clock): the watchdog's sign of life
    deferred: list[Task] = field(default_factory=list)  # tasks waiting for one of its tasks on the same rows
    unsent: bytearray = field(default_factory=bytearray)  # descriptors its full pipe has no room for yet
    slots: OutputSlots | None = None  # where it writes its members' running sums (its own: replicas
    # of a group may run different members of one request's rows at once)

    @property
    def label(self) -> str:
        return f"{self.spec.label} (replica {self.index} on {self.replica.device})"


class Supervisor:
    def __init__(self, loop: asyncio.AbstractEventLoop, done_w: int,
                 on_exit: Callable[[WorkerProcess, int | None], None], lifecycle: Lifecycle) -> None:
        self.loop = loop
        self.done_w = done_w
        self.on_exit = on_exit
        self.lifecycle = lifecycle  # its unit's: nothing is restarted once the unit closes

    def spawn(self, w: WorkerProcess) -> None:
        task_r, task_w = os.pipe()
        lifeline_r, lifeline_w = os.pipe()
        try:
            fcntl.fcntl(task_w, F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass  # the default 64 KiB still holds thousands of descriptors
        os.set_blocking(task_w, False)  # a worker busy with a full batch must never block the event loop
        env = dict(os.environ)
        device = w.replica.device
        if device.startswith("gpu"):  # the child sees its GPU as device 0
            env["CUDA_VISIBLE_DEVICES"] = device.partition(":")[2] or "0"
            device = "gpu:0"
        w.spec = replace(w.spec, device=device, task_fd=task_r, done_fd=self.done_w, lifeline_fd=lifeline_w)
        try:
            w.proc = subprocess.Popen(python_module(WORKER_MODULE, w.spec.to_json()),
                                      pass_fds=(task_r, self.done_w, lifeline_w), env=env)
        except OSError:
            os.close(task_w)
            os.close(lifeline_r)
            raise
        finally:
            os.close(task_r)
            os.close(lifeline_w)
        w.task_w, w.lifeline_r = task_w, lifeline_r
        w.state = WorkerState.STARTING
        w.ready = self.loop.create_future()
        self.loop.add_reader(lifeline_r, self._on_lifeline, w)

    def _on_lifeline(self, w: WorkerProcess) -> None:
        try:
            if os.read(w.lifeline_r, 1):
                return  # never written; ignore
        except BlockingIOError:
            return
        self.loop.remove_reader(w.lifeline_r)
        if w.task_w >= 0:
            self.loop.remove_writer(w.task_w)  # descriptors waiting for room in its pipe
        for fd in (w.lifeline_r, w.task_w):
            if fd >= 0:
                os.close(fd)
        w.lifeline_r = w.task_w = -1
        code = w.proc.wait() if w.proc is not None else None
        self.on_exit(w, code)

    def restart(self, w: WorkerProcess, code: int | None) -> None:
        """After ``w`` exited: start it again, unless the server is stopping or its first start
        failed (then it is down, with the reason). A restart that fails (it cannot spawn, or exits
        while loading) leaves it down with the reason, and is tried again with back-off."""
        if self.lifecycle.draining:
            self.mark_down(w, "the server is shutting down")
        elif w.state is WorkerState.STARTING and not w.served:
            self.mark_down(w, w.reason or f"{w.label} exited with code {code} while loading")
            log.error("%s", w.reason)
        elif w.state is WorkerState.STARTING:
            self._failed(w, w.reason or f"{w.label} exited with code {code} while loading")
        else:
            log.warning("%s exited with code %s; restarting it", w.label, code)
            self._respawn(w)

    def _respawn(self, w: WorkerProcess) -> None:
        w.retry = None
        if self.lifecycle.draining:
            return
        w.reason = ""
        try:
            self.spawn(w)
        except OSError as exc:
            self._failed(w, f"{w.label} could not be restarted: {exc}")

    def _failed(self, w: WorkerProcess, reason: str) -> None:
        delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** w.failures)
        w.failures += 1
        w.state, w.reason = WorkerState.DOWN, f"{reason}; retrying in {delay:g} s"
        log.error("%s", w.reason)
        w.retry = self.loop.call_later(delay, self._respawn, w)

    @staticmethod
    def mark_ready(w: WorkerProcess) -> None:
        w.state = WorkerState.READY
        w.served, w.failures = True, 0
        if w.ready is not None and not w.ready.done():
            w.ready.set_result(True)

    @staticmethod
    def mark_down(w: WorkerProcess, reason: str) -> None:
        w.state = WorkerState.DOWN
        w.reason = w.reason or reason
        if w.ready is not None and not w.ready.done():
            w.ready.set_result(False)

    async def stop(self, workers: list[WorkerProcess], timeout_s: float = 5.0) -> None:
        """Close every task pipe (EOF: a worker finishes its batch and exits), then wait, then kill."""
        self.lifecycle.drain()
        for w in workers:
            if w.retry is not None:
                w.retry.cancel()
                w.retry = None
            w.state = WorkerState.DOWN
            if w.task_w >= 0:
                self.loop.remove_writer(w.task_w)
                os.close(w.task_w)
                w.task_w = -1
        procs = [w.proc for w in workers if w.proc is not None]
        deadline = self.loop.time() + timeout_s
        for p in procs:
            try:
                await asyncio.wait_for(asyncio.to_thread(p.wait), max(0.1, deadline - self.loop.time()))
            except TimeoutError:
                p.kill()
                p.wait()
        for w in workers:
            if w.lifeline_r >= 0:
                self.loop.remove_reader(w.lifeline_r)
                os.close(w.lifeline_r)
                w.lifeline_r = -1
