"""Allocation of contiguous row ranges in the shared input ring (pure, no I/O).

Requests take rows in arrival order and free them in any order; the ring's tail moves past
a range only once everything before it is free, so consecutive requests stay contiguous and
a worker's batch is usually one slice of shared memory.
"""

from __future__ import annotations

from collections import deque


class RowRing:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity is {capacity}, but must be >= 1")
        self.capacity = capacity
        self.head = 0  # next row to hand out
        self.used = 0  # rows between tail and head, including skipped wrap-around gaps
        self.live: deque[list[int]] = deque()  # [start, count, freed] in allocation order

    def alloc(self, count: int) -> int | None:
        """First row of ``count`` contiguous rows, or None when the ring is too full."""
        if count < 1 or count > self.capacity:
            raise ValueError(f"row count is {count}, but must be in [1, {self.capacity}]")
        start = self.head
        gap = 0
        if start + count > self.capacity:  # does not fit before the end: skip to row 0
            gap = self.capacity - start
            start = 0
        if self.used + gap + count > self.capacity:
            return None
        if gap:
            self.live.append([self.head, gap, 1])
        self.live.append([start, count, 0])
        self.used += gap + count
        self.head = (start + count) % self.capacity
        return start

    def free(self, start: int) -> None:
        for entry in self.live:
            if entry[0] == start and not entry[2]:
                entry[2] = 1
                break
        else:
            raise ValueError(f"row {start} is not allocated")
        while self.live and self.live[0][2]:
            self.used -= self.live.popleft()[1]
        if not self.live:
            self.used = 0
