"""Plain data of the allocator: devices, member profiles, allocations (no I/O).

An allocation is a set of worker groups. A group runs some members (indices in ensemble order)
in each of its replicas, one process each, at one batch size; a replica has a device and an
intra-op thread count. One group per member with one replica is the paper's allocation; one
group of every member with k replicas is Triton's python backend with k instances.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Device:
    """A GPU, or a CPU device = a set of cores with the memory available to it."""

    name: str  # "gpu:0", "cpu:0", ...
    kind: str  # "gpu" | "cpu"
    memory_bytes: int
    cores: tuple[int, ...] = ()
    index: int = 0  # GPU index



def cpu_key(threads: int) -> str:
    """The profile key of a member's latencies measured on ``threads`` CPU cores."""
    return f"cpu{threads}"


@dataclass(frozen=True)
class MemberProfile:
    """Measured (or supplied) cost of one member: memory, and seconds per batch by device key
    (``cpu<k>``: on k intra-op threads; ``gpu``)."""

    name: str
    memory_bytes: int
    latency_s: dict[str, dict[int, float]] = field(default_factory=dict)  # key -> batch -> s

    def latency(self, key: str, batch: int) -> float:
        table = self.latency_s.get(key)
        if not table:
            raise KeyError(f"member '{self.name}' has no profile for device '{key}'")
        if batch in table:
            return table[batch]
        sizes = sorted(table)
        lo = max([b for b in sizes if b <= batch], default=sizes[0])
        hi = min([b for b in sizes if b >= batch], default=sizes[-1])
        if lo == hi:
            return table[lo] * batch / lo
        w = (batch - lo) / (hi - lo)
        return table[lo] * (1 - w) + table[hi] * w

    def threads_measured(self) -> int:
        """The most CPU threads this profile has a measurement for."""
        return max([int(k[3:]) for k in self.latency_s if k.startswith("cpu")], default=1)


@dataclass(frozen=True, order=True)
class ReplicaAlloc:
    device: str
    threads: int = 1


@dataclass(frozen=True, order=True)
class GroupAlloc:
    members: tuple[int, ...]
    batch: int
    replicas: tuple[ReplicaAlloc, ...]


@dataclass(frozen=True)
class Allocation:
    """Worker groups, kept in a canonical order (members sorted, groups by first member, replicas
    sorted) so that equal allocations compare and hash equal."""

    groups: tuple[GroupAlloc, ...]

    @staticmethod
    def of(groups) -> Allocation:
        canon = [replace(g, members=tuple(sorted(g.members)), replicas=tuple(sorted(g.replicas))) for g in groups]
        return Allocation(tuple(sorted(canon, key=lambda g: g.members)))

    @staticmethod
    def per_member(devices: tuple[str, ...], batches: tuple[int, ...], threads: tuple[int, ...] | None = None
                   ) -> Allocation:
        """The paper's allocation: member i alone on ``devices[i]`` at ``batches[i]``."""
        threads = threads or tuple(1 for _ in devices)
        return Allocation.of(GroupAlloc((i,), b, (ReplicaAlloc(d, t),))
                             for i, (d, b, t) in enumerate(zip(devices, batches, threads)))

    def with_group(self, i: int, group: GroupAlloc | None, *extra: GroupAlloc) -> Allocation:
        """Group ``i`` replaced by ``group`` (or removed), plus ``extra`` groups."""
        rest = [g for k, g in enumerate(self.groups) if k != i]
        return Allocation.of(rest + ([group] if group is not None else []) + list(extra))

    def members(self) -> int:
        return sum(len(g.members) for g in self.groups)


class PlacementError(Exception):
    """The ensemble cannot be placed on the devices given."""


def memory_use(alloc: Allocation, members: list[MemberProfile]) -> dict[str, int]:
    """Bytes per device: each replica holds every member of its group."""
    use: dict[str, int] = {}
    for g in alloc.groups:
        need = sum(members[i].memory_bytes for i in g.members)
        for r in g.replicas:
            use[r.device] = use.get(r.device, 0) + need
    return use


def fits(alloc: Allocation, members: list[MemberProfile], devices: list[Device]) -> bool:
    capacity = {d.name: d.memory_bytes for d in devices}
    return all(used <= capacity[name] for name, used in memory_use(alloc, members).items())
