"""Shared memory of the data plane: the input ring that requests are copied into once, and the output
slots that workers write their members' running sums into, indexed by the same rows.

``RowRing`` (pure) hands out contiguous row ranges in arrival order and frees them in any order;
the ring's tail moves past a range only once everything before it is free, so consecutive
requests stay contiguous and a worker's batch is usually one slice of shared memory. An empty ring
starts over at row 0, so light traffic keeps reusing the same warm rows.

A row's life has one owner, the ring: a range stays allocated while anything can still read it.
The request that wrote it holds it, and so does every task that names it (``retain``); each lets go
once (``release``) and only the last release frees the rows. A request that expires is answered at
once, but its rows come back only when its tasks are done or dropped, so no later request is ever
given rows that a worker may still read for an earlier one. ``InputRing`` also keeps a live flag
per row, in shared memory: a cancelled request's rows read 0, and a worker skips tasks on them.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from enserve.server.dataplane.shm import Arena
from enserve.server.errors import InvalidArgument
from enserve.server.served.repository import TensorSpec


def ring_rows(wanted: list[int], minimum: list[int], row_bytes: list[int], budget: int) -> list[int] | None:
    """Rows per ring within ``budget`` bytes, where a row of ring i costs ``row_bytes[i]`` (its inputs
    and every output slot indexed by it): each ring gets its ``minimum`` (one max batch), then the
    rest of the budget in proportion to what it wanted beyond that; never more than ``wanted``.
    None when even the minimums do not fit."""
    need = sum(m * b for m, b in zip(minimum, row_bytes))
    if need > budget:
        return None
    extra = sum((w - m) * b for w, m, b in zip(wanted, minimum, row_bytes))
    share = 1.0 if extra <= budget - need else (budget - need) / extra
    return [m + int((w - m) * share) for w, m in zip(wanted, minimum)]


def create_arenas(tag: str, sizes: list[int]) -> list[Arena]:
    """One reserved object per size, named ``<tag>.<k>``; all or none (a shortage unlinks the others)."""
    arenas: list[Arena] = []
    try:
        for k, size in enumerate(sizes):
            arenas.append(Arena.create(f"{tag}.{k}", size))
    except BaseException:
        for a in arenas:
            a.close()
        raise
    return arenas


def square_spec(outputs: list[TensorSpec]) -> TensorSpec:
    """The slot of the first output's sum of squares (for the member variance)."""
    first = outputs[0]
    square_dtype = first.np_dtype if first.np_dtype.kind == "f" else np.dtype(np.float32)
    return TensorSpec(f"{first.name}.squares", "FP64" if square_dtype.itemsize == 8 else "FP32", first.dims)


def slot_row_bytes(outputs: list[TensorSpec]) -> int:
    """Bytes of one row of a replica's output slots (the outputs and the squares)."""
    return sum(t.row_bytes for t in outputs) + square_spec(outputs).row_bytes


