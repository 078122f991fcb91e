"""Where members run: worker groups and their replicas, resolved in one place from the repository's
``config.pbtxt``, an allocation plan, and the serve flags.

A worker group is a set of members that share worker processes: each of its replicas is one
process that reads a batch once and runs every member of the group on it, back to back. A group
of one member with one replica is the paper's one process per member; one group holding every
member with k replicas is what Triton's python backend with k instances does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

from enserve.optimizer import plan as plans
from enserve.server.config import ServeOptions
from enserve.server.errors import RepositoryError
from enserve.server.protocol import MAX_GROUP_MEMBERS
from enserve.server.served.repository import MemberSpec, Repository

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Replica:
    """One worker process: its device, the cores it is pinned to (none on a GPU) and its threads."""

    device: str  # "cpu" | "gpu:<i>"
    cores: tuple[int, ...]
    threads: int


@dataclass(frozen=True)
class WorkerGroup:
    members: tuple[str, ...]
    replicas: tuple[Replica, ...]
    batch_size: int
    queue_delay_us: int = 0


@dataclass(frozen=True)
class Placement:
    groups: tuple[WorkerGroup, ...]

    def group_of(self, member: str) -> int:
        for i, g in enumerate(self.groups):
            if member in g.members:
                return i
        raise KeyError(member)


def _all_cores() -> tuple[int, ...]:
    return tuple(sorted(os.sched_getaffinity(0)))


def _fair_threads(replicas: list[tuple[str, tuple[int, ...]]]) -> list[int]:
    """Threads per CPU replica: its cores divided among the replicas pinned to the same cores."""
    sharing: dict[tuple[int, ...], int] = {}
    for device, cores in replicas:
        if not device.startswith("gpu"):
            sharing[cores] = sharing.get(cores, 0) + 1
    return [1 if device.startswith("gpu") else max(1, len(cores) // sharing[cores]) for device, cores in replicas]


def from_config(repo: Repository) -> Placement:
    """What each member's ``config.pbtxt`` says: ``instance_group`` (count, kind, gpus) gives the
    replicas, parameter ``enserve.cpu_cores`` their cores, ``enserve.worker_group`` which members
    share processes, ``dynamic_batching`` the batch size and queue delay."""
    by_group: dict[str, list[MemberSpec]] = {}
    for spec in repo.members.values():
        by_group.setdefault(spec.worker_group or f"\0{spec.name}", []).append(spec)
    drafts = []
    for name, specs in by_group.items():
        first = specs[0]
        for s in specs[1:]:
            if (s.devices, s.cpu_cores) != (first.devices, first.cpu_cores):
                raise RepositoryError(
                    f"worker group '{name}': member '{s.name}' has instances {list(s.devices)} on cores "
                    f"{s.cpu_cores}, but '{first.name}' has {list(first.devices)} on {first.cpu_cores}; "
                    "members sharing processes must agree")
        cores = first.cpu_cores or _all_cores()
        drafts.append((specs, [(d, () if d.startswith("gpu") else cores) for d in first.devices]))
    threads = _fair_threads([r for _, reps in drafts for r in reps])
    groups, k = [], 0
    for specs, reps in drafts:
        replicas = tuple(Replica(d, c, t) for (d, c), t in zip(reps, threads[k : k + len(reps)]))
        k += len(reps)
        groups.append(WorkerGroup(tuple(s.name for s in specs), replicas,
                                  min(s.batch_size for s in specs), max(s.queue_delay_us for s in specs)))
    return Placement(tuple(groups))


def from_plan(repo: Repository, plan: plans.Plan) -> Placement:
    """The plan's groups for its ensemble's members; every other member as its config says."""
    planned = set()
    groups = []
    for g in plan.groups:
        for m in g.members:
            if m not in repo.members:
                raise RepositoryError(
                    f"plan for '{plan.ensemble}' names member '{m}', which is not in the repository")
        planned.update(g.members)
        replicas = tuple(Replica(r.device if r.kind == "gpu" else "cpu", tuple(r.cores) if r.kind == "cpu" else (),
                                 r.threads) for r in g.replicas)
        batch = min([g.batch_size] + [repo.members[m].max_batch_size for m in g.members])
        groups.append(WorkerGroup(tuple(g.members), replicas, batch))
    rest = [g for g in from_config(repo).groups if not set(g.members) & planned]
    return check(Placement(tuple(groups + rest)))


def with_flags(placement: Placement, options: ServeOptions) -> Placement:
    """The manual flags override every group: device, cores, batch size, queue delay, threads."""
    per_group = []
    for g in placement.groups:
        reps = []
        for r in g.replicas:
            device = options.device or r.device
            cores = () if device.startswith("gpu") else tuple(options.cpu_cores or r.cores or _all_cores())
            reps.append(Replica(device, cores, r.threads))
        per_group.append(reps)
    if options.device is not None or options.cpu_cores is not None:  # new cores: fair shares again
        fair = iter(_fair_threads([(r.device, r.cores) for reps in per_group for r in reps]))
        per_group = [[replace(r, threads=next(fair)) for r in reps] for reps in per_group]
    if options.threads_per_member is not None:
        per_group = [[replace(r, threads=options.threads_per_member) for r in reps] for reps in per_group]
    return check(Placement(tuple(
        replace(g, replicas=tuple(reps),
                batch_size=g.batch_size if options.batch_size is None else options.batch_size,
                queue_delay_us=g.queue_delay_us if options.queue_delay_us is None else options.queue_delay_us)
        for g, reps in zip(placement.groups, per_group))))


def plan_key(repo: Repository, ensemble: str, names: list[str], hardware: str) -> str:
    """The key a plan for ``ensemble`` (its members' files) on ``hardware`` is saved and found under."""
    from enserve.optimizer.profiles import file_hash

    return plans.plan_key(ensemble, [file_hash(str(repo.members[n].path)) for n in names], hardware)


def resolve(repo: Repository, options: ServeOptions, make_plan: Callable[[list, str], plans.Plan],
            log: logging.Logger = LOG) -> Placement:
    """The placement of one unit (an ensemble and its members, or members alone), in one place: a
    forced plan (``--plan``) for its ensemble; the configs when the allocator is off, the placement
    manual, or there is no single ensemble; else the plan saved for this ensemble and hardware, or a
    new one from ``make_plan(devices, ensemble)`` (saved beside the repository); then the manual flags
    on top. ``log`` hears what was chosen and why."""
    from enserve.optimizer.devices import hardware_fingerprint, inventory
    from enserve.server.served.repository import ensemble_members

    if options.plan_path is not None:
        try:
            plan = plans.load(options.plan_path)
        except ValueError as exc:
            raise RepositoryError(str(exc)) from exc
        if plan.ensemble in repo.ensembles or not repo.ensembles:
            log.info("placement from plan %s (score %.1f, %s)", options.plan_path, plan.score, plan.metric)
            return with_flags(from_plan(repo, plan), options)
    if not options.optimize or options.manual_placement or not repo.ensembles:
        return with_flags(from_config(repo), options)
    if len(repo.ensembles) > 1:
        log.info("several ensembles %s: placement from config.pbtxt (run 'enserve allocate --ensemble E' and serve "
                 "with --plan)", sorted(repo.ensembles))
        return with_flags(from_config(repo), options)
    try:
        devices = inventory(options.cpu_devices)
    except ValueError as exc:
        raise RepositoryError(str(exc)) from exc
    ensemble, names = ensemble_members(repo, None)
    key = plan_key(repo, ensemble, names, hardware_fingerprint(devices))
    path = plans.plan_path(repo.path, ensemble, key)
    if path.is_file():
        plan = plans.load(path)
        log.info("reusing the plan for this ensemble and hardware: %s", path)
    else:
        plan = make_plan(devices, ensemble)
        try:
            plans.save(plan, path)
        except OSError as exc:
            log.warning("could not save the plan to %s: %s", path, exc)
    log.info("placement:\n%s", plans.plan_table(plan))
    return with_flags(from_plan(repo, plan), options)


def check(placement: Placement) -> Placement:
    seen: set[str] = set()
    for g in placement.groups:
        if not g.members or len(g.members) > MAX_GROUP_MEMBERS:
            raise RepositoryError(
                f"worker group {list(g.members)} has {len(g.members)} members, but must have 1 to "
                f"{MAX_GROUP_MEMBERS}")
        twice = seen & set(g.members)
        if twice:
            raise RepositoryError(f"members {sorted(twice)} are placed in two worker groups")
        seen.update(g.members)
        if not g.replicas:
            raise RepositoryError(f"worker group {list(g.members)} has no replica")
        if g.batch_size < 1:
            raise RepositoryError(f"worker group {list(g.members)}: batch size {g.batch_size}, but must be >= 1")
        for r in g.replicas:
            if r.threads < 1:
                raise RepositoryError(
                    f"worker group {list(g.members)}: a replica on {r.device} has {r.threads} threads, "
                    "but must have >= 1")
    return placement


def describe(placement: Placement) -> str:
    """One line per group: members, batch size, and each replica's device, cores and threads."""
    lines = []
    for g in placement.groups:
        reps = ", ".join(f"{r.device}" + (f"[{','.join(map(str, r.cores))}]" if r.cores else "") + f"x{r.threads}t"
                         for r in g.replicas)
        lines.append(f"{'+'.join(g.members)}: batch {g.batch_size}, {len(g.replicas)} replica(s): {reps}")
    return "\n".join(lines)
