"""Refinement (paper Algorithm 1): neighbourhood search over one member's batch size or device."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from enserve.optimizer.allocation import Allocation, Device, MemberProfile, fits

Bench = Callable[[Allocation], float]  # higher is better


@dataclass
class SearchResult:
    start: Allocation
    start_score: float
    best: Allocation
    best_score: float
    evaluated: int
    history: list[tuple[Allocation, float]] = field(default_factory=list)


def neighbours(
    alloc: Allocation, members: list[MemberProfile], devices: list[Device], batch_sizes: list[int]
) -> Iterator[Allocation]:
    """Every allocation one update away: one member's batch size, or one member's device (if it fits)."""
    for i in range(len(alloc.device)):
        for b in batch_sizes:
            if b != alloc.batch[i]:
                yield alloc.rebatch(i, b)
        for d in devices:
            if d.name != alloc.device[i]:
                moved = alloc.move(i, d.name)
                if fits(moved, members, devices):
                    yield moved


def neighbourhood_search(
    start: Allocation,
    members: list[MemberProfile],
    devices: list[Device],
    batch_sizes: list[int],
    bench: Bench,
    *,
    max_combi: int = 20,
    time_budget_s: float | None = None,
    min_gain: float = 0.0,
    progress: Callable[[int, Allocation, float, float], None] | None = None,
) -> SearchResult:
    """Move to the best improving neighbour until none improves, ``max_combi`` allocations were
    scored (the start included) or the time budget is spent. Never returns worse than the start.

    With a noisy bench, ``min_gain`` (relative) is the margin a neighbour must beat the current
    score by to count as better, so that measurement noise does not steer the search."""
    if max_combi < 1:
        raise ValueError(f"max_combi is {max_combi}, but must be >= 1")
    if min_gain < 0:
        raise ValueError(f"min_gain is {min_gain}, but must be >= 0")
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    current, score = start, bench(start)
    result = SearchResult(start, score, start, score, 1, [(start, score)])
    if progress:
        progress(1, start, score, score)
    seen = {start}
    while result.evaluated < max_combi:
        best_next, best_score = None, score + min_gain * abs(score)
        for cand in neighbours(current, members, devices, batch_sizes):
            if result.evaluated >= max_combi or (deadline is not None and time.monotonic() >= deadline):
                break
            if cand in seen:
                continue
            seen.add(cand)
            s = bench(cand)
            result.evaluated += 1
            result.history.append((cand, s))
            if s > best_score:
                best_next, best_score = cand, s
            if progress:
                progress(result.evaluated, cand, s, best_score if best_next is not None else score)
        if best_next is None:
            break
        current, score = best_next, best_score
        if deadline is not None and time.monotonic() >= deadline:
            break
    result.best, result.best_score = current, score
    return result
