"""What the orchestrator does with the frames its workers write back: a worker ready (its held
tasks go out), a worker that failed to load, and a batch done (each task's rows added to its
request, the request answered when complete, the group's batch time and the members' statistics
updated)."""

from __future__ import annotations

import json

from enserve.server.errors import Internal
from enserve.server.protocol import STATUS_LOAD_FAILED, STATUS_OK, STATUS_READY, Done
from enserve.server.stats import record_batch
from enserve.server.supervisor import WorkerProcess


class Completions:
    """Mixed into ``Orchestrator``: uses its workers, groups, pending requests, dispatch, supervisor,
    statistics, sending and finishing."""

    def _on_done(self) -> None:
        for frame in self.dispatch.completions():
            w = self.workers[frame.worker]
            if frame.status == STATUS_READY:
                self._worker_ready(w, frame.message)
            elif frame.status == STATUS_LOAD_FAILED:
                w.reason = frame.message
            else:
                self._batch_done(w, frame)

    def _worker_ready(self, w: WorkerProcess, costs: str) -> None:
        self.supervisor.mark_ready(w)
        rt = self.groups[w.group]
        if not rt.member_ns and costs:
            rt.member_ns = tuple(json.loads(costs))
        held, rt.held = rt.held, []
        for rid, start, count, mask in held:
            if rid in self.pending:  # not expired meanwhile
                self.dispatch.route(rt, rid, start, count, mask)

    def _batch_done(self, w: WorkerProcess, frame: Done) -> None:
        rt = self.groups[w.group]
        ok = frame.status == STATUS_OK
        if ok and frame.rows:
            per_batch = frame.input_ns + frame.infer_ns + frame.output_ns
            rt.batch_ns += 0.1 * (per_batch - rt.batch_ns)
        ran = 0
        for tid in frame.ids:
            task = self.dispatch.finished(w, tid)
            if task is None:
                continue
            rid, start, count, mask = task
            ran |= mask
            request = self.pending.get(rid)
            if request is None:
                continue
            if not ok:
                self._part_failed(request, Internal(f"member '{w.spec.label}' failed on this request: {frame.message}"))
                continue
            try:
                request.part_done(w.slots.sums, w.slots.squares, start, count)
            except Exception as exc:  # one bad part must not strand the frame's other tasks (it was counted)
                request.error = request.error or Internal(f"adding the outputs of '{w.spec.label}' failed: "
                                                          f"{type(exc).__name__}: {exc}")
            if request.complete:
                self._finish(request)
        members = [m for k, m in enumerate(rt.spec.members) if ran >> k & 1]
        for m in members:
            record_batch(self.stats[m], frame, len(frame.ids), len(members))
