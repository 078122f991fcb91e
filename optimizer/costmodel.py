"""The cost-model bench: predicted ensemble throughput of an allocation from member profiles.

Members on one device share it. A CPU device of c cores gives each of its n members
max(1, c // n) intra-op threads (as the daemon does); its members need
sum(threads * latency / batch) core-seconds per image, so the device passes at most
c / that images per second, and each member at most batch / latency. A GPU runs its members one
after another: sum(latency / batch) seconds per image. The ensemble is as fast as its busiest
device (or slowest member).
"""

from __future__ import annotations

from enserve.optimizer.allocation import Allocation, Device, MemberProfile


def threads_for(device: Device, n_members: int) -> int:
    return max(1, len(device.cores) // max(1, n_members))


def predicted_throughput(alloc: Allocation, members: list[MemberProfile], devices: list[Device]) -> float:
    """Images per second the allocation should sustain."""
    by_name = {d.name: d for d in devices}
    on: dict[str, list[int]] = {}
    for i, d in enumerate(alloc.device):
        on.setdefault(d, []).append(i)
    rate = float("inf")
    for name, idx in on.items():
        dev = by_name[name]
        if dev.kind == "gpu":
            per_image = sum(members[i].latency(dev.profile_key, alloc.batch[i]) / alloc.batch[i] for i in idx)
            rate = min(rate, 1.0 / per_image)
            continue
        k = threads_for(dev, len(idx))
        key = f"cpu{k}"
        core_s = 0.0
        for i in idx:
            lat = members[i].latency(key, alloc.batch[i])
            core_s += k * lat / alloc.batch[i]
            rate = min(rate, alloc.batch[i] / lat)
        rate = min(rate, len(dev.cores) / core_s)
    return rate


class CostModelBench:
    """A ``Bench`` for machines we may not have: scores allocations with ``predicted_throughput``."""

    def __init__(self, members: list[MemberProfile], devices: list[Device]) -> None:
        self.members = members
        self.devices = devices

    def __call__(self, alloc: Allocation) -> float:
        return predicted_throughput(alloc, self.members, self.devices)
