"""Start allocation (paper §2.4): worst-fit decreasing by memory, GPUs first, CPU devices as fallback."""

from __future__ import annotations

from enserve.optimizer.allocation import Allocation, Device, MemberProfile, PlacementError


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def worst_fit_decreasing(members: list[MemberProfile], devices: list[Device], batch: int) -> Allocation:
    """Place the largest member first on the GPU with the most free memory that holds it; when no
    GPU can, on the CPU device with the most free memory. n steps; a precise error if one fits nowhere."""
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
    return Allocation(tuple(placed[i] for i in range(len(members))), tuple(batch for _ in members))
