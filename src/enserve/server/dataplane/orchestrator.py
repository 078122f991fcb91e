"""The orchestrator: wiring of the data plane.

A request is copied once into the shared input ring of its signature, and one descriptor goes
to the least-loaded ready replica of each worker group it needs (or, when several replicas are
idle, shares of it to each); a replica runs the group's members on those rows and writes their
running sums into its own output slots. When every part has answered, the request divides once
(``request``, ``combiner``). The jobs have owners: ``table`` (what is served), ``runtime`` and
``slots`` (shared memory and the worker table), ``supervisor`` (processes), ``dispatch``
(which replica, descriptors and the completion pipe), ``completions`` (what a worker's frames
do), ``recovery`` (workers that die or hang), ``health`` (readiness), ``request`` (resolution and
deadlines), ``stats``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import numpy as np

from enserve.server.config import ServeOptions
from enserve.server.dataplane import health
from enserve.server.dataplane.adaptive import (
    ANSWER_AT,
    PLAN_SHARE,
    RISK_SHARE,
    SUSTAINED_RUN,
    PointCosts,
    decayed,
    predicted_ns,
    richest_point,
    slack,
)
from enserve.server.dataplane.completions import Completions
from enserve.server.dataplane.dispatch import (
    MAX_QUEUED_TASKS,
    QUIET_LOAD,
    Dispatch,
    recent_load,
    wait_budget,
)
from enserve.server.dataplane.recovery import WorkerRecovery
from enserve.server.dataplane.request import Deadlines, InflightRequest
from enserve.server.dataplane.runtime import GroupRuntime, build_runtime, release_memory
from enserve.server.dataplane.slots import InputRing
from enserve.server.dataplane.stats import ModelStats, record_request
from enserve.server.dataplane.supervisor import Supervisor, WorkerProcess, WorkerState
from enserve.server.errors import (
    EnserveError,
    RepositoryError,
    ResourceExhausted,
    Unavailable,
)
from enserve.server.lifecycle import Lifecycle
from enserve.server.protocol import BURST, FLAGS, Task
from enserve.server.served.placement import Placement
from enserve.server.served.repository import Repository
from enserve.server.served.table import ServedModel, build_table

log = logging.getLogger("enserve")
WORKER_STOP_S = 5.0  # how long workers get to finish their batch and exit once their pipes close


class Orchestrator(WorkerRecovery, Completions):
    def __init__(self, repo: Repository, placement: Placement, options: ServeOptions,
                 lifecycle: Lifecycle | None = None) -> None:
        self.repo = repo
        self.placement = placement
        self.options = options
        self.table = build_table(repo, placement)
        self.models: dict[str, ServedModel] = self.table.models
        self.stats = {name: ModelStats(name) for name in self.models}
        self.inflight = dict.fromkeys(self.models, 0)
        self.rings: list[InputRing] = []
        self.groups: list[GroupRuntime] = []
        self.workers: list[WorkerProcess] = []
        self.pending: dict[int, InflightRequest] = {}
        self.next_id = 0
        self.load = 1.0  # requests in flight as recent arrivals found them (``recent_load``)
        self.lifecycle = lifecycle or Lifecycle()  # drained when this unit closes
        self.drained: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.done_r = self.done_w = -1
        self.watchdog: asyncio.TimerHandle | None = None
        self.point_runs: dict[str, tuple[int, int, int]] = {}  # per model: (point logged, point chosen, its run)
        self.slack_ns = 0.0  # what answers under an objective took beyond their prediction (``adaptive.slack``)
        self.slack_at = 0.0  # when it was last learnt (the loop's clock): it fades from then (``decayed``)
        self.floor_ns: dict[str, float] = {}  # per model, ``cheapest_point_ns`` once its groups are measured

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.rings, self.groups, self.workers = build_runtime(self.repo, self.placement, self.table, self.options)
        self.done_r, self.done_w = os.pipe()
        os.set_blocking(self.done_r, False)
        fronts = any(len(m.points) > 1 for m in self.models.values())  # else no latency objective applies
        self.dispatch = Dispatch(self.loop, self.done_r, self._mask_cost if fronts else None)
        self.supervisor = Supervisor(self.loop, self.done_w, self._worker_exited, self.lifecycle)
        self.deadlines = Deadlines(self.loop, self._expire)
        self.loop.add_reader(self.done_r, self._on_done)
        for w in self.workers:
            self.supervisor.spawn(w)
        self.watchdog = self.loop.call_later(self._watch_period(), self._watch)
        await asyncio.wait([w.ready for w in self.workers], timeout=self.options.startup_timeout_s)
        failed = [w for w in self.workers if w.state is not WorkerState.READY]
        if failed:
            raise RepositoryError("; ".join(w.reason or f"{w.label} did not start in time" for w in failed))

    # ------------------------------------------------------------------ health

    def unavailable(self, model: ServedModel) -> str | None:
        return health.unavailable(model, self.groups)

    def not_ready(self, model: ServedModel) -> str | None:
        return health.not_ready(model, self.groups)

    def queue_depth(self) -> dict[str, int]:
        return dict(self.inflight)

    def worker_tasks(self) -> dict[str, int]:
        """Per worker group, the tasks its replicas hold, defer or wait for (live or cancelled)."""
        return {"+".join(rt.spec.members): self.dispatch.queued(rt) for rt in self.groups}

    def worker_pids(self) -> dict[str, list[int]]:
        return {"+".join(rt.spec.members): [w.proc.pid for w in rt.workers if w.proc is not None]
                for rt in self.groups}

    # ------------------------------------------------------------------ requests

    async def infer(self, model: ServedModel, arrays: list[np.ndarray], count: int,
                    timeout_s: float | None = None) -> dict[str, np.ndarray]:
        return await self.submit(model, arrays, count, timeout_s).future

    def submit(self, model: ServedModel, arrays: list[np.ndarray], count: int,
               timeout_s: float | None = None, uncertainty: bool = True,
               objective_s: float | None = None, members_output: bool = False) -> InflightRequest:
        """Copy the inputs into shared rows and hand them to one replica of every group ``model`` needs;
        ``uncertainty`` off skips the ensemble's entropy and variance outputs, ``members_output`` on
        answers which members it combined (``MEMBERS_OUTPUT``). With ``objective_s``
        (a latency objective), an ensemble with a front runs only the members of the richest point
        predicted to fit it (``adaptive``), and is answered near it with the members done by then."""
        self.lifecycle.check_accepting(f"model '{model.name}'")
        reason = self.unavailable(model)
        if reason is not None:
            raise Unavailable(f"model '{model.name}' is unavailable: {reason}")
        stats = self.stats[model.name]
        if self.inflight[model.name] >= self.options.max_inflight:
            stats.rejected += 1
            raise ResourceExhausted(
                f"model '{model.name}' has {self.inflight[model.name]} requests in flight, the limit is "
                f"{self.options.max_inflight}; retry later")
        point, predicted = len(model.points) - 1, 0.0
        if objective_s is not None and point > 0:
            idle = self._idle_prediction(model, count, objective_s) if not self.dispatch.out else None
            if idle is None:
                point, predicted = self._point_for(model, count, objective_s)
            else:  # what _point_for would answer, without looking at any queue
                predicted = idle
            self._note_point(model, point)
        served = model.points[point]
        for g, _ in served.parts:
            if self.dispatch.saturated(self.groups[g]):
                stats.rejected += 1
                raise ResourceExhausted(
                    f"the workers of '{self.groups[g].workers[0].spec.label}' have {MAX_QUEUED_TASKS} tasks queued "
                    "each; retry later")
        ring = self.rings[model.ring]
        start = ring.put(arrays, count)
        if start is None:
            stats.rejected += 1
            raise ResourceExhausted(
                f"the shared input ring of model '{model.name}' is full ({ring.capacity} rows); retry later")
        rid = self.next_id
        self.next_id = (rid + 1) & 0xFFFFFFFF
        bound = self.options.request_timeout_s  # the server's bound; a client's deadline may be shorter
        timeout = bound if timeout_s is None else min(timeout_s, bound)
        anytime = objective_s is not None and model.kind == "ensemble" and ANSWER_AT * objective_s < timeout
        request = InflightRequest(rid, served.recipe, start, count, len(served.parts), self.loop.create_future(),
                                  self.loop.time(), ANSWER_AT * objective_s if anytime else timeout, uncertainty,
                                  members_output)
        request.members, request.predicted_ns = served.members, predicted
        if model.kind == "ensemble":
            request.objective_s = objective_s
        if anytime:  # answered near the objective with the members done, if they hold the first point
            request.anytime = model.points[0].member_set
        self.pending[rid] = request
        self.inflight[model.name] += 1
        self.deadlines.add(request)
        wait = len(served.parts) > 1 and self.inflight[model.name] > 1 and self.options.max_adaptive_wait_us > 0
        slowest = max(self.groups[g].batch_ns for g, _ in served.parts) if wait else 0.0
        self.load = recent_load(self.load, len(self.pending))
        # alone in the server, on one group, and not just between the answers of concurrent
        # clients: its worker may use every core it is pinned to
        alone = len(self.pending) == 1
        burst = BURST if alone and len(served.parts) == 1 and self.load < QUIET_LOAD else 0
        # at risk of an early answer (predicted past half its time): the first point's members apart
        at_risk = anytime and predicted > RISK_SHARE * ANSWER_AT * objective_s * 1e9
        first = dict(model.points[0].parts) if at_risk else {}
        for g, mask in served.parts:
            rt = self.groups[g]
            early, rest = (mask & ~FLAGS) & first.get(g, 0), mask & ~FLAGS & ~first.get(g, 0)
            apart = bool(early and rest)  # the first point's members apart: done, they answer before the rest
            if apart:
                mask &= ~rest
            tasks = self.dispatch.send_part(
                rt, request, mask | burst, alone,
                wait_budget(self.options.max_adaptive_wait_us, slowest, rt.batch_ns) if wait else 0)
            if apart:  # never beside the first task on its rows on one replica (``reroute``)
                self.dispatch.reroute(rt, Task(rid, start, count, rest | (mask & FLAGS) | burst, start))
                tasks += 1
            request.add_parts(tasks - 1)
            ring.retain(start, tasks)  # each task holds the rows until its worker is done with them
        request.submitted()
        return request

    def cheapest_point_ns(self, model: ServedModel) -> float:
        """The least time the first point of ``model``'s front takes for one row on idle replicas: its
        slowest group's members, one image's measured cost each (0 before any is measured)."""
        floor = self.floor_ns.get(model.name)
        if floor is None:
            parts = model.points[0].parts
            floor = max((self.groups[g].mask_ns(mask) for g, mask in parts), default=0.0)
            if all(self.groups[g].member_ns for g, _ in parts):  # measured: it stays
                self.floor_ns[model.name] = floor
        return floor

    def _mask_cost(self, group: int, mask: int) -> float:
        return self.groups[group].mask_ns(mask)

    def _point_for(self, model: ServedModel, count: int, objective_s: float) -> tuple[int, float]:
        """The richest point of ``model``'s front predicted to answer ``count`` rows within
        ``PLAN_SHARE`` of the objective less the slack answers have shown, from each group's backlog
        and measured costs; and when it is predicted to be done (ns from now)."""
        backlog, scale, now, ready = {}, {}, self.loop.time(), WorkerState.READY
        for g, _ in model.points[-1].parts:  # the whole model's groups: every point's are among them
            rt = self.groups[g]
            s = scale[g] = decayed(rt.scale, now - rt.scale_at) if rt.scale != 1.0 else 1.0
            least = float("inf")  # no replica ready: nothing of this group can be predicted to finish
            for w in rt.workers:
                if w.state is ready and w.work_ns < least:
                    least = w.work_ns
            backlog[g] = least * s
        points = PointCosts(self._mask_cost, scale, model.point_parts)
        slack_ns = decayed(self.slack_ns, now - self.slack_at, rest=0.0) if self.slack_ns else 0.0
        k = richest_point(backlog, points, count, PLAN_SHARE * objective_s * 1e9 - slack_ns)
        return k, predicted_ns(backlog, points[k], count)

    def _idle_prediction(self, model: ServedModel, count: int, objective_s: float) -> float | None:
        """With no task out on any replica (every backlog 0, as at low load): when ``model``'s richest
        point would be done, if that fits the objective as ``_point_for`` reckons it; else None (a
        group without a ready replica, or too slow: ``_point_for`` decides)."""
        now, ready, predicted = self.loop.time(), WorkerState.READY, 0.0
        for g, mask in model.points[-1].parts:
            rt = self.groups[g]
            if not any(w.state is ready for w in rt.workers):
                return None
            s = decayed(rt.scale, now - rt.scale_at) if rt.scale != 1.0 else 1.0
            predicted = max(predicted, count * (s * rt.mask_ns(mask)))  # as PointCosts and predicted_ns
        slack_ns = decayed(self.slack_ns, now - self.slack_at, rest=0.0) if self.slack_ns else 0.0
        return predicted if predicted <= PLAN_SHARE * objective_s * 1e9 - slack_ns else None

    def _note_point(self, model: ServedModel, point: int, sustained: int = SUSTAINED_RUN) -> None:
        """One log line when the point served changes and holds for ``sustained`` requests in a row."""
        logged, last, run = self.point_runs.get(model.name, (len(model.points) - 1, -1, 0))
        run = run + 1 if point == last else 1
        if run == sustained and point != logged:
            log.info("model '%s' now answers with front point %d of %d (%d of %d members) under its latency "
                     "objective", model.name, point + 1, len(model.points), len(model.points[point].members),
                     len(model.members))
            logged = point
        self.point_runs[model.name] = (logged, point, run)

    def _learn_slack(self, request: InflightRequest) -> None:
        if request.objective_s is not None and request.predicted_ns:
            now = self.loop.time()
            self.slack_ns = slack(decayed(self.slack_ns, now - self.slack_at, rest=0.0),
                                  time.perf_counter_ns() - request.t0, request.predicted_ns)
            self.slack_at = now

    def _finish(self, request: InflightRequest) -> None:
        self._learn_slack(request)
        self._forget(request)
        request.answer()
        self.deadlines.note_answered()
        if request.recipe.kind == "ensemble":
            record_request(self.stats[request.recipe.model], request)

    def _expire(self, request: InflightRequest) -> None:
        """Its deadline passed: DEADLINE_EXCEEDED and its in-flight slot free now; its rows come back
        as its workers finish or skip its tasks. Counted under its objective only when the deadline was
        the objective's (a client's own shorter ``timeout`` is not an objective missed)."""
        self._learn_slack(request)
        self._forget(request)
        request.expire()
        if request.recipe.kind == "ensemble" and request.anytime is not None:
            record_request(self.stats[request.recipe.model], request)

    def cancel(self, request: InflightRequest) -> None:
        """Its caller went away (a cancelled call): as at an expiry, its in-flight slot is free now and
        its workers skip the tasks they have not begun; nothing is answered, counted or learnt."""
        if self.pending.get(request.rid) is not request:  # answered already, or expired
            return
        self._forget(request)
        self.deadlines.note_answered()
        request.fail(Unavailable("the caller cancelled this request"))  # read by no one: the call is gone
        request.answer()  # (nothing more when its future was cancelled with the caller's task)

    def _forget(self, request: InflightRequest) -> None:
        del self.pending[request.rid]
        model = self.models[request.recipe.model]
        ring = self.rings[model.ring]
        if not request.complete:  # tasks still out: workers skip those they have not begun
            ring.cancel(request.start)
        ring.release(request.start)
        self.inflight[model.name] -= 1
        if self.lifecycle.draining and not self.pending and self.drained is not None:
            self.drained.set()

    def _part_failed(self, request: InflightRequest, error: EnserveError) -> None:
        request.part_failed(error)
        if request.complete:
            self._finish(request)

    # ------------------------------------------------------------------ shut-down

    async def close(self, timeout_s: float | None = None) -> None:
        """Finish what is in flight, stop the workers, unlink shared memory: all within ``timeout_s``
        (default: the drain timeout plus the workers' stop); workers still running then are killed."""
        self.lifecycle.drain()
        if self.watchdog is not None:
            self.watchdog.cancel()
        stop_s = WORKER_STOP_S if timeout_s is None else min(WORKER_STOP_S, timeout_s / 2)
        drain_s = self.options.drain_timeout_s if timeout_s is None else min(self.options.drain_timeout_s,
                                                                            timeout_s - stop_s)
        if self.pending:
            self.drained = asyncio.Event()
            try:
                await asyncio.wait_for(self.drained.wait(), max(0.0, drain_s))
            except TimeoutError:
                log.warning("%d requests still in flight after %.3g s; stopping anyway", len(self.pending), drain_s)
        if self.loop is not None and self.done_r >= 0:
            await self.supervisor.stop(self.workers, stop_s)
            self.loop.remove_reader(self.done_r)
            os.close(self.done_r)
            os.close(self.done_w)
            self.done_r = self.done_w = -1
            self.deadlines.close()
        for request in list(self.pending.values()):
            request.part_failed(Unavailable("the server shut down before this request finished"))
            request.answer()
        self.pending.clear()
        self.release_memory()

    def release_memory(self) -> None:
        release_memory(self.rings, self.workers)
