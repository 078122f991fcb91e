"""The allocator's pure parts with exact answers: packing, neighbourhood search, cost model, plans."""

from __future__ import annotations

import itertools

import pytest

from enserve.optimizer import plan as plans
from enserve.optimizer.allocation import Allocation, Device, MemberProfile, PlacementError, fits
from enserve.optimizer.costmodel import predicted_throughput
from enserve.optimizer.devices import parse_cpu_devices
from enserve.optimizer.placement import worst_fit_decreasing
from enserve.optimizer.search import neighbourhood_search, neighbours

MiB = 2**20


def member(name: str, mib: int, **latency) -> MemberProfile:
    return MemberProfile(name, mib * MiB, {k: dict(v) for k, v in latency.items()})


def test_worst_fit_decreasing_gpu_first_worst_fit_then_cpu():
    members = [member("a", 300), member("b", 700), member("c", 500), member("d", 400)]
    devices = [Device("gpu:0", "gpu", 1000 * MiB), Device("gpu:1", "gpu", 900 * MiB),
               Device("cpu:0", "cpu", 4000 * MiB, cores=(0, 1))]
    alloc = worst_fit_decreasing(members, devices, batch=8)
    # b(700)->gpu:0 (1000 free) ; c(500)->gpu:1 (900) ; d(400)->gpu:1 (400 left vs 300) ; a(300)->gpu:0 (300)
    assert alloc.device == ("gpu:0", "gpu:0", "gpu:1", "gpu:1")
    assert alloc.batch == (8, 8, 8, 8)
    assert fits(alloc, members, devices)


def test_worst_fit_decreasing_falls_back_to_cpu_and_spreads():
    members = [member("a", 600), member("b", 600), member("c", 100)]
    devices = [Device("gpu:0", "gpu", 1000 * MiB), Device("cpu:0", "cpu", 800 * MiB, cores=(0,)),
               Device("cpu:1", "cpu", 900 * MiB, cores=(1,))]
    alloc = worst_fit_decreasing(members, devices, batch=1)
    # a->gpu:0 (400 left), b does not fit the GPU -> cpu:1 (most free), c -> gpu:0 (GPU priority)
    assert alloc.device == ("gpu:0", "cpu:1", "gpu:0")


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
        return sum(device_gain[i][d] + batch_gain[i][b] for i, (d, b) in enumerate(zip(alloc.device, alloc.batch)))

    return bench


DEVICES = [Device("cpu:0", "cpu", 10**9, cores=(0,)), Device("cpu:1", "cpu", 10**9, cores=(1,))]
MEMBERS = [member("a", 10), member("b", 10)]


def test_search_finds_the_brute_force_optimum_and_never_loses():
    batch_sizes = [1, 8, 32]
    start = Allocation(("cpu:0", "cpu:0"), (1, 1))
    calls: list = []
    bench = _fake_bench(calls)
    result = neighbourhood_search(start, MEMBERS, DEVICES, batch_sizes, bench, max_combi=1000)
    every = [Allocation(d, b) for d in itertools.product(["cpu:0", "cpu:1"], repeat=2)
             for b in itertools.product(batch_sizes, repeat=2)]
    best = max(every, key=_fake_bench([]))
    assert result.best == best == Allocation(("cpu:1", "cpu:0"), (8, 32))
    assert result.best_score == 11.5 > result.start_score
    assert result.evaluated == len(calls)


def test_search_stops_at_max_combi_and_returns_no_worse_than_start():
    calls: list = []
    start = Allocation(("cpu:1", "cpu:0"), (8, 32))  # already the optimum
    result = neighbourhood_search(start, MEMBERS, DEVICES, [1, 8, 32], _fake_bench(calls), max_combi=4)
    assert len(calls) == 4 and result.evaluated == 4
    assert result.best == start and result.best_score == result.start_score

    def worse_everywhere(alloc):
        return 0.0 if alloc == start else -1.0

    result = neighbourhood_search(start, MEMBERS, DEVICES, [1, 8, 32], worse_everywhere, max_combi=50)
    assert result.best == start


