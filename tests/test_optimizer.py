"""The allocator's pure parts with exact answers: packing, neighbourhood search, cost model, plans."""

from __future__ import annotations

import itertools

import pytest

from enserve.optimizer import plan as plans
from enserve.optimizer.allocation import (
    Allocation,
    Device,
    GroupAlloc,
    MemberProfile,
    PlacementError,
    ReplicaAlloc,
    fits,
)
from enserve.optimizer.costmodel import predicted_throughput
from enserve.optimizer.devices import parse_cpu_devices
from enserve.optimizer.placement import (
    core_budgets,
    proportional_start,
    replicated_whole,
    worst_fit_decreasing,
)
from enserve.optimizer.search import neighbourhood_search, neighbours

MiB = 2**20


def member(name: str, mib: int, **latency) -> MemberProfile:
    return MemberProfile(name, mib * MiB, {k: dict(v) for k, v in latency.items()})


def per_member(alloc: Allocation) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(device, batch) of each member of a one-group-per-member, one-replica allocation."""
    assert all(len(g.members) == 1 and len(g.replicas) == 1 for g in alloc.groups)
    return tuple(g.replicas[0].device for g in alloc.groups), tuple(g.batch for g in alloc.groups)


def P(devices, batches, threads=None) -> Allocation:  # noqa: N802 - short for the paper's allocation
    return Allocation.per_member(tuple(devices), tuple(batches), threads)


def test_worst_fit_decreasing_gpu_first_worst_fit_then_cpu():
    members = [member("a", 300), member("b", 700), member("c", 500), member("d", 400)]
    devices = [Device("gpu:0", "gpu", 1000 * MiB), Device("gpu:1", "gpu", 900 * MiB),
               Device("cpu:0", "cpu", 4000 * MiB, cores=(0, 1))]
    alloc = worst_fit_decreasing(members, devices, batch=8)
    # b(700)->gpu:0 (1000 free) ; c(500)->gpu:1 (900) ; d(400)->gpu:1 (400 left vs 300) ; a(300)->gpu:0 (300)
    assert per_member(alloc) == (("gpu:0", "gpu:0", "gpu:1", "gpu:1"), (8, 8, 8, 8))
    assert fits(alloc, members, devices)


def test_worst_fit_decreasing_falls_back_to_cpu_and_spreads():
    members = [member("a", 600), member("b", 600), member("c", 100)]
    devices = [Device("gpu:0", "gpu", 1000 * MiB), Device("cpu:0", "cpu", 800 * MiB, cores=(0,)),
               Device("cpu:1", "cpu", 900 * MiB, cores=(1,))]
    alloc = worst_fit_decreasing(members, devices, batch=1)
    # a->gpu:0 (400 left), b does not fit the GPU -> cpu:1 (most free), c -> gpu:0 (GPU priority)
    assert per_member(alloc)[0] == ("gpu:0", "cpu:1", "gpu:0")


def test_worst_fit_decreasing_impossible_fit_is_a_precise_error():
    devices = [Device("cpu:0", "cpu", 100 * MiB, cores=(0,))]
    with pytest.raises(PlacementError, match=r"member 'big' needs 200.0 MiB, but the most free memory .* 100.0 MiB on cpu:0"):
        worst_fit_decreasing([member("big", 200)], devices, batch=1)


def _fake_bench(calls: list):
    """Deterministic and separable (so a greedy search can reach the optimum): best is a on cpu:1
    with batch 8 and b on cpu:0 with batch 32."""
    device_gain = [{"cpu:0": 0.0, "cpu:1": 3.0}, {"cpu:0": 2.0, "cpu:1": 0.5}]
    batch_gain = [{1: 0.0, 8: 4.0, 32: 1.0}, {1: 0.0, 8: 1.5, 32: 2.5}]

    def bench(alloc: Allocation) -> float:
        calls.append(alloc)
        if any(len(g.members) > 1 or len(g.replicas) > 1 for g in alloc.groups):
            return -100.0  # only the paper's allocations score here
        devices, batches = per_member(alloc)
        return sum(device_gain[i][d] + batch_gain[i][b] for i, (d, b) in enumerate(zip(devices, batches)))

    return bench


DEVICES = [Device("cpu:0", "cpu", 10**9, cores=(0,)), Device("cpu:1", "cpu", 10**9, cores=(1,))]
MEMBERS = [member("a", 10), member("b", 10)]


def test_search_finds_the_brute_force_optimum_and_never_loses():
    batch_sizes = [1, 8, 32]
    start = P(("cpu:0", "cpu:0"), (1, 1))
    calls: list = []
    bench = _fake_bench(calls)
    result = neighbourhood_search(start, MEMBERS, DEVICES, batch_sizes, bench, max_combi=1000)
    every = [P(d, b) for d in itertools.product(["cpu:0", "cpu:1"], repeat=2)
             for b in itertools.product(batch_sizes, repeat=2)]
    best = max(every, key=_fake_bench([]))
    assert result.best == best == P(("cpu:1", "cpu:0"), (8, 32))
    assert result.best_score == 11.5 > result.start_score
    assert result.evaluated == len(calls)


def test_search_stops_at_max_combi_and_returns_no_worse_than_start():
    calls: list = []
    start = P(("cpu:1", "cpu:0"), (8, 32))  # already the optimum
    result = neighbourhood_search(start, MEMBERS, DEVICES, [1, 8, 32], _fake_bench(calls), max_combi=4)
    assert len(calls) == 4 and result.evaluated == 4
    assert result.best == start and result.best_score == result.start_score

    def worse_everywhere(alloc):
        return 0.0 if alloc == start else -1.0

    result = neighbourhood_search(start, MEMBERS, DEVICES, [1, 8, 32], worse_everywhere, max_combi=50)
    assert result.best == start


def test_neighbours_change_one_thing_and_respect_memory():
    devices = [Device("cpu:0", "cpu", 15 * MiB, cores=(0,)), Device("cpu:1", "cpu", 15 * MiB, cores=(1,))]
    start = P(("cpu:0", "cpu:1"), (8, 8))
    got = list(neighbours(start, MEMBERS, devices, [1, 8, 32]))
    # 2 batch changes per member; moving, adding a replica or merging would put 20 MiB on a 15 MiB
    # device; one-core devices allow no second thread; a lone replica cannot be removed
    assert got == [P(("cpu:0", "cpu:1"), (1, 8)), P(("cpu:0", "cpu:1"), (32, 8)),
                   P(("cpu:0", "cpu:1"), (8, 1)), P(("cpu:0", "cpu:1"), (8, 32))]


def test_neighbours_add_remove_move_replicas_threads_merge_and_split():
    two = [Device("cpu:0", "cpu", 10**9, cores=(0, 1))]
    a, b = (member(n, 1, cpu1={8: 0.001}, cpu2={8: 0.001}) for n in "ab")
    r1, r2 = ReplicaAlloc("cpu:0", 1), ReplicaAlloc("cpu:0", 2)
    alone = Allocation.of([GroupAlloc((0,), 8, (r1,)), GroupAlloc((1,), 8, (r1, r1))])
    got = set(neighbours(alone, [a, b], two, [8]))
    assert got == {
        Allocation.of([GroupAlloc((0,), 8, (r2,)), GroupAlloc((1,), 8, (r1, r1))]),  # a: 2 threads
        Allocation.of([GroupAlloc((0,), 8, (r1, r1)), GroupAlloc((1,), 8, (r1, r1))]),  # a: a replica more
        Allocation.of([GroupAlloc((0,), 8, (r1,)), GroupAlloc((1,), 8, (r1, r2))]),  # b: one replica 2 threads
        Allocation.of([GroupAlloc((0,), 8, (r1,)), GroupAlloc((1,), 8, (r1,))]),  # b: a replica fewer
        Allocation.of([GroupAlloc((0,), 8, (r1,)), GroupAlloc((1,), 8, (r1, r1, r1))]),  # b: one more
        Allocation.of([GroupAlloc((0, 1), 8, (r1,))]),  # merged onto a's replicas
    }
    merged = Allocation.of([GroupAlloc((0, 1), 8, (r1,))])
    assert Allocation.of([GroupAlloc((0,), 8, (r1,)), GroupAlloc((1,), 8, (r1,))]) in set(
        neighbours(merged, [a, b], two, [8]))  # split b out again


def test_proportional_start_gives_heavy_members_more_replicas():
    # per image on one core: 1, 2, 3 and 14 ms; shares of 2 cores: 0.1, 0.2, 0.3, 1.4 -> 1, 1, 1, 2
    assert core_budgets([1.0, 2.0, 3.0, 14.0], 2) == [1, 1, 1, 2]
    assert core_budgets([1.0, 1.0], 8) == [4, 4]
    assert core_budgets([1.0, 99.0], 4) == [1, 4]
    ms = [member(n, 10, cpu1={8: 0.008 * c}) for n, c in zip("abcd", (1, 2, 3, 14))]
    devices = [Device("cpu:0", "cpu", 10**9, cores=(0, 1))]
    start = proportional_start(worst_fit_decreasing(ms, devices, 8), ms, devices)
    assert [len(g.replicas) for g in start.groups] == [1, 1, 1, 2]
    tight = [Device("cpu:0", "cpu", 45 * MiB, cores=(0, 1))]  # 4 members of 10 MiB: no room for a 5th copy
    start = proportional_start(worst_fit_decreasing(ms, tight, 8), ms, tight)
    assert [len(g.replicas) for g in start.groups] == [1, 1, 1, 1]


def test_cost_model_known_answers():
    a = member("a", 1, cpu1={8: 0.008}, cpu2={8: 0.005}, gpu={8: 0.002})  # 1 ms/img on one core
    b = member("b", 1, cpu1={8: 0.016}, cpu2={8: 0.010}, gpu={8: 0.004})  # 2 ms/img on one core
    two_cores = [Device("cpu:0", "cpu", 10**9, cores=(0, 1))]
    # both on one 2-core device: 1 thread each, 3 core-ms per image over 2 cores -> 666.7/s,
    # but b alone passes at most 8 / 0.016 = 500/s
    assert predicted_throughput(P(("cpu:0", "cpu:0"), (8, 8)), [a, b], two_cores) == pytest.approx(500)
    # two replicas of b: 1000/s from b, the device's 666.7/s is now the limit
    two_b = Allocation.of([GroupAlloc((0,), 8, (ReplicaAlloc("cpu:0"),)),
                           GroupAlloc((1,), 8, (ReplicaAlloc("cpu:0"), ReplicaAlloc("cpu:0")))])
    assert predicted_throughput(two_b, [a, b], two_cores) == pytest.approx(2000 / 3)
    # b on 2 threads: 8 / 0.010 = 800/s from b; it costs 2 * 10 / 8 = 2.5 core-ms an image, a 1: 571.4/s
    assert predicted_throughput(P(("cpu:0", "cpu:0"), (8, 8), (1, 2)), [a, b], two_cores) == pytest.approx(
        2 / 0.0035)
    # one group running both members back to back in 2 replicas: 24 ms a batch, 2 x 333.3/s = 666.7/s
    together = Allocation.of([GroupAlloc((0, 1), 8, (ReplicaAlloc("cpu:0"), ReplicaAlloc("cpu:0")))])
    assert predicted_throughput(together, [a, b], two_cores) == pytest.approx(2000 / 3)
    split = [Device("cpu:0", "cpu", 10**9, cores=(0,)), Device("cpu:1", "cpu", 10**9, cores=(1,))]
    assert predicted_throughput(P(("cpu:0", "cpu:1"), (8, 8)), [a, b], split) == pytest.approx(500)
    gpu = [Device("gpu:0", "gpu", 10**9)] + split
    # gpu runs both: (0.002 + 0.004) / 8 s per image -> 1333.3/s
    assert predicted_throughput(P(("gpu:0", "gpu:0"), (8, 8)), [a, b], gpu) == pytest.approx(8 / 0.006)
    # interpolation between measured batch sizes
    c = member("c", 1, cpu1={1: 0.001, 9: 0.005})
    assert c.latency("cpu1", 5) == pytest.approx(0.003)


def test_plan_round_trip_and_version(tmp_path):
    group = plans.PlanGroup(["a", "b"], 8, [plans.PlanReplica("cpu:0", "cpu", [0, 1], 2),
                                            plans.PlanReplica("cpu:0", "cpu", [0, 1], 1)])
    plan = plans.Plan("ens", "k", "hw", "throughput", [group], 1.0, 2.0, [group], 3, 0.0, bench="real")
    path = tmp_path / "p.json"
    plans.save(plan, path)
    assert plans.load(path) == plan
    text = path.read_text()
    v2 = text.replace('"version": 3', '"version": 2').replace('"metric": "throughput"',
                                                             '"metric": "throughput (real bench)"')
    path.write_text(v2.replace('"bench": "real"', '"bench": ""'))  # version 2 said the bench in the metric
    assert plans.load(path) == plan
    path.write_text(text.replace('"version": 3', '"version": 99'))
    with pytest.raises(ValueError, match="version 99, but this enserve reads versions 1 to 3"):
        plans.load(path)


def test_a_version_1_plan_reads_as_one_group_per_member(tmp_path):
    import json

    entry = {"member": "a", "device": "cpu:0", "kind": "cpu", "cores": [0, 1], "batch_size": 8}
    v1 = {"ensemble": "ens", "key": "k", "hardware": "hw", "metric": "throughput", "start_score": 1.0,
          "score": 2.0, "evaluated": 3, "created": 0.0, "version": 1,
          "members": [entry, dict(entry, member="b", batch_size=32)], "start": [entry]}
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    plan = plans.load(tmp_path / "v1.json")
    # two members shared cores 0-1 with one thread each (the daemon's old rule: cores / members)
    assert plan.groups == [plans.PlanGroup(["a"], 8, [plans.PlanReplica("cpu:0", "cpu", [0, 1], 1)]),
                           plans.PlanGroup(["b"], 32, [plans.PlanReplica("cpu:0", "cpu", [0, 1], 1)])]
    assert plan.start == [plans.PlanGroup(["a"], 8, [plans.PlanReplica("cpu:0", "cpu", [0, 1], 2)])]


def test_parse_cpu_devices():
    assert parse_cpu_devices("0;1") == [(0,), (1,)]
    assert parse_cpu_devices("0-3;4,6") == [(0, 1, 2, 3), (4, 6)]
    with pytest.raises(ValueError, match="uses a core twice"):
        parse_cpu_devices("0-1;1")


def test_min_gain_ignores_improvements_within_noise():
    start = P(("cpu:0", "cpu:0"), (8, 8))

    def slightly_better_elsewhere(alloc):
        return 100.0 if alloc == start else 101.0  # +1 %: noise for a 3 % margin

    result = neighbourhood_search(start, MEMBERS, DEVICES, [1, 8, 32], slightly_better_elsewhere,
                                  max_combi=50, min_gain=0.03)
    assert result.best == start and result.best_score == 100.0
    result = neighbourhood_search(start, MEMBERS, DEVICES, [1, 8, 32], slightly_better_elsewhere, max_combi=50)
    assert result.best != start and result.best_score == 101.0


def test_moving_a_replica_and_the_papers_moves_only():
    from enserve.optimizer.search import PAPER_MOVES

    devices = [Device("cpu:0", "cpu", 10**9, cores=(0, 1)), Device("cpu:1", "cpu", 10**9, cores=(2,)),
               Device("gpu:0", "gpu", 10**9)]
    a = member("a", 1, cpu1={8: 0.001}, cpu2={8: 0.001}, gpu={8: 0.001})
    start = Allocation.of([GroupAlloc((0,), 8, (ReplicaAlloc("cpu:0", 2),))])
    paper = list(neighbours(start, [a], devices, [8, 32], PAPER_MOVES))
    # one batch change and two device moves: threads shrink to the new device's cores, 1 on a GPU
    assert paper == [Allocation.of([GroupAlloc((0,), 32, (ReplicaAlloc("cpu:0", 2),))]),
                     Allocation.of([GroupAlloc((0,), 8, (ReplicaAlloc("cpu:1", 1),))]),
                     Allocation.of([GroupAlloc((0,), 8, (ReplicaAlloc("gpu:0", 1),))])]
    with pytest.raises(ValueError, match=r"moves \['teleport'\] are not among"):
        list(neighbours(start, [a], devices, [8], frozenset({"teleport"})))


def test_replicated_whole_ensemble_start_and_alternative_starts():
    ms = [member(n, 10, cpu1={8: 0.001}) for n in "abc"]
    cpus = [Device("cpu:0", "cpu", 10**9, cores=(0, 1)), Device("cpu:1", "cpu", 10**9, cores=(2, 3, 4))]
    r1 = ReplicaAlloc("cpu:1", 1)
    assert replicated_whole(ms, cpus, 8) == Allocation.of([GroupAlloc((0, 1, 2), 8, (r1, r1, r1))])
    small = [Device("cpu:0", "cpu", 65 * MiB, cores=(0, 1, 2, 3))]  # holds 2 copies of 30 MiB
    assert len(replicated_whole(ms, small, 8).groups[0].replicas) == 2
    gpus = [Device("gpu:0", "gpu", 10**9), Device("gpu:1", "gpu", 20 * MiB)] + cpus  # gpu:1 holds 2 of 3
    assert replicated_whole(ms, gpus, 8) == Allocation.of([GroupAlloc((0, 1, 2), 8, (ReplicaAlloc("gpu:0"),))])
    assert replicated_whole(ms, [Device("cpu:0", "cpu", 20 * MiB, cores=(0,))], 8) is None
    # the search starts from the better of its starts and never returns worse than it
    start = P(("cpu:0", "cpu:0", "cpu:0"), (8, 8, 8))
    whole = replicated_whole(ms, cpus, 8)
    result = neighbourhood_search(start, ms, cpus, [8], lambda a: 2.0 if a == whole else 1.0, max_combi=30,
                                  alternatives=(whole,))
    assert result.start == whole and result.start_score == 2.0 and result.best == whole
