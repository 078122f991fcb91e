"""``enserve allocate``: place an ensemble's members and choose batch sizes; print and save the plan."""

from __future__ import annotations

import argparse
from pathlib import Path

from enserve.cli.common import fail, int_list, positive_int
from enserve.optimizer.search import COST_MAX_COMBI, REAL_MAX_COMBI


def add_allocator_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu-devices", default=None,
                   help="CPU devices as core sets, e.g. '0;1' (two devices of one core) or '0-1' "
                        "(default: all cores but core 0 on machines with 4 or more, else all)")
    p.add_argument("--max-combi", type=positive_int, default=None,
                   help=f"most allocations the search scores (default: {REAL_MAX_COMBI} measured on the real "
                        f"bench, {COST_MAX_COMBI} computed by the cost model)")
    p.add_argument("--optimize-time", type=float, default=120.0, help="time budget of the search in seconds")
    p.add_argument("--optimize-metric", choices=("throughput", "latency"), default="throughput",
                   help="what the search maximises: images/s, or minus the p99 latency under the bench load")
    p.add_argument("--bench-concurrency", type=int, default=16, help="the real bench's load: requests kept in flight")
    p.add_argument("--bench-images", type=int, default=8, help="the real bench's load: images per request")


def add_parser(sub) -> None:
    p = sub.add_parser("allocate", help="place the members on devices and choose batch sizes; print and save the plan")
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument("--ensemble", default=None, help="the ensemble to place (default: the only one)")
    add_allocator_flags(p)
    p.add_argument("--batch-sizes", type=int_list, default=(1, 8, 32, 64),
                   help="batch sizes the search may choose from")
    p.add_argument("--bench", choices=("real", "cost"), default="real",
                   help="score allocations on the real pipeline, or with the cost model from profiles")
    p.add_argument("--profiles", type=Path, default=None,
                   help="member profiles (JSON) instead of measuring them, e.g. for machines we do not have")
    p.add_argument("--simulate-gpus", type=int, default=0,
                   help="plan for this many GPUs (cost-model bench; the profiles must have 'gpu' latencies)")
    p.add_argument("--gpu-memory-gib", type=float, default=16.0, help="memory of each simulated GPU")
    p.add_argument("--output", type=Path, default=None, help="where to save the plan (default: in the repository)")
    p.set_defaults(run=run, parser=p)


def run(args: argparse.Namespace) -> int:
    import json
    import logging

    from enserve.optimizer import plan as plans
    from enserve.optimizer.allocation import Device, PlacementError
    from enserve.optimizer.devices import inventory
    from enserve.optimizer.profiles import profiles_from_json
    from enserve.server.allocate import allocate, plan_table
    from enserve.server.errors import EnserveError
    from enserve.server.served.repository import load_repository

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        repo = load_repository(args.model_repository)
        devices = inventory(args.cpu_devices, use_gpus=not args.simulate_gpus)
        bench = args.bench
        if args.simulate_gpus:
            gib = int(args.gpu_memory_gib * 2**30)
            devices = [Device(f"gpu:{i}", "gpu", gib, index=i) for i in range(args.simulate_gpus)] + devices
            bench = "cost"
        profiles = profiles_from_json(json.loads(args.profiles.read_text())) if args.profiles else None
        max_combi = args.max_combi if args.max_combi is not None else (COST_MAX_COMBI if bench == "cost" else REAL_MAX_COMBI)
        done = allocate(repo, devices, ensemble=args.ensemble, metric=args.optimize_metric,
                        batch_sizes=args.batch_sizes, max_combi=max_combi, time_budget_s=args.optimize_time,
                        bench=bench, profiles=profiles, bench_load=(args.bench_concurrency, args.bench_images),
                        progress=print)
        print(plan_table(done.plan))
        path = args.output or plans.plan_path(repo.path, done.plan.ensemble, done.plan.key)
        plans.save(done.plan, path)
    except (EnserveError, PlacementError, ValueError, OSError) as exc:
        return fail("allocate", exc)
    print(f"plan saved to {path}")
    return 0
