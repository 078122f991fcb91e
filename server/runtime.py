"""What the data plane is made of: the shared input rings, and per worker group its replicas'
processes, each with output slots of its own; built from the served-model table and the placement."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

from enserve.server.config import ServeOptions
from enserve.server.placement import Placement, WorkerGroup
from enserve.server.repository import Repository
from enserve.server.slots import InputRing, OutputSlots
from enserve.server.supervisor import WorkerProcess
from enserve.server.table import Table
from enserve.server.worker import WorkerSpec

MAX_RING_ROWS = 16384
RUNTIMES = itertools.count()


@dataclass(eq=False)
class GroupRuntime:
    spec: WorkerGroup
    ring: InputRing
    workers: list[WorkerProcess] = field(default_factory=list)
    held: list[tuple[int, int, int, int]] = field(default_factory=list)  # (rid, start, count, mask)
    batch_ns: float = 0.0  # moving average of one batch's compute time
    member_ns: tuple[float, ...] = ()  # one image's compute per member, as its first ready replica measured


def build_runtime(repo: Repository, placement: Placement, table: Table,
                  options: ServeOptions) -> tuple[list[InputRing], list[GroupRuntime], list[WorkerProcess]]:
    """Create the shared memory and the (not yet started) worker table."""
    owner = os.getpid()
    serial = next(RUNTIMES)  # runtimes of one process (loaded models, reloads) never share a name
    max_batch = max([m.max_batch_size for m in table.models.values()], default=1)
    rings = []
    for i, inputs in enumerate(table.rings):
        row_bytes = sum(t.row_bytes for t in inputs)
        rows = (options.arena_mib << 20) // max(1, row_bytes)
        rings.append(InputRing(owner, f"u{serial}.in{i}", list(inputs),
                               int(min(MAX_RING_ROWS, max(4 * max_batch, rows)))))
    groups: list[GroupRuntime] = []
    workers: list[WorkerProcess] = []
    for g, spec in enumerate(placement.groups):
        ring = rings[table.group_rings[g]]
        rt = GroupRuntime(spec, ring)
        groups.append(rt)
        outputs = repo.members[spec.members[0]].outputs
        for replica in spec.replicas:
            index = len(workers)
            slots = OutputSlots(owner, f"u{serial}.out{index}", outputs, ring.capacity)
            worker = WorkerSpec(
                members=[(m, str(repo.members[m].path)) for m in spec.members],
                device=replica.device, cpu_cores=list(replica.cores) or None, threads=replica.threads,
                batch_size=spec.batch_size, queue_delay_us=spec.queue_delay_us, capacity=ring.capacity,
                inputs=[(t.name, t.np_dtype.str, list(t.dims), a.name) for t, a in zip(ring.inputs, ring.arenas)],
                outputs=slots.layout(), task_fd=-1, done_fd=-1, lifeline_fd=-1, index=index,
                burst_threads=len(replica.cores) if len(replica.cores) > replica.threads else 0)
            w = WorkerProcess(index, g, replica, worker, slots=slots)
            rt.workers.append(w)
            workers.append(w)
    return rings, groups, workers


def release_memory(rings: list[InputRing], workers: list[WorkerProcess]) -> None:
    for w in workers:
        if w.slots is not None:
            w.slots.close()
    for ring in rings:
        ring.close()
