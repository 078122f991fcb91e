"""Which point of an ensemble's front a request gets under a latency objective: pure functions of
the queues, the measured costs, the front and the objective, with known-answer tests.

A point's members live in some worker groups; on each, the request waits behind that group's
backlog (the compute its least-loaded ready replica holds, at its members' one-image costs, times
how much cheaper batching has made the group's batches) and then takes its own rows times the
point's members' one-image costs there, times the same factor. The point is done when its slowest
group is. The richest point predicted to finish within the objective is served;
when none is, the cheapest. Members of the points left out are never scheduled."""

from __future__ import annotations

from collections.abc import Callable, Sequence

PLAN_SHARE = 0.4  # of the objective the prediction may fill: the rest absorbs noise and the frontends' own time
# (on 2 cores at 50 ms, 32 rows a request: 0.7 kept 96-98 % of answers within it at 2-4x load; 0.5 99.4-100 %
# in one run but 98.4 and 98.5 % at 4x in two later ones; 0.4 kept 99.5-100 % at every load in three runs)
RISK_SHARE = 0.5  # of the time to an early answer: a request predicted past it runs its first point apart
ANSWER_AT = 0.8  # of the objective: when a request not yet complete is answered with the members done (the
# rest is for the answer's way out through a busy front: under 4x load on 2 cores it took up to ~6 ms of 50)


SUSTAINED_RUN = 32  # requests in a row on one point before the log says the point served changed


def mask_ns(member_ns: Sequence[float], mask: int) -> float:
    """One image's compute through the members ``mask`` names (bits past the members are ignored)."""
    return float(sum(c for k, c in enumerate(member_ns) if mask >> k & 1))


def batch_factor(previous: float, infer_ns: float, one_by_one_ns: float, weight: float = 0.25) -> float:
    """A group's batching factor after a batch: a moving average of the members' measured compute
    (their session runs only: gathering rows and storing sums are the fronts' slack) over the same
    images' one-image costs, kept within [0.05, 20]."""
    if one_by_one_ns <= 0:
        return previous
    return min(20.0, max(0.05, previous + weight * (infer_ns / one_by_one_ns - previous)))


def predicted_ns(backlog_ns: Sequence[float], point: Sequence[tuple[int, float]], rows: int) -> float:
    """When a request of ``rows`` rows to a point would be done: the latest of its groups, each
    ``backlog_ns[g]`` plus ``rows`` times the point's time per row on that group (``point``: pairs
    of group and nanoseconds per row)."""
    return max(backlog_ns[g] + rows * row_ns for g, row_ns in point)


def richest_point(backlog_ns: Sequence[float], points: Sequence[Sequence[tuple[int, float]]], rows: int,
                  budget_ns: float) -> int:
    """The index of the richest point (the last of ``points`` that fits) predicted to finish within
    ``budget_ns`` (the caller's share of the objective); 0, the cheapest, when none does."""
    if not points:
        raise ValueError("a front has at least one point")
    for i in range(len(points) - 1, 0, -1):
        if predicted_ns(backlog_ns, points[i], rows) <= budget_ns:
            return i
    return 0


def slack(previous: float, observed_ns: float, predicted_ns: float, up: float = 0.3, down: float = 0.05) -> float:
    """What answers take beyond their prediction (queueing in the fronts and pipes, a busy machine):
    a moving average that rises fast and falls slowly, so that the plan keeps room for the tail."""
    over = max(0.0, observed_ns - predicted_ns)
    return previous + (up if over > previous else down) * (over - previous)


FADE_HALF_LIFE_S = 1.0  # what load taught (batching factors, slack) fades back to its idle value at this half-life


def decayed(value: float, age_s: float, half_life_s: float = FADE_HALF_LIFE_S, rest: float = 1.0) -> float:
    """What load taught, ``age_s`` after it was last learnt: halfway back to ``rest`` every
    ``half_life_s``. A group's batching factor goes back to 1 (the one-image costs its replica
    measured idle): a member left out under load runs no batch, so its factor would otherwise keep the
    slowdown it last saw and never be chosen again. The slack goes back to 0: once load stops, few
    answers come to lower it, and the richer points must return all the same."""
    return rest + (value - rest) * 0.5 ** (max(0.0, age_s) / half_life_s)


class PointCosts(Sequence):
    """Each point's (group, nanoseconds per row) from its parts (``masks``: pairs of group and the
    mask of its members there): the one-image cost of its members there (``cost(g, mask)``, the
    sum of their costs as each group's first replica measured them, ``mask_ns``) times the group's
    batching factor (``scale[g]``: a batch's measured compute over the same costs of its tasks).
    Computed when first asked for: under light load ``richest_point`` looks at the richest point
    only."""

    def __init__(self, cost: Callable[[int, int], float], scale, masks: Sequence[Sequence[tuple[int, int]]]) -> None:
        self.cost, self.scale, self.masks = cost, scale, masks
        self.known: dict[int, list[tuple[int, float]]] = {}

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        if i not in self.known:
            self.known[i] = [(g, self.scale[g] * self.cost(g, mask)) for g, mask in self.masks[i]]
        return self.known[i]


def point_costs(member_ns: Sequence[Sequence[float]], scale: Sequence[float],
                masks: Sequence[Sequence[tuple[int, int]]]) -> list[list[tuple[int, float]]]:
    """Every point's costs at once (``PointCosts``), from each group's members' one-image costs."""
    return list(PointCosts(lambda g, mask: mask_ns(member_ns[g], mask), scale, masks))
