"""The load-adaptive policy's known answers: which front point a request gets from the queues,
the measured costs, the front and the objective."""

from __future__ import annotations

import pytest

from enserve.server.dataplane.adaptive import (
    PointCosts,
    mask_ns,
    point_costs,
    predicted_ns,
    richest_point,
)

MS = 1e6
# group 0 runs a (1 ms an image); group 1 runs b and c (2 and 6 ms an image; 8 ms together)
MEMBER_NS = [[1 * MS], [2 * MS, 6 * MS]]
SCALE = [1.0, 1.0]  # batching has not made either group cheaper yet
FRONT = [[(0, 0b1)], [(0, 0b1), (1, 0b01)], [(0, 0b1), (1, 0b11)]]  # a; a+b; a+b+c


def test_a_points_time_per_row_is_its_members_costs_on_each_group_times_batchings_gain():
    assert point_costs(MEMBER_NS, SCALE, FRONT) == [
        [(0, 1 * MS)], [(0, 1 * MS), (1, 2 * MS)], [(0, 1 * MS), (1, 8 * MS)]]
    # group 1's batches took half their images' one-by-one costs: b is 1 ms a row there
    assert point_costs(MEMBER_NS, [1.0, 0.5], FRONT)[1] == [(0, 1 * MS), (1, 1 * MS)]
    assert point_costs([[0.0], [0.0, 0.0]], SCALE, FRONT)[2] == [(0, 0.0), (1, 0.0)]  # not measured yet: free


@pytest.mark.parametrize("backlog_ms, expected", [
    ((0, 0), 2),  # idle: a+b+c ends at max(2, 16) = 16 ms <= 20
    ((0, 10), 1),  # group 1 busy 10 ms: a+b+c 26 ms; a+b max(2, 10 + 4) = 14 ms
    ((0, 30), 0),  # a+b 34 ms: only a fits
    ((25, 0), 0),  # a itself 27 ms: nothing fits, the cheapest is served
    ((18, 0), 2),  # group 0 busy 18 ms: a+b+c ends at max(18 + 2, 16) = 20 ms, within the objective exactly
    ((19, 0), 0),  # 21 ms for every point: the cheapest
])
def test_the_richest_point_that_fits_the_objective_is_chosen(backlog_ms, expected):
    points = point_costs(MEMBER_NS, SCALE, FRONT)
    backlog = [b * MS for b in backlog_ms]
    assert richest_point(backlog, points, 2, 20 * MS) == expected


def test_point_costs_are_computed_only_as_the_policy_looks_at_them():
    costs = PointCosts(lambda g, mask: mask_ns(MEMBER_NS[g], mask), SCALE, FRONT)
    assert richest_point([0.0, 0.0], costs, 2, 20 * MS) == 2 and set(costs.known) == {2}  # idle: the richest only
    assert richest_point([0.0, 30 * MS], costs, 2, 20 * MS) == 0 and set(costs.known) == {1, 2}  # 0 is the fallback
    assert list(costs) == [[(0, 1 * MS)], [(0, 1 * MS), (1, 2 * MS)], [(0, 1 * MS), (1, 8 * MS)]]  # by hand
    assert costs[-1] == costs[2]
    asked = []  # the orchestrator's cost: each group's cached mask sums (``GroupRuntime.mask_ns``)
    assert PointCosts(lambda g, mask: asked.append((g, mask)) or mask_ns(MEMBER_NS[g], mask), {0: 1.0, 1: 0.5},
                      FRONT)[1] == [(0, 1 * MS), (1, 1 * MS)]
    assert asked == [(0, 0b1), (1, 0b01)]  # the scale only from the groups the point uses
    with pytest.raises(IndexError):
        costs[3]


def test_prediction_is_the_slowest_group_and_a_front_is_not_empty():
    assert predicted_ns([5 * MS, 1 * MS], [(0, 1 * MS), (1, 3 * MS)], 4) == 13 * MS
    with pytest.raises(ValueError, match="at least one point"):
        richest_point([0.0], [], 1, 1.0)


def test_what_load_taught_fades_back_to_its_idle_value():
    from enserve.server.dataplane.adaptive import decayed

    assert decayed(3.0, 0.0) == 3.0
    assert decayed(3.0, 1.0) == pytest.approx(2.0)  # halfway back to 1 after one half-life
    assert decayed(3.0, 2.0) == pytest.approx(1.5)
    assert decayed(0.5, 1.0) == pytest.approx(0.75)  # a gain from batching fades the same way
    assert decayed(3.0, -1.0) == 3.0  # a clock that went back changes nothing
    assert decayed(8e6, 1.0, rest=0.0) == pytest.approx(4e6)  # the slack fades to 0 the same way
    assert decayed(8e6, 3.0, rest=0.0) == pytest.approx(1e6)


