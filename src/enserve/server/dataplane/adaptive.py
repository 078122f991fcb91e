"""Which point of an ensemble's front a request gets under a latency objective: pure functions of
the queues, the measured costs, the front and the objective, with known-answer tests.

A point's members live in some worker groups; on each, the request waits behind that group's
backlog (its least-loaded ready replica's queued rows times the group's measured time per row)
and then takes its own rows times the point's members' share of that time. The point is done
when its slowest group is. The richest point predicted to finish within the objective is served;
when none is, the cheapest. Members of the points left out are never scheduled."""

from __future__ import annotations

from collections.abc import Sequence

PLAN_SHARE = 0.7  # of the objective the prediction may fill: the rest absorbs noise and the fronts' own time
ANSWER_AT = 0.9  # of the objective: when a request not yet complete is answered with the members done


def predicted_ns(backlog_ns: Sequence[float], point: Sequence[tuple[int, float]], rows: int) -> float:
    """When a request of ``rows`` rows to a point would be done: the latest of its groups, each
    ``backlog_ns[g]`` plus ``rows`` times the point's time per row on that group (``point``: pairs
    of group and nanoseconds per row)."""
    return max(backlog_ns[g] + rows * row_ns for g, row_ns in point)


def richest_point(backlog_ns: Sequence[float], points: Sequence[Sequence[tuple[int, float]]], rows: int,
                  objective_ns: float) -> int:
    """The index of the richest point (the last of ``points`` that fits) predicted to finish within
    ``objective_ns``; 0, the cheapest, when none does."""
    if not points:
        raise ValueError("a front has at least one point")
    for i in range(len(points) - 1, 0, -1):
        if predicted_ns(backlog_ns, points[i], rows) <= objective_ns:
            return i
    return 0


def point_costs(member_ns: Sequence[Sequence[float]], row_ns: Sequence[float],
                masks: Sequence[Sequence[tuple[int, int]]]) -> list[list[tuple[int, float]]]:
    """Each point's (group, nanoseconds per row) from its parts (``masks``: pairs of group and the
    mask of its members there): the group's measured time per row (``row_ns``, all its members)
    times the point's members' share of the group's one-image costs (``member_ns``)."""
    out = []
    for parts in masks:
        point = []
        for g, mask in parts:
            costs = member_ns[g]
            total = sum(costs)
            share = (sum(c for k, c in enumerate(costs) if mask >> k & 1) / total) if total > 0 else 1.0
            point.append((g, row_ns[g] * share))
        out.append(point)
    return out
