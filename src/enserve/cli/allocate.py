"""``enserve allocate``: place an ensemble's members and choose batch sizes; print and save the plan.
Its allocator flags are generated from ``AllocateOptions``, the same fields ``enserve serve`` runs
the allocator with (``cli.flags``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from enserve.cli.common import USAGE, fail
from enserve.cli.flags import add_flags, values_from
from enserve.server.config import DEFAULT_MODEL_REPOSITORY, AllocateOptions


def add_parser(sub) -> None:
    p = sub.add_parser("allocate", help="place the members on devices and choose batch sizes; print and save the plan")
    p.add_argument("--model-repository", type=Path, default=DEFAULT_MODEL_REPOSITORY)
    p.add_argument("--ensemble", default=None, help="the ensemble to place (default: the only one)")
    add_flags(p, AllocateOptions)
    p.add_argument("--profiles", type=Path, default=None,
                   help="member profiles (JSON) instead of measuring them, e.g. for machines we do not have")
    p.add_argument("--simulate-gpus", type=int, default=0,
                   help="plan for this many GPUs (cost-model bench; the profiles must have 'gpu' latencies)")
    p.add_argument("--gpu-memory-gib", type=float, default=16.0, help="memory of each simulated GPU")
    p.add_argument("--output", type=Path, default=None, help="where to save the plan (default: in the repository)")
    p.set_defaults(run=run, parser=p)


def checked_options(args: argparse.Namespace) -> AllocateOptions:
    """The allocator's flags (over ``ENSERVE_*`` variables, over defaults) as ``AllocateOptions``,
    validated by the same rules as ``enserve serve``'s; ValueError naming the flag and the rule."""
    options = AllocateOptions(**values_from(args, AllocateOptions))
    if args.simulate_gpus:
        options.bench = "cost"  # simulated GPUs are scored by the cost model
    options.validate()
    return options


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
        options = checked_options(args)
    except ValueError as exc:  # caught before any work, as enserve serve's
        return fail("allocate", exc, USAGE)
    try:
        repo = load_repository(args.model_repository)
        devices = inventory(options.cpu_devices, use_gpus=not args.simulate_gpus)
        if args.simulate_gpus:
            gib = int(args.gpu_memory_gib * 2**30)
            devices = [Device(f"gpu:{i}", "gpu", gib, index=i) for i in range(args.simulate_gpus)] + devices
        profiles = profiles_from_json(json.loads(args.profiles.read_text())) if args.profiles else None
        done = allocate(repo, devices, options, ensemble=args.ensemble, profiles=profiles, progress=print)
        print(plan_table(done.plan))
        path = args.output or plans.plan_path(repo.path, done.plan.ensemble, done.plan.key)
        plans.save(done.plan, path)
    except (EnserveError, PlacementError, ValueError, OSError) as exc:
        return fail("allocate", exc)
    print(f"plan saved to {path}")
    return 0
