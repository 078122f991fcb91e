"""The paper's Table 3 for enserve's allocator: predictions/s of "algo1" (worst-fit decreasing only)
and "algo1+algo2" (with the neighbourhood search).

(a) real CPU devices of this machine, 1 device of all cores vs 1 device per core, searched with the
    real-pipeline bench and then measured with the daemon really serving (gRPC, closed loop);
(b) 0..6 simulated GPUs + 1 CPU device, searched with the cost-model bench from measured CPU
    profiles of a 7-member ensemble; GPU latencies come from a stated analytic model (no GPU here).
It also reports the cost model's error against the real measurements of (a).

    python -m enserve.loadtest.table3 [--max-combi 10] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from enserve.loadtest.launcher import start_daemon
from enserve.optimizer.allocation import Device, MemberProfile
from enserve.optimizer.costmodel import CostModelBench, predicted_throughput
from enserve.optimizer.devices import inventory
from enserve.optimizer.placement import proportional_start, replicated_whole, worst_fit_decreasing
from enserve.optimizer.profiles import DEFAULT_BATCH_SIZES
from enserve.optimizer.search import COST_MAX_COMBI, PAPER_MOVES, neighbourhood_search
from enserve.server import allocate as alloc_mod
from enserve.server.config import AllocateOptions
from enserve.server.served.importer import import_onnx
from enserve.server.served.repository import DEFAULT_ENSEMBLE, ensemble_members, load_repository

GPU_LAUNCH_S = 0.0002  # assumed per-batch overhead of a GPU (launch + copies)
GPU_SPEEDUP = 30.0  # assumed GPU speed per image relative to one CPU core


def serve_and_measure(repo: Path, plan_file: Path, seconds: float, concurrency: int, images: int) -> float:
    """Images/s of the daemon serving ``plan_file``, driven by the benchmark's closed-loop client."""
    from enserve.loadtest.bench import closed_loop  # the client only: it speaks the protocol
    from enserve.loadtest.signature import signature

    daemon = start_daemon(repo, "--plan", str(plan_file))
    try:
        n, _, errors, _ = asyncio.run(closed_loop(daemon.grpc_url, DEFAULT_ENSEMBLE, concurrency, images, seconds,
                                                   signature(daemon.grpc_url, DEFAULT_ENSEMBLE)))
    finally:
        daemon.stop()
    if errors:
        raise RuntimeError(f"{errors} failed requests while measuring")
    return n * images / seconds


def part_a(repo: Path, args) -> tuple[list[tuple], list[float]]:
    from enserve.optimizer import plan as plans

    rows = []
    errors = []
    n_cores = len(os.sched_getaffinity(0))
    configs = [(f"1 CPU device x {n_cores} cores", f"0-{n_cores - 1}"),
               (f"{n_cores} CPU devices x 1 core", ";".join(str(c) for c in range(n_cores)))]
    for label, spec in configs:
        devices = inventory(spec, use_gpus=False)
        options = AllocateOptions(max_combi=args.max_combi, optimize_time_s=math.inf, bench_seconds=args.bench_seconds)
        done = alloc_mod.allocate(load_repository(repo), devices, options,
                                  progress=lambda m: print("  " + m, flush=True))
        _, names = ensemble_members(load_repository(repo), None)
        model = CostModelBench(done.profiles, devices)
        for alloc, real in done.result.history:
            errors.append((model(alloc) - real) / real)
        measured = {}
        for which, groups in (("algo1", done.plan.start), ("algo1+algo2", done.plan.groups)):
            plan = plans.Plan(**{**done.plan.__dict__, "groups": groups})
            path = repo.parent / f"plan-{spec.replace(';', '_')}-{which}.json"
            plans.save(plan, path)
            measured[which] = serve_and_measure(repo, path, args.seconds, 16, 8)
        start_pred = predicted_throughput(done.result.start, done.profiles, devices)
        best_pred = predicted_throughput(done.result.best, done.profiles, devices)
        rows.append((label, measured["algo1"], measured["algo1+algo2"], done.plan.start_score, done.plan.score,
                     start_pred, best_pred, alloc_mod.describe(done.result.best, names)))
    return rows, errors


def seven_member_repo(tmp: Path) -> Path:
    from enserve.models.synthetic import write_tiny_cnns

    files = write_tiny_cnns(tmp / "onnx", (8, 12, 16, 24, 32, 48, 64), seed=10)
    import_onnx(files, tmp / "repo7", ensemble=DEFAULT_ENSEMBLE)
    return tmp / "repo7"


def with_gpu_model(profiles: list[MemberProfile]) -> list[MemberProfile]:
    out = []
    for p in profiles:
        one = p.latency("cpu1", 1)
        gpu = {b: GPU_LAUNCH_S + b * one / GPU_SPEEDUP for b in DEFAULT_BATCH_SIZES}
        out.append(MemberProfile(p.name, p.memory_bytes, {**p.latency_s, "gpu": gpu}))
    return out


