"""Plain data of the allocator: devices, member profiles, allocations (no I/O)."""

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

    @property
    def profile_key(self) -> str:
        """Devices with the same key run a member equally fast."""
        return f"cpu{len(self.cores)}" if self.kind == "cpu" else "gpu"


@dataclass(frozen=True)
class MemberProfile:
    """Measured (or supplied) cost of one member: memory, and seconds per batch by device key."""

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


@dataclass(frozen=True)
class Allocation:
    """Per member (in ensemble order): its device name and batch size."""

    device: tuple[str, ...]
    batch: tuple[int, ...]

    def move(self, i: int, device: str) -> Allocation:
        return replace(self, device=self.device[:i] + (device,) + self.device[i + 1 :])

    def rebatch(self, i: int, batch: int) -> Allocation:
        return replace(self, batch=self.batch[:i] + (batch,) + self.batch[i + 1 :])


class PlacementError(Exception):
    """The ensemble cannot be placed on the devices given."""


def memory_use(alloc: Allocation, members: list[MemberProfile]) -> dict[str, int]:
    use: dict[str, int] = {}
    for d, m in zip(alloc.device, members):
        use[d] = use.get(d, 0) + m.memory_bytes
    return use


def fits(alloc: Allocation, members: list[MemberProfile], devices: list[Device]) -> bool:
    capacity = {d.name: d.memory_bytes for d in devices}
    return all(used <= capacity[name] for name, used in memory_use(alloc, members).items())
