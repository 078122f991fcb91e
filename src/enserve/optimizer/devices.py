"""Device inventory: GPUs (NVML) and CPU devices (sets of cores with their share of memory)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

from enserve.optimizer.allocation import Device


def parse_core_list(text: str) -> tuple[int, ...]:
    """'0,2-3' -> (0, 2, 3)."""
    cores: list[int] = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = item.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"cpu core list '{text}' is invalid: expected e.g. '0,2-3'")
        cores.extend(range(int(lo), int(hi or lo) + 1))
    if not cores:
        raise ValueError(f"cpu core list '{text}' is empty")
    return tuple(cores)


def parse_cpu_devices(text: str) -> list[tuple[int, ...]]:
    """'0;1' -> [(0,), (1,)]; '0-3;4-7' -> [(0,1,2,3), (4,5,6,7)]."""
    devices = [parse_core_list(part) for part in text.split(";")]
    seen = [c for d in devices for c in d]
    if len(seen) != len(set(seen)):
        raise ValueError(f"CPU device list '{text}' uses a core twice")
    return devices


def available_memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_cpu_cores() -> tuple[int, ...]:
    """All cores this process may use but the orchestrator's (core 0) when there are 4 or more;
    on smaller machines the orchestrator shares them (reserving 1 of 2 cores halves the compute)."""
    cores = tuple(sorted(os.sched_getaffinity(0)))
    return cores[1:] if len(cores) >= 4 else cores


def gpus() -> list[Device]:
    """GPUs seen by NVML, with their free memory; none (and no error) without NVML or a driver."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []
    found = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            free = pynvml.nvmlDeviceGetMemoryInfo(handle).free
            found.append(Device(f"gpu:{i}", "gpu", int(free), index=i))
    finally:
        pynvml.nvmlShutdown()
    return found


def inventory(cpu_devices: str | None = None, *, use_gpus: bool = True) -> list[Device]:
    """GPUs first, then CPU devices (default: one device of ``default_cpu_cores()``)."""
    core_sets = parse_cpu_devices(cpu_devices) if cpu_devices else [default_cpu_cores()]
    allowed = set(os.sched_getaffinity(0))
    for cores in core_sets:
        missing = sorted(set(cores) - allowed)
        if missing:
            raise ValueError(f"CPU device {cores} uses cores {missing} this process may not run on ({sorted(allowed)})")
    memory = available_memory_bytes()
    total = sum(len(c) for c in core_sets)
    cpus = [Device(f"cpu:{i}", "cpu", memory * len(c) // total, cores=c) for i, c in enumerate(core_sets)]
    return (gpus() if use_gpus else []) + cpus


def hardware_fingerprint(devices: list[Device]) -> str:
    """Identifies the hardware a plan or profile was measured on."""
    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = {
        "cpu": cpu_model,
        "machine": platform.machine(),
        "devices": [(d.name, d.kind, list(d.cores)) + ((d.index,) if d.kind == "gpu" else ()) for d in devices],
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]
