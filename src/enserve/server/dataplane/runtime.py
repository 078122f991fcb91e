"""What the data plane is made of: the shared input rings, and per worker group its replicas'
processes, each with output slots of its own; built from the served-model table and the placement."""

from __future__ import annotations

import itertools
import mmap
from dataclasses import dataclass, field

from enserve.server.config import ServeOptions
from enserve.server.dataplane.adaptive import mask_ns
from enserve.server.dataplane.shm import OWNER, SharedMemoryError, shm_free_bytes
from enserve.server.dataplane.slots import InputRing, OutputSlots, ring_rows, slot_row_bytes
from enserve.server.dataplane.supervisor import WorkerProcess
from enserve.server.dataplane.worker import WorkerSpec
from enserve.server.protocol import Task
from enserve.server.served.placement import Placement, WorkerGroup
from enserve.server.served.repository import Repository
from enserve.server.served.table import Table

MAX_RING_ROWS = 16384
RUNTIMES = itertools.count()
MIB = 1 << 20
SHM_SHARE = 0.8  # of /dev/shm's free space the default budget takes


@dataclass(eq=False)
class GroupRuntime:
    spec: WorkerGroup
    ring: InputRing
    workers: list[WorkerProcess] = field(default_factory=list)
    held: list[Task] = field(default_factory=list)  # tasks waiting for a replica to be ready (dispatch's)
    batch_ns: float = 0.0  # moving average of one batch's compute time
    member_ns: tuple[float, ...] = ()  # one image's compute per member, as its first ready replica measured
    scale: float = 1.0  # moving average of a batch's compute over its tasks' one-image costs (batching's gain)
    scale_at: float = 0.0  # when it was last updated (loop clock)
    mask_costs: dict[int, float] = field(default_factory=dict)  # ``mask_ns``'s answers, once measured

    def mask_ns(self, mask: int) -> float:
        """One image's compute through the members ``mask`` names (0 until they are measured; each
        mask's sum computed once: the policy and the dispatch ask for the same few on every request)."""
        cost = self.mask_costs.get(mask)
        if cost is None:
            cost = mask_ns(self.member_ns, mask)
            if self.member_ns:
                self.mask_costs[mask] = cost
        return cost


def shm_budget(options: ServeOptions) -> int:
    """Bytes this runtime may reserve: what is left of ``--shm-budget`` after the process's other
    runtimes, or by default ``SHM_SHARE`` of /dev/shm's free space (room for clients' regions)."""
    if options.shm_budget is not None:
        return max(0, options.shm_budget - OWNER.bytes)
    return int(SHM_SHARE * shm_free_bytes())


def size_rings(repo: Repository, placement: Placement, table: Table, options: ServeOptions) -> list[int]:
    """Rows of every input ring: ``--shm-arena-mib`` of inputs each (at least 4 max batches), scaled
    down to the shared-memory budget, never below one max batch."""
    minimum = [1] * len(table.rings)
    for m in table.models.values():
        minimum[m.ring] = max(minimum[m.ring], m.max_batch_size)
    row_bytes = [sum(t.row_bytes for t in inputs) + 1 for inputs in table.rings]  # + the row's live flag
    wanted = [int(min(MAX_RING_ROWS, max(4 * low, (options.arena_mib << 20) // max(1, rb))))
              for low, rb in zip(minimum, row_bytes)]
    arenas = sum(len(inputs) + 1 for inputs in table.rings)
    for g, spec in enumerate(placement.groups):
        outputs = repo.members[spec.members[0]].outputs
        row_bytes[table.group_rings[g]] += len(spec.replicas) * slot_row_bytes(outputs)
        arenas += len(spec.replicas) * (len(outputs) + 1)
    budget, pages = shm_budget(options), arenas * mmap.PAGESIZE  # each object rounds up to pages
    rows = ring_rows(wanted, minimum, row_bytes, budget - pages)
    if rows is None:
        need = pages + sum(m * b for m, b in zip(minimum, row_bytes))
        given = (f"--shm-budget is {options.shm_budget / MIB:.1f} MiB" if options.shm_budget is not None
                 else f"the default budget is {SHM_SHARE:.0%} of it")
        raise SharedMemoryError(
            f"shared memory: the models need at least {need / MIB:.1f} MiB (one max batch per input ring and "
            f"output slot), but /dev/shm has {shm_free_bytes() / MIB:.1f} MiB free and {given}; raise "
            "--shm-budget, or give the container a larger /dev/shm (docker --shm-size, a Kubernetes emptyDir "
            "with medium: Memory)")
    return rows


def build_runtime(repo: Repository, placement: Placement, table: Table,
                  options: ServeOptions) -> tuple[list[InputRing], list[GroupRuntime], list[WorkerProcess]]:
    """Create the shared memory (sized to the budget, reserved) and the (not yet started) worker table;
    on any failure nothing is left behind."""
    serial = next(RUNTIMES)  # runtimes of one process (loaded models, reloads) never share a name
    rings: list[InputRing] = []
    workers: list[WorkerProcess] = []
    try:
        for i, (inputs, rows) in enumerate(zip(table.rings, size_rings(repo, placement, table, options))):
            rings.append(InputRing(f"u{serial}.in{i}", list(inputs), rows))
        groups = [_group(repo, g, spec, rings[table.group_rings[g]], serial, workers)
                  for g, spec in enumerate(placement.groups)]
    except BaseException:
        release_memory(rings, workers)
        raise
    return rings, groups, workers


def member_weights(repo: Repository) -> dict[str, float]:
    """Each member's weight in the weighted-mean ensemble it serves (members of none: 1)."""
    weights: dict[str, float] = {}
    for ens in repo.ensembles.values():
        if ens.weights is not None:
            weights |= ens.weight_of()
    return weights


def _group(repo: Repository, g: int, spec: WorkerGroup, ring: InputRing, serial: int,
           workers: list[WorkerProcess]) -> GroupRuntime:
    rt = GroupRuntime(spec, ring)
    outputs = repo.members[spec.members[0]].outputs
    weights = member_weights(repo)
    for replica in spec.replicas:
        index = len(workers)
        slots = OutputSlots(f"u{serial}.out{index}", outputs, ring.capacity)
        worker = WorkerSpec(
            members=[(m, str(repo.members[m].path)) for m in spec.members],
            device=replica.device, cpu_cores=list(replica.cores) or None, threads=replica.threads,
            batch_size=spec.batch_size, queue_delay_us=spec.queue_delay_us, capacity=ring.capacity,
            inputs=[(t.name, t.np_dtype.str, list(t.dims), a.name) for t, a in zip(ring.inputs, ring.arenas)],
            live=ring.live_arena,
            outputs=slots.layout(), task_fd=-1, done_fd=-1, lifeline_fd=-1, index=index,
            burst_threads=len(replica.cores) if len(replica.cores) > replica.threads else 0,
            weights=[weights.get(m, 1.0) for m in spec.members] if weights else None)
        w = WorkerProcess(index, g, replica, worker, slots=slots)
        rt.workers.append(w)
        workers.append(w)
    return rt


def release_memory(rings: list[InputRing], workers: list[WorkerProcess]) -> None:
    for w in workers:
        if w.slots is not None:
            w.slots.close()
    for ring in rings:
        ring.close()
