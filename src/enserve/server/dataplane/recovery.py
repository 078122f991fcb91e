"""What the orchestrator does when a worker fails: it exits (restart it, hand its tasks to a live
replica once, fail them after a second death) or hangs (a watchdog kills it, and then the same)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal

from enserve.server.dataplane.dispatch import hung_for
from enserve.server.dataplane.supervisor import WorkerProcess, WorkerState
from enserve.server.errors import Unavailable

log = logging.getLogger("enserve")


class WorkerRecovery:
    """Mixed into ``Orchestrator``: uses its groups, pending requests, supervisor and sending."""

    def _worker_exited(self, w: WorkerProcess, code: int | None) -> None:
        """A replica is gone: restart it (unless it never loaded or we are stopping) and hand its
        tasks to a live replica of its group; a request whose task of this group was computed again
        once already has it failed instead. A task handed on keeps holding its rows; one that is
        not lets go of them."""
        rt = self.groups[w.group]
        tasks = self.dispatch.dropped(w)
        self.supervisor.restart(w, code)
        closing = self.lifecycle.draining
        again: dict[int, bool] = {}  # request id -> may its tasks of this group be computed again
        for task in tasks:
            request = self.pending.get(task.rid)
            if request is None:
                rt.ring.release(task.alloc)
                continue
            if task.rid not in again:
                again[task.rid] = not closing and request.retry(w.group)
            if again[task.rid]:
                self.dispatch.reroute(rt, task)
                continue
            rt.ring.release(task.alloc)
            why = "the server is shutting down" if closing else "its worker died twice"
            self._part_failed(request, Unavailable(f"member '{w.spec.label}' did not answer: {why}"))
        if all(x.state is WorkerState.DOWN for x in rt.workers):
            for task in self.dispatch.take_held(rt):
                rt.ring.release(task.alloc)
                request = self.pending.get(task.rid)
                if request is not None:
                    self._part_failed(request, Unavailable(f"member '{w.spec.label}' is unavailable: {w.reason}"))

    def _watch_period(self) -> float:
        return min(1.0, self.options.worker_timeout_s / 4)

    def _watch(self) -> None:
        """Kill a worker that holds tasks but has answered nothing far longer than its batches take
        (stopped, deadlocked), whether their requests are live or expired: its exit then restarts
        it and hands its tasks on, as for a crash."""
        now = self.loop.time()
        for rt in self.groups:
            limit = max(self.options.worker_timeout_s, 50 * rt.batch_ns / 1e9)
            for w in rt.workers:
                if w.state is not WorkerState.READY:
                    continue
                age = hung_for(self.dispatch.waiting_since(w), now, limit)
                if age is not None and w.proc is not None and w.proc.poll() is None:
                    log.error("%s has not answered a task for %.1f s (limit %.1f s): killing it", w.label, age, limit)
                    self.dispatch.abandon(w)  # once: its exit takes it from here
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(w.proc.pid, signal.SIGKILL)
        if not self.lifecycle.draining:
            self.watchdog = self.loop.call_later(self._watch_period(), self._watch)
