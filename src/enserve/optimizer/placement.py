"""Start allocation (paper §2.4): worst-fit decreasing by memory, GPUs first, CPU devices as fallback;
then CPU members get replicas in proportion to their profiled compute, so that no member is bound
to one core while the device's other cores sit idle."""

from __future__ import annotations

import math

from enserve.optimizer.allocation import (
    Allocation,
    Device,
    GroupAlloc,
    MemberProfile,
    PlacementError,
    ReplicaAlloc,
    fits,
)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def worst_fit_decreasing(members: list[MemberProfile], devices: list[Device], batch: int) -> Allocation:
    """Place the largest member first on the GPU with the most free memory that holds it; when no
    GPU can, on the CPU device with the most free memory. n steps; a precise error if one fits nowhere.
    One group per member, one replica with one thread."""
    if not devices:
        raise PlacementError("no device to place the ensemble on")
    free = {d.name: d.memory_bytes for d in devices}
    order = sorted(range(len(members)), key=lambda i: -members[i].memory_bytes)
    placed: dict[int, str] = {}
    for i in order:
        need = members[i].memory_bytes
        for kind in ("gpu", "cpu"):
            candidates = [d for d in devices if d.kind == kind and free[d.name] >= need]
            if candidates:
                best = max(candidates, key=lambda d: free[d.name])  # first of equals: stable
                free[best.name] -= need
                placed[i] = best.name
                break
        else:
            most = max(devices, key=lambda d: free[d.name])
            raise PlacementError(
                f"member '{members[i].name}' needs {_mib(need)}, but the most free memory left on any device "
                f"is {_mib(free[most.name])} on {most.name} (devices: "
                + ", ".join(f"{d.name} {_mib(d.memory_bytes)}" for d in devices) + ")"
            )
    return Allocation.per_member(tuple(placed[i] for i in range(len(members))), tuple(batch for _ in members))


def core_budgets(costs: list[float], cores: int) -> list[int]:
    """Replicas per member on a CPU device of ``cores`` cores: its share of the device's compute
    (cost = core-seconds per image) times the cores, rounded up, at least 1 and at most ``cores``."""
    total = sum(costs)
    if total <= 0:
        return [1 for _ in costs]
    return [min(cores, max(1, math.ceil(round(c / total * cores, 6)))) for c in costs]


def proportional_start(alloc: Allocation, members: list[MemberProfile], devices: list[Device]) -> Allocation:
    """Give each one-replica group on a CPU device ``core_budgets`` replicas of one thread each,
    fewer where memory does not hold them."""
    by_name = {d.name: d for d in devices}
    groups = list(alloc.groups)
    for dev in devices:
        if dev.kind != "cpu":
            continue
        on = [k for k, g in enumerate(groups) if len(g.replicas) == 1 and g.replicas[0].device == dev.name]
        costs = [sum(members[i].latency("cpu1", g.batch) for i in g.members) / g.batch
                 for g in (groups[k] for k in on)]
        for k, replicas in sorted(zip(on, core_budgets(costs, len(by_name[dev.name].cores))),
                                  key=lambda kr: -kr[1]):
            for n in range(replicas, 1, -1):
                grown = groups[:k] + [GroupAlloc(groups[k].members, groups[k].batch,
                                                 tuple(ReplicaAlloc(dev.name, 1) for _ in range(n)))] + groups[k + 1:]
                if fits(Allocation.of(grown), members, devices):
                    groups = grown
                    break
    return Allocation.of(groups)


def replicated_whole(members: list[MemberProfile], devices: list[Device], batch: int) -> Allocation | None:
    """The other end of the placement space: one worker group holding every member, one replica per
    GPU that holds them all, else one one-thread replica per core of the largest CPU device (as
    many as its memory holds). What Triton's python backend with k instances does. None if no
    device holds every member."""
    need = sum(m.memory_bytes for m in members)
    gpus = [d for d in devices if d.kind == "gpu" and d.memory_bytes >= need]
    if gpus:
        replicas = [ReplicaAlloc(d.name, 1) for d in gpus]
    else:
        cpus = [d for d in devices if d.kind == "cpu" and d.memory_bytes >= need]
        if not cpus:
            return None
        cpu = max(cpus, key=lambda d: (len(d.cores), d.memory_bytes))
        replicas = [ReplicaAlloc(cpu.name, 1)] * max(1, min(len(cpu.cores), cpu.memory_bytes // max(1, need)))
    return Allocation.of([GroupAlloc(tuple(range(len(members))), batch, tuple(replicas))])
