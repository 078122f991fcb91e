"""Refinement (paper Algorithm 1, extended): a neighbourhood search over worker groups.

One move changes one thing: a group's batch size; one replica's device or thread count; adds or
removes a replica; merges two groups into one or splits a member out of its group. A neighbour
is scored by a ``Bench`` (the real pipeline, or the cost model). The search never returns worse
than its start.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from enserve.optimizer.allocation import (
    Allocation,
    Device,
    GroupAlloc,
    MemberProfile,
    ReplicaAlloc,
    fits,
)

Bench = Callable[[Allocation], float]  # higher is better
ALL_MOVES = frozenset({"batch", "device", "threads", "replicas", "groups"})
PAPER_MOVES = frozenset({"batch", "device"})  # Algorithm 1 as published: one member's batch or device
# default budgets (allocations scored): a real-bench score is seconds of the pipeline; a cost-model
# score is microseconds, and a search with every move needs hundreds of them to converge
REAL_MAX_COMBI = 12
BENCHES = ("real", "cost")  # what scores an allocation: the real pipeline measured, or the cost model
METRICS = ("throughput", "latency")  # what a search maximises: images/s, or minus the p99 latency
COST_MAX_COMBI = 2000


@dataclass
class SearchResult:
    start: Allocation
    start_score: float
    best: Allocation
    best_score: float
    evaluated: int
    history: list[tuple[Allocation, float]] = field(default_factory=list)


def _replicas_without(g: GroupAlloc, k: int) -> tuple[ReplicaAlloc, ...]:
    return g.replicas[:k] + g.replicas[k + 1 :]


def group_moves(g: GroupAlloc, devices: list[Device], batch_sizes: list[int], max_threads: int,
                moves: frozenset[str] = ALL_MOVES) -> Iterator[GroupAlloc]:
    """Every group one change away (same members): batch size, a replica's device or threads, one
    replica more (one thread, on any device) or one fewer."""
    if "batch" in moves:
        for b in batch_sizes:
            if b != g.batch:
                yield replace(g, batch=b)
    by_name = {d.name: d for d in devices}
    seen: set[ReplicaAlloc] = set()
    for k, r in enumerate(g.replicas):
        if r in seen:  # identical replicas give identical neighbours
            continue
        seen.add(r)
        if "device" in moves:
            for d in devices:
                if d.name != r.device:
                    threads = min(r.threads, len(d.cores)) if d.kind == "cpu" else 1
                    yield replace(g, replicas=_replicas_without(g, k) + (ReplicaAlloc(d.name, threads),))
        dev = by_name[r.device]
        if "threads" in moves and dev.kind == "cpu":
            for t in (r.threads - 1, r.threads + 1):
                if 1 <= t <= min(len(dev.cores), max_threads):
                    yield replace(g, replicas=_replicas_without(g, k) + (ReplicaAlloc(r.device, t),))
        if "replicas" in moves and len(g.replicas) > 1:
            yield replace(g, replicas=_replicas_without(g, k))
    if "replicas" in moves:
        for d in devices:
            yield replace(g, replicas=g.replicas + (ReplicaAlloc(d.name, 1),))


def neighbours(alloc: Allocation, members: list[MemberProfile], devices: list[Device], batch_sizes: list[int],
               moves: frozenset[str] = ALL_MOVES) -> Iterator[Allocation]:
    """Every allocation one move away that fits in memory (duplicates may repeat)."""
    unknown = moves - ALL_MOVES
    if unknown:
        raise ValueError(f"moves {sorted(unknown)} are not among {sorted(ALL_MOVES)}")
    max_threads = min(m.threads_measured() for m in members)
    for i, g in enumerate(alloc.groups):
        for moved in group_moves(g, devices, batch_sizes, max_threads, moves):
            cand = alloc.with_group(i, moved)
            if cand != alloc and fits(cand, members, devices):
                yield cand
        if "groups" not in moves:
            continue
        if len(g.members) > 1:  # split one member out, onto the group's first replica's device
            for m in g.members:
                rest = tuple(x for x in g.members if x != m)
                cand = alloc.with_group(i, replace(g, members=rest),
                                        GroupAlloc((m,), g.batch, (ReplicaAlloc(g.replicas[0].device, 1),)))
                if fits(cand, members, devices):
                    yield cand
        for j in range(i + 1, len(alloc.groups)):  # merge: the members of both on i's replicas
            other = alloc.groups[j]
            merged = GroupAlloc(g.members + other.members, min(g.batch, other.batch), g.replicas)
            cand = Allocation.of([x for k, x in enumerate(alloc.groups) if k not in (i, j)] + [merged])
            if fits(cand, members, devices):
                yield cand


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
    rank: Bench | None = None,
    per_round: int | None = None,
    moves: frozenset[str] = ALL_MOVES,
    alternatives: tuple[Allocation, ...] = (),
    start_repeats: int = 1,
    progress: Callable[[int, Allocation, float, float], None] | None = None,
) -> SearchResult:
    """Move to the best improving neighbour until none improves, ``max_combi`` allocations were
    scored (the start included) or the time budget is spent. Never returns worse than the start.

    With a noisy bench, ``min_gain`` (relative) is the margin a neighbour must beat the current
    score by to count as better. With an expensive bench, ``rank`` (a cheap predictor, e.g. the
    cost model) orders the neighbours, and they are measured ``per_round`` at a time: the search
    moves to the best of the first such chunk that holds an improvement. ``alternatives`` are
    other starts, scored first (each ``start_repeats`` times, interleaved): the search starts from
    the best of them and ``start`` by their mean score."""
    if max_combi < 1:
        raise ValueError(f"max_combi is {max_combi}, but must be >= 1")
    if min_gain < 0:
        raise ValueError(f"min_gain is {min_gain}, but must be >= 0")
    if per_round is not None and per_round < 1:
        raise ValueError(f"per_round is {per_round}, but must be >= 1")
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    starts = list(dict.fromkeys((start, *alternatives)))
    scores: dict[Allocation, list[float]] = {a: [] for a in starts}
    result = SearchResult(start, 0.0, start, 0.0, 0, [])
    for _ in range(start_repeats):  # interleaved, so that a slow spell of a noisy machine hits all alike
        for alt in starts:
            if result.evaluated >= max_combi and scores[alt]:
                continue
            s = bench(alt)
            scores[alt].append(s)
            result.evaluated += 1
            result.history.append((alt, s))
            if progress:
                progress(result.evaluated, alt, s, max(max(v) for v in scores.values() if v))
    means = {a: sum(v) / len(v) for a, v in scores.items() if v}
    current = max(means, key=means.get)
    score = means[current]
    result.start = result.best = current
    result.start_score = result.best_score = score
    seen = set(starts)
    while result.evaluated < max_combi:
        candidates = []
        for cand in neighbours(current, members, devices, batch_sizes, moves):
            if cand not in seen:
                seen.add(cand)
                candidates.append(cand)
        if rank is not None:
            candidates.sort(key=rank, reverse=True)
        chunk = per_round or max(1, len(candidates))
        best_next, best_score = None, score + min_gain * abs(score)
        for k, cand in enumerate(candidates):
            if best_next is not None and k % chunk == 0:
                break  # an improvement in this chunk of the most promising: take it
            if result.evaluated >= max_combi or (deadline is not None and time.monotonic() >= deadline):
                break
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