def part_b(repo7: Path, args) -> list[tuple]:
    from enserve.optimizer import plan as plans
    from enserve.optimizer.devices import hardware_fingerprint
    from enserve.optimizer.profiles import profile_members

    repo = load_repository(repo7)
    _, names = ensemble_members(repo, None)
    cpu = inventory(f"0-{len(os.sched_getaffinity(0)) - 1}", use_gpus=False)
    measured = profile_members(alloc_mod.member_sources(repo, names), cpu, hardware_fingerprint(cpu),
                               cache_path=plans.profiles_path(repo7),
                               progress=lambda m: print("  " + m, flush=True))
    profiles = with_gpu_model(measured)
    rows = []
    for g in range(0, 7):
        devices = [Device(f"gpu:{i}", "gpu", 16 * 2**30, index=i) for i in range(g)] + cpu
        start = worst_fit_decreasing(profiles, devices, 32)
        bench = CostModelBench(profiles, devices)
        paper = neighbourhood_search(start, profiles, devices, list(DEFAULT_BATCH_SIZES), bench, max_combi=args.sim_combi,
                                     moves=PAPER_MOVES)
        whole = replicated_whole(profiles, devices, 32)
        full = neighbourhood_search(proportional_start(start, profiles, devices), profiles, devices,
                                    list(DEFAULT_BATCH_SIZES), bench, max_combi=args.sim_combi,
                                    alternatives=(whole,) if whole is not None else ())
        rows.append((g, paper.start_score, paper.best_score, full.start_score, full.best_score,
                     paper.evaluated + full.evaluated, alloc_mod.describe(full.best, names)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=None, help="4-member repository (default: the demo)")
    parser.add_argument("--max-combi", type=int, default=10, help="allocations the real search scores")
    parser.add_argument("--bench-seconds", type=float, default=1.5, help="measuring time of one real-bench score")
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time of the serving daemon")
    parser.add_argument("--sim-combi", type=int, default=COST_MAX_COMBI,
                        help="allocations each simulated search scores (the cost model's are computed)")
    parser.add_argument("--simulated-only", action="store_true", help="only (b): the simulated GPUs, in seconds")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="enserve-alloc-"))
    try:
        if args.model_repository is None:
            from enserve.models.demo import write_demo_repository

            write_demo_repository(tmp / "repo4")
            repo4 = tmp / "repo4"
        else:
            repo4 = tmp / "repo4"
            shutil.copytree(args.model_repository, repo4)
        rows_a, errors = [], []
        if not args.simulated_only:
            print("(a) real CPU devices, real-pipeline bench; serving measured with gRPC, 16 clients x 8 images")
            rows_a, errors = part_a(repo4, args)
        print("(b) simulated GPUs + 1 CPU device, cost-model bench, 7 members")
        rows_b = part_b(seven_member_repo(tmp), args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if rows_a:
        print_part_a(rows_a, errors)
    print_part_b(rows_b)
    return 0


def print_part_a(rows_a: list[tuple], errors: list[float]) -> None:
    print("\n(a) predictions/s on this machine (4-member demo ensemble)")
    print(f"{'devices':<26} {'algo1':>8} {'algo1+algo2':>12} {'gain':>6}   {'search: start':>13} {'refined':>8}"
          f"   {'cost model: start':>17} {'refined':>8}")
    for label, a1, a2, s_start, s_best, p_start, p_best, best in rows_a:
        print(f"{label:<26} {a1:>8.0f} {a2:>12.0f} {a2 / a1:>6.2f}   {s_start:>13.0f} {s_best:>8.0f}"
              f"   {p_start:>17.0f} {p_best:>8.0f}")
        print(f"{'':<26} refined: {best}")
    err = np.abs(errors)
    print(f"cost model vs real-pipeline bench over {len(errors)} allocations: mean |error| {err.mean():.0%}, "
          f"median {np.median(err):.0%}, signed mean {np.mean(errors):+.0%}")


def print_part_b(rows_b: list[tuple]) -> None:
    print("\n(b) predicted predictions/s, 7-member ensemble, N simulated GPUs + 1 CPU device "
          f"(GPU model: {GPU_LAUNCH_S * 1e3:.1f} ms per batch + CPU-core time / {GPU_SPEEDUP:g} per image)")
    print("    algo1+algo2: the paper's moves (batch size, device); with replicas: the better of the proportional "
          "and the replicated-whole start, then every move (replicas, threads, worker groups)")
    print(f"{'GPUs':>4} {'algo1':>9} {'algo1+algo2':>12} {'gain':>6} {'replicas: start':>16} {'refined':>8} "
          f"{'gain':>6} {'scored':>7}")
    for g, s0, s1, r0, r1, n, _ in rows_b:
        print(f"{g:>4} {s0:>9.0f} {s1:>12.0f} {s1 / s0:>6.2f} {r0:>16.0f} {r1:>8.0f} {r1 / s0:>6.2f} {n:>7}")
    print(f"refined with 6 GPUs and replicas: {rows_b[-1][6]}")


if __name__ == "__main__":
    sys.exit(main())