def test_neighbours_change_one_thing_and_respect_memory():
    devices = [Device("cpu:0", "cpu", 15 * MiB, cores=(0,)), Device("cpu:1", "cpu", 15 * MiB, cores=(1,))]
    start = Allocation(("cpu:0", "cpu:1"), (8, 8))
    got = list(neighbours(start, MEMBERS, devices, [1, 8, 32]))
    # 2 batch changes per member; moving either member would put 20 MiB on a 15 MiB device
    assert got == [Allocation(("cpu:0", "cpu:1"), (1, 8)), Allocation(("cpu:0", "cpu:1"), (32, 8)),
                   Allocation(("cpu:0", "cpu:1"), (8, 1)), Allocation(("cpu:0", "cpu:1"), (8, 32))]


def test_cost_model_known_answers():
    a = member("a", 1, cpu1={8: 0.008}, cpu2={8: 0.005}, gpu={8: 0.002})  # 1 ms/img on one core
    b = member("b", 1, cpu1={8: 0.016}, cpu2={8: 0.010}, gpu={8: 0.004})  # 2 ms/img on one core
    two_cores = [Device("cpu:0", "cpu", 10**9, cores=(0, 1))]
    # both on one 2-core device: 1 thread each, 3 core-ms per image over 2 cores -> 666.7/s,
    # but b alone passes at most 8 / 0.016 = 500/s
    assert predicted_throughput(Allocation(("cpu:0", "cpu:0"), (8, 8)), [a, b], two_cores) == pytest.approx(500)
    split = [Device("cpu:0", "cpu", 10**9, cores=(0,)), Device("cpu:1", "cpu", 10**9, cores=(1,))]
    assert predicted_throughput(Allocation(("cpu:0", "cpu:1"), (8, 8)), [a, b], split) == pytest.approx(500)
    gpu = [Device("gpu:0", "gpu", 10**9)] + split
    # gpu runs both: (0.002 + 0.004) / 8 s per image -> 1333.3/s
    assert predicted_throughput(Allocation(("gpu:0", "gpu:0"), (8, 8)), [a, b], gpu) == pytest.approx(8 / 0.006)
    # interpolation between measured batch sizes
    c = member("c", 1, cpu1={1: 0.001, 9: 0.005})
    assert c.latency("cpu1", 5) == pytest.approx(0.003)


def test_plan_round_trip_and_version(tmp_path):
    entry = plans.PlanEntry("a", "cpu:0", "cpu", [0], 8)
    plan = plans.Plan("ens", "k", "hw", "throughput", [entry], 1.0, 2.0, [entry], 3, 0.0)
    path = tmp_path / "p.json"
    plans.save(plan, path)
    assert plans.load(path) == plan
    path.write_text(path.read_text().replace('"version": 1', '"version": 99'))
    with pytest.raises(ValueError, match="version 99, but this enserve reads version 1"):
        plans.load(path)


def test_parse_cpu_devices():
    assert parse_cpu_devices("0;1") == [(0,), (1,)]
    assert parse_cpu_devices("0-3;4,6") == [(0, 1, 2, 3), (4, 6)]
    with pytest.raises(ValueError, match="uses a core twice"):
        parse_cpu_devices("0-1;1")


def test_min_gain_ignores_improvements_within_noise():
    start = Allocation(("cpu:0", "cpu:0"), (8, 8))

    def slightly_better_elsewhere(alloc):
        return 100.0 if alloc == start else 101.0  # +1 %: noise for a 3 % margin

    result = neighbourhood_search(start, MEMBERS, DEVICES, [1, 8, 32], slightly_better_elsewhere,
                                  max_combi=50, min_gain=0.03)
    assert result.best == start and result.best_score == 100.0
    result = neighbourhood_search(start, MEMBERS, DEVICES, [1, 8, 32], slightly_better_elsewhere, max_combi=50)
    assert result.best != start and result.best_score == 101.0
