"""What the orchestrator does with the frames its workers write back: a worker ready (its held
tasks go out), a worker that failed to load, a batch done (each task's rows added to its request,
the request answered when complete, the group's batch time and the members' statistics updated),
and tasks skipped because their request was cancelled. Every task that ends lets go of its rows."""

from __future__ import annotations

import json

from enserve.server.dataplane.adaptive import batch_factor
from enserve.server.dataplane.stats import record_batch
from enserve.server.dataplane.supervisor import WorkerProcess
from enserve.server.errors import Internal
from enserve.server.protocol import (
    STATUS_CANCELLED,
    STATUS_LOAD_FAILED,
    STATUS_OK,
    STATUS_READY,
    Done,
)


class Completions:
    """Mixed into ``Orchestrator``: uses its workers, groups, pending requests, dispatch, supervisor,
    statistics, sending and finishing."""

    def _on_done(self) -> None:
        for frame in self.dispatch.completions():
            w = self.workers[frame.worker]
            self.dispatch.heard(w)
            if frame.status == STATUS_READY:
                self._worker_ready(w, frame.message)
            elif frame.status == STATUS_LOAD_FAILED:
                w.reason = frame.message
            elif frame.status == STATUS_CANCELLED:
                self._skipped(w, frame)
            else:
                self._batch_done(w, frame)

    def _worker_ready(self, w: WorkerProcess, costs: str) -> None:
        self.supervisor.mark_ready(w)
        rt = self.groups[w.group]
        if not rt.member_ns and costs:
            rt.member_ns = tuple(json.loads(costs))
        for task in self.dispatch.take_held(rt):
            if task.rid in self.pending:
                self.dispatch.reroute(rt, task)
            else:  # expired meanwhile
                rt.ring.release(task.alloc)

    def _skipped(self, w: WorkerProcess, frame: Done) -> None:
        rt = self.groups[w.group]
        for tid in frame.ids:
            task = self.dispatch.finished(w, tid)
            if task is None:
                continue
            rt.ring.release(task.alloc)
            request = self.pending.get(task.rid)
            if request is not None:  # cannot happen: only a forgotten request's rows are cancelled
                self._part_failed(request, Internal(f"member '{w.spec.label}' skipped this request"))

    def _batch_done(self, w: WorkerProcess, frame: Done) -> None:
        rt = self.groups[w.group]
        ok = frame.status == STATUS_OK
        if ok and frame.rows:
            per_batch = frame.input_ns + frame.infer_ns + frame.output_ns
            rt.batch_ns += 0.1 * (per_batch - rt.batch_ns)
            one_by_one = 0.0 if self.dispatch.mask_cost is None else \
                sum(self.dispatch.task_ns(w, w.tasks[tid]) for tid in frame.ids if tid in w.tasks)
            if one_by_one > 0:  # how far batching makes a batch cheaper than its images one by one
                rt.scale = batch_factor(rt.scale, frame.infer_ns, one_by_one)
                rt.scale_at = self.loop.time()
        ran = 0
        for tid in frame.ids:
            task = self.dispatch.finished(w, tid)
            if task is None:
                continue
            ran |= task.mask
            request = self.pending.get(task.rid)
            if request is not None:
                if not ok:
                    self._part_failed(request, Internal(f"member '{w.spec.label}' failed on this request: "
                                                        f"{frame.message}"))
                else:
                    try:  # the members only matter to an answer that may come before all are in
                        request.part_done(w.slots.sums, w.slots.squares, task.start, task.count,
                                          () if request.anytime is None else rt.spec.members, task.mask)
                    except Exception as exc:  # one bad part must not strand the frame's other tasks
                        request.fail(Internal(f"adding the outputs of '{w.spec.label}' failed: "
                                              f"{type(exc).__name__}: {exc}"))
                    if request.complete:
                        self._finish(request)
            rt.ring.release(task.alloc)  # after its sums were read: its rows may be handed out again now
        members = [m for k, m in enumerate(rt.spec.members) if ran >> k & 1]
        for m in members:
            record_batch(self.stats[m], frame, len(frame.ids), len(members))