class RowRing:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity is {capacity}, but must be >= 1")
        self.capacity = capacity
        self.head = 0  # next row to hand out
        self.used = 0  # rows between tail and head, including skipped wrap-around gaps
        self.live: deque[list[int]] = deque()  # [start, count, holders] in allocation order; a gap has 0
        self.ranges: dict[int, list[int]] = {}  # start -> its entry, for the allocated ones

    def alloc(self, count: int) -> int | None:
        """First row of ``count`` contiguous rows, held once (by their request); None when the ring is
        too full."""
        if count < 1 or count > self.capacity:
            raise ValueError(f"row count is {count}, but must be in [1, {self.capacity}]")
        if not self.live:  # empty: start over at row 0, whose pages are mapped and likely cached
            self.head = 0
        start = self.head
        gap = 0
        if start + count > self.capacity:  # does not fit before the end: skip to row 0
            gap = self.capacity - start
            start = 0
        if self.used + gap + count > self.capacity:
            return None
        if gap:
            self.live.append([self.head, gap, 0])
        entry = [start, count, 1]
        self.live.append(entry)
        self.ranges[start] = entry
        self.used += gap + count
        self.head = (start + count) % self.capacity
        return start

    def _entry(self, start: int) -> list[int]:
        entry = self.ranges.get(start)
        if entry is None:
            raise ValueError(f"row {start} is not allocated")
        return entry

    def count(self, start: int) -> int:
        """Rows of the range that starts at ``start``."""
        return self._entry(start)[1]

    def retain(self, start: int, holders: int = 1) -> None:
        """``holders`` more (tasks naming the range) keep it allocated."""
        self._entry(start)[2] += holders

    def release(self, start: int) -> bool:
        """One holder lets go of the range at ``start``; True when that was the last and its rows are free."""
        entry = self._entry(start)
        entry[2] -= 1
        if entry[2] > 0:
            return False
        del self.ranges[start]
        while self.live and self.live[0][2] == 0:
            self.used -= self.live.popleft()[1]
        if not self.live:
            self.used = 0
        return True


class InputRing:
    """The shared input rows of one input signature, and a live flag per row; every worker that reads
    it maps both."""

    def __init__(self, tag: str, inputs: list[TensorSpec], capacity: int) -> None:
        """``tag`` makes its shared-memory names unique within the process's run."""
        self.inputs = inputs
        self.capacity = capacity
        self.arenas = create_arenas(tag, [capacity * t.row_bytes for t in inputs] + [capacity])
        self.views = [a.array(t.np_dtype, (capacity, *t.dims)) for a, t in zip(self.arenas, inputs)]
        self.live = self.arenas[-1].array(np.dtype(np.uint8), (capacity,))
        self.rows = RowRing(capacity)

    @property
    def live_arena(self) -> str:
        return self.arenas[-1].name

    def put(self, arrays: list[np.ndarray], count: int) -> int | None:
        """Copy a request's inputs into free rows, marked live; their first row (held once, by the
        request), or None when the ring is full. A request larger than the whole ring is
        INVALID_ARGUMENT (it could never fit)."""
        if count > self.capacity:
            raise InvalidArgument(f"a request of {count} rows is larger than the shared input ring of "
                                  f"{self.capacity} rows; send at most {self.capacity} per request (or start the "
                                  "server with a larger --shm-arena-mib)")
        start = self.rows.alloc(count)
        if start is not None:
            for view, arr in zip(self.views, arrays):
                view[start : start + count] = arr
            self.live[start : start + count] = 1
        return start

    def retain(self, start: int, holders: int = 1) -> None:
        self.rows.retain(start, holders)

    def cancel(self, start: int) -> None:
        """The request at ``start`` will not be answered from its rows: workers skip its tasks."""
        self.live[start : start + self.rows.count(start)] = 0

    def release(self, start: int) -> None:
        self.rows.release(start)

    def close(self) -> None:
        for a in self.arenas:
            a.close()


class OutputSlots:
    """One worker group's outputs: per output the sum over the members it ran for a row, and the
    sum of squares of the first output (for the member variance)."""

    def __init__(self, tag: str, outputs: list[TensorSpec], capacity: int) -> None:
        self.outputs = outputs
        self.square = square_spec(outputs)
        specs = [*outputs, self.square]
        self.arenas = create_arenas(tag, [capacity * t.row_bytes for t in specs])
        views = [a.array(t.np_dtype, (capacity, *t.dims)) for a, t in zip(self.arenas, specs)]
        self.sums, self.squares = views[:-1], views[-1]

    def layout(self) -> list[tuple[str, str, list[int], str]]:
        """(name, numpy dtype, dims, arena) of every slot, outputs then squares: the worker's map."""
        specs = [*self.outputs, self.square]
        return [(t.name, t.np_dtype.str, list(t.dims), a.name) for t, a in zip(specs, self.arenas)]

    def close(self) -> None:
        for a in self.arenas:
            a.close()
