"""The cost-model bench: predicted ensemble throughput of an allocation from member profiles.

A replica runs its group's members back to back on each batch: t = sum of their latencies at
the batch size (on a CPU, measured with the replica's intra-op threads), so it passes batch / t
images per second and a group the sum over its replicas. Images spread over a group's replicas
in proportion to those rates. A CPU device of c cores spends threads * t / batch core-seconds on
an image a replica runs; a GPU runs one batch at a time, t / batch seconds an image. The
ensemble is as fast as its slowest group or busiest device.
"""

from __future__ import annotations

from enserve.optimizer.allocation import Allocation, Device, MemberProfile, cpu_key


def predicted_throughput(alloc: Allocation, members: list[MemberProfile], devices: list[Device]) -> float:
    """Images per second the allocation should sustain."""
    by_name = {d.name: d for d in devices}
    load: dict[str, float] = {}  # device -> core-seconds (CPU) or seconds (GPU) per ensemble image
    rate = float("inf")
    for g in alloc.groups:
        replicas = []
        for r in g.replicas:
            dev = by_name[r.device]
            if dev.kind == "gpu":
                t = sum(members[i].latency("gpu", g.batch) for i in g.members)
                replicas.append((r.device, g.batch / t, t / g.batch))
            else:
                threads = min(r.threads, len(dev.cores))
                t = sum(members[i].latency(cpu_key(min(threads, members[i].threads_measured())), g.batch)
                        for i in g.members)
                replicas.append((r.device, g.batch / t, threads * t / g.batch))
        group_rate = sum(x for _, x, _ in replicas)
        rate = min(rate, group_rate)
        for device, x, cost in replicas:
            load[device] = load.get(device, 0.0) + x / group_rate * cost
    for name, used in load.items():
        dev = by_name[name]
        rate = min(rate, (len(dev.cores) if dev.kind == "cpu" else 1.0) / used)
    return rate


class CostModelBench:
    """A ``Bench`` for machines we may not have: scores allocations with ``predicted_throughput``."""

    def __init__(self, members: list[MemberProfile], devices: list[Device]) -> None:
        self.members = members
        self.devices = devices

    def __call__(self, alloc: Allocation) -> float:
        return predicted_throughput(alloc, self.members, self.devices)