def test_the_slack_rises_fast_and_falls_slowly():
    from enserve.server.dataplane.adaptive import slack

    assert slack(0.0, 30 * MS, 20 * MS) == pytest.approx(0.3 * 10 * MS)  # 10 ms over: up by 30 % of the gap
    assert slack(10 * MS, 15 * MS, 20 * MS) == pytest.approx(10 * MS - 0.05 * 10 * MS)  # early: down by 5 %
    assert slack(0.0, 5 * MS, 20 * MS) == 0.0


def test_a_groups_mask_costs_are_its_members_sums_once_measured():
    from enserve.server.dataplane.runtime import GroupRuntime

    rt = GroupRuntime(spec=None, ring=None)
    assert rt.mask_ns(0b11) == 0.0 and rt.mask_costs == {}  # not measured yet: free, and not remembered
    rt.member_ns = (2.0, 5.0)
    assert rt.mask_ns(0b11) == 7.0 and rt.mask_ns(0b10) == 5.0 and rt.mask_costs == {0b11: 7.0, 0b10: 5.0}


def test_the_idle_shortcut_answers_as_the_policy_does_when_no_task_is_out():
    """``Orchestrator._idle_prediction`` (nothing queued anywhere) gives the richest point's
    prediction exactly when ``_point_for`` would choose that point, and None otherwise."""
    import itertools
    from types import SimpleNamespace

    from enserve.server.dataplane.orchestrator import Orchestrator
    from enserve.server.dataplane.runtime import GroupRuntime
    from enserve.server.dataplane.supervisor import WorkerState
    from enserve.server.served.table import AnswerRecipe, ServedModel, ServedPoint

    recipe = AnswerRecipe("ens", "ensemble", (), 3.0, 0)
    points = tuple(ServedPoint(tuple("abc"[: i + 1]), tuple(parts), recipe) for i, parts in enumerate(FRONT))
    model = ServedModel("ens", "ensemble", (), (), 8, ("a", "b", "c"), 0, points[-1].parts, recipe, points)
    clock = SimpleNamespace(time=lambda: 10.0)
    chosen = set()
    for scales, slack_ns, count, objective_ms, ready in itertools.product(
            itertools.product((0.5, 1.0, 1.6), (0.3, 1.0, 1.4)), (0.0, 5 * MS), (1, 2, 3, 4), (16, 20, 40, 80),
            (True, False)):
        groups = []
        for g, costs in enumerate(MEMBER_NS):
            rt = GroupRuntime(spec=None, ring=None, member_ns=tuple(costs), scale=scales[g], scale_at=9.5)
            state = WorkerState.READY if ready or g == 0 else WorkerState.STARTING
            rt.workers = [SimpleNamespace(state=state, work_ns=0.0)]
            groups.append(rt)
        orch = SimpleNamespace(loop=clock, groups=groups, slack_ns=slack_ns, slack_at=9.0)
        orch._mask_cost = lambda g, mask, groups=groups: groups[g].mask_ns(mask)
        k, predicted = Orchestrator._point_for(orch, model, count, objective_ms / 1e3)
        idle = Orchestrator._idle_prediction(orch, model, count, objective_ms / 1e3)
        chosen.add(k)
        if k == len(points) - 1:
            assert idle == predicted, (scales, slack_ns, count, objective_ms, ready)
        else:
            assert idle is None, (scales, slack_ns, count, objective_ms, ready, k)
    assert chosen == {0, 1, 2}  # every way the policy can go was met
    # on the budget exactly: one row, group 1 at scale 1 (8 ms), a slack (learnt just now: not faded)
    # that leaves the plan's share of 40 ms exactly 8 ms: chosen
    from enserve.server.dataplane.adaptive import PLAN_SHARE

    groups = [GroupRuntime(spec=None, ring=None, member_ns=tuple(c), workers=[SimpleNamespace(
        state=WorkerState.READY, work_ns=0.0)]) for c in MEMBER_NS]
    share = PLAN_SHARE * 0.040 * 1e9
    orch = SimpleNamespace(loop=clock, groups=groups, slack_ns=share - 8 * MS, slack_at=clock.time())
    assert share - orch.slack_ns == 8 * MS and Orchestrator._idle_prediction(orch, model, 1, 0.040) == 8 * MS
