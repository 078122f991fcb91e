"""The allocator at the daemon's side: profiles of a repository's members, the real-pipeline bench,
and plans applied to member placement. The search itself is ``optimizer`` (which never imports us)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from enserve.optimizer import plan as plans
from enserve.optimizer.allocation import Allocation, Device, MemberProfile
from enserve.optimizer.costmodel import CostModelBench
from enserve.optimizer.devices import hardware_fingerprint
from enserve.optimizer.placement import proportional_start, replicated_whole, worst_fit_decreasing
from enserve.optimizer.profiles import MemberSource, profile_members
from enserve.optimizer.search import SearchResult, neighbourhood_search
from enserve.server.config import AllocateOptions, ServeOptions
from enserve.server.errors import RepositoryError
from enserve.server.served import placement as placements
from enserve.server.served.placement import Placement
from enserve.server.served.repository import Repository, ensemble_members

log = logging.getLogger("enserve")
DEFAULTS = AllocateOptions()
PER_ROUND = 4  # real-bench neighbours measured per round, most promising (cost model) first


def member_sources(repo: Repository, names: list[str]) -> list[MemberSource]:
    out = []
    for n in names:
        spec = repo.members[n]
        out.append(MemberSource(n, str(spec.path), tuple((t.name, t.np_dtype.str, t.dims) for t in spec.inputs)))
    return out


def plan_groups(alloc: Allocation, names: list[str], devices: list[Device]) -> list[plans.PlanGroup]:
    by_name = {d.name: d for d in devices}
    return [plans.PlanGroup([names[i] for i in g.members], g.batch, [
        plans.PlanReplica(r.device, by_name[r.device].kind, list(by_name[r.device].cores), r.threads)
        for r in g.replicas]) for g in alloc.groups]


def placement_for(repo: Repository, names: list[str], alloc: Allocation, devices: list[Device]) -> Placement:
    """The allocation's groups for the ensemble's members, the rest as their config says."""
    return placements.from_plan(repo, plans.Plan("", "", "", "", plan_groups(alloc, names, devices),
                                                 0.0, 0.0, [], 0, 0.0))


@dataclass
class RealBench:
    """Scores an allocation by starting the real pipeline (workers, shared memory, orchestrator)
    and driving it with generated inputs: images/s, or minus the p99 latency in ms under a fixed load."""

    repo: Repository
    ensemble: str
    names: list[str]
    devices: list[Device]
    metric: str = DEFAULTS.optimize_metric
    concurrency: int = DEFAULTS.bench_concurrency
    images: int = DEFAULTS.bench_images
    seconds: float = DEFAULTS.bench_seconds
    warmup_s: float = 0.5

    def __call__(self, alloc: Allocation) -> float:
        return asyncio.run(self._measure(placement_for(self.repo, self.names, alloc, self.devices)))

    async def _measure(self, placement: Placement) -> float:
        from enserve.server.dataplane.orchestrator import Orchestrator

        options = ServeOptions(model_repository=self.repo.path, max_inflight=1 << 20, request_timeout_s=120)
        orch = Orchestrator(self.repo, placement, options)
        try:
            await orch.start()
            target = orch.models[self.ensemble]
            spec = target.inputs
            rng = np.random.default_rng(0)
            arrays = [rng.random((self.images, *t.dims)).astype(t.np_dtype) for t in spec]
            latencies: list[float] = []
            t_start = time.perf_counter() + self.warmup_s
            t_end = t_start + self.seconds

            async def user() -> None:
                while True:
                    t0 = time.perf_counter()
                    if t0 >= t_end:
                        return
                    await orch.infer(target, arrays, self.images)
                    t1 = time.perf_counter()
                    if t0 >= t_start and t1 <= t_end:
                        latencies.append(t1 - t0)

            await asyncio.gather(*(user() for _ in range(self.concurrency)))
        finally:
            await orch.close()
        if self.metric == "latency":
            return -float(np.percentile(latencies, 99)) * 1e3 if latencies else float("-inf")
        return len(latencies) * self.images / self.seconds


class AllocationStopped(Exception):
    """The allocator was asked to stop (the server is shutting down during start-up)."""


@dataclass
class Allocated:
    plan: plans.Plan
    result: SearchResult
    devices: list[Device]
    profiles: list[MemberProfile]


def allocate(
    repo: Repository,
    devices: list[Device],
    options: AllocateOptions = DEFAULTS,
    *,
    ensemble: str | None = None,
    profiles: list[MemberProfile] | None = None,
    progress: Callable[[str], None] | None = None,
    stopped: Callable[[], bool] | None = None,
) -> Allocated:
    """Profile, place with worst-fit decreasing, refine with Algorithm 1 (``options``: the metric, the
    bench, the batch sizes, the limits); the plan is not saved. ``profiles`` given are used instead
    of measuring.
    When ``stopped()`` turns true (the server was told to stop; it is read from the allocator's
    thread) it ends with ``AllocationStopped`` before the next profile or measurement; the one
    running finishes and cleans up first."""

    def check(what: str) -> None:
        if stopped is not None and stopped():
            raise AllocationStopped(f"the allocator stopped before {what}: the server is stopping")

    def progress_or_stop(message: str) -> None:
        check("the next profile")
        if progress:
            progress(message)

    try:
        options.validate()
    except ValueError as exc:
        raise RepositoryError(str(exc)) from None
    metric, bench, batch_sizes = options.optimize_metric, options.bench, options.batch_sizes
    max_combi = options.combi_limit
    time_budget_s = options.optimize_time_s if math.isfinite(options.optimize_time_s) else None
    ensemble, names = ensemble_members(repo, ensemble)
    hardware = hardware_fingerprint(devices)
    if profiles is None:
        cache = plans.profiles_path(repo.path)
        profiles = profile_members(member_sources(repo, names), devices, hardware, cache_path=cache,
                                   batch_sizes=batch_sizes, progress=progress_or_stop)
    else:
        by_name = {p.name: p for p in profiles}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise RepositoryError(f"the profiles given lack members {missing}")
        profiles = [by_name[n] for n in names]
    start = proportional_start(worst_fit_decreasing(profiles, devices, options.start_batch), profiles, devices)
    cost = CostModelBench(profiles, devices)
    if bench == "real":
        real = RealBench(repo, ensemble, names, devices, metric, concurrency=options.bench_concurrency,
                         images=options.bench_images, seconds=options.bench_seconds)

        def score(alloc: Allocation) -> float:
            check("the next measurement")
            return real(alloc)
    else:  # "cost" (validated)
        score = cost

    noisy = bench == "real"

    def report(n: int, alloc: Allocation, s: float, best: float) -> None:
        if progress and (noisy or s >= best):  # the cost model scores hundreds: only its improvements
            progress(f"[{n}/{max_combi}] {describe(alloc, names)}: {s:.1f} (best {best:.1f})")
    whole = replicated_whole(profiles, devices, options.start_batch)
    result = neighbourhood_search(start, profiles, devices, list(batch_sizes), score, max_combi=max_combi,
                                  time_budget_s=time_budget_s, min_gain=0.03 if noisy else 0.0, rank=cost,
                                  per_round=PER_ROUND if noisy else None, progress=report,
                                  alternatives=(whole,) if whole is not None else (),
                                  start_repeats=2 if noisy else 1)
    if noisy and result.best != result.start:
        confirm_against_start(result, score, progress, margin=0.03)
    plan = plans.Plan(
        ensemble=ensemble,
        key=placements.plan_key(repo, ensemble, names, hardware),
        hardware=hardware,
        metric=metric,
        bench=bench,
        groups=plan_groups(result.best, names, devices),
        start_score=result.start_score,
        score=result.best_score,
        start=plan_groups(result.start, names, devices),
        evaluated=result.evaluated,
        created=plans.now(),
    )
    return Allocated(plan, result, devices, profiles)


def confirm_against_start(result: SearchResult, score: Callable[[Allocation], float],
                          progress: Callable[[str], None] | None, margin: float = 0.0) -> None:
    """Measure the refined and the start allocation once more, side by side; keep the start unless
    the refined one is still better by ``margin`` (a fraction) on the mean of both measurements:
    noise must not make us lose, nor trade a simple plan for an equal one."""
    best_again, start_again = score(result.best), score(result.start)
    best_mean = (result.best_score + best_again) / 2
    start_mean = (result.start_score + start_again) / 2
    if progress:
        progress(f"confirming: refined {best_mean:.1f} vs start {start_mean:.1f} (means of two measurements)")
    result.evaluated += 2
    result.start_score = start_mean
    if best_mean > start_mean * (1 + margin):
        result.best_score = best_mean
    else:
        result.best, result.best_score = result.start, start_mean


def describe(alloc: Allocation, names: list[str]) -> str:
    return "; ".join("+".join(names[i] for i in g.members) + f"/b{g.batch}@"
                     + ",".join(f"{r.device}x{r.threads}t" for r in g.replicas) for g in alloc.groups)
