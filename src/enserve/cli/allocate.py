"""``enserve allocate``: place an ensemble's members and choose batch sizes; print and save the plan."""

from __future__ import annotations

import argparse
from pathlib import Path

from enserve.cli.common import USAGE, fail, int_list, positive_int
from enserve.optimizer.profiles import DEFAULT_BATCH_SIZES
from enserve.optimizer.search import BENCHES, COST_MAX_COMBI, REAL_MAX_COMBI

ALLOCATOR_OPTIONS = ("cpu_devices", "max_combi", "optimize_time_s", "optimize_metric", "bench_concurrency",
                     "bench_images")


def add_allocator_flags(p: argparse.ArgumentParser) -> None:
    """The allocator's flags, from the same ``ServeOptions`` fields as ``enserve serve``'s: one home
    for each flag's name, type, choices and default."""
    from dataclasses import fields

    from enserve.server.config import ServeOptions

    by_name = {f.name: f for f in fields(ServeOptions)}
    for name in ALLOCATOR_OPTIONS:
        f, m = by_name[name], by_name[name].metadata
        default = None if name == "max_combi" else f.default  # by bench: measured or computed
        shown = (f"{REAL_MAX_COMBI} measured on the real bench, {COST_MAX_COMBI} computed by the cost model"
                 if name == "max_combi" else f.default)
        p.add_argument(m["flag"], dest=name, type=positive_int if name == "max_combi" else m["parse"],
                       choices=m["choices"], default=default,
                       help=m["help"] + ("" if shown is None else f" (default: {shown})"))


def checked_options(args: argparse.Namespace):
    """The allocator's flags as ``ServeOptions``, validated by the same rules as ``enserve serve``'s
    (ValueError naming the flag, the value and the rule)."""
    from enserve.server.config import ServeOptions

    given = {n: getattr(args, n) for n in ALLOCATOR_OPTIONS if getattr(args, n) is not None}
    options = ServeOptions(**given)
    options.validate()
    return options


def add_parser(sub) -> None:
    p = sub.add_parser("allocate", help="place the members on devices and choose batch sizes; print and save the plan")
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument("--ensemble", default=None, help="the ensemble to place (default: the only one)")
    add_allocator_flags(p)
    p.add_argument("--batch-sizes", type=int_list, default=DEFAULT_BATCH_SIZES,
                   help=f"batch sizes the search may choose from (default: {','.join(map(str, DEFAULT_BATCH_SIZES))})")
    p.add_argument("--bench", choices=BENCHES, default=BENCHES[0],
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
    from enserve.optimizer.plan import plan_table
    from enserve.optimizer.profiles import profiles_from_json
    from enserve.server.allocate import allocate
    from enserve.server.errors import EnserveError
    from enserve.server.served.repository import load_repository

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        checked_options(args)
    except ValueError as exc:  # caught before any work, as enserve serve's
        return fail("allocate", exc, USAGE)
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
                        batch_sizes=args.batch_sizes, max_combi=max_combi, time_budget_s=args.optimize_time_s,
                        bench=bench, profiles=profiles, bench_load=(args.bench_concurrency, args.bench_images),
                        progress=print)
        print(plan_table(done.plan))
        path = args.output or plans.plan_path(repo.path, done.plan.ensemble, done.plan.key)
        plans.save(done.plan, path)
    except (EnserveError, PlacementError, ValueError, OSError) as exc:
        return fail("allocate", exc)
    print(f"plan saved to {path}")
    return 0
