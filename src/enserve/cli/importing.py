"""``enserve import``: a model repository (and an ensemble) from ONNX files."""

from __future__ import annotations

import argparse
from pathlib import Path

from enserve import combiners
from enserve.cli.common import fail
from enserve.server.served.repository import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_ENSEMBLE,
    DEFAULT_MAX_BATCH_SIZE,
)


def add_parser(sub) -> None:
    p = sub.add_parser("import", help="build a model repository (and an ensemble) from ONNX files")
    p.add_argument("files", nargs="+", type=Path, help="ONNX classifiers with the same inputs and outputs")
    p.add_argument("--model-repository", type=Path, required=True, help="repository to create or add to")
    p.add_argument("--ensemble", default=DEFAULT_ENSEMBLE, help="name of the ensemble model over all the files")
    p.add_argument("--combiner", choices=combiners.unweighted(), default=combiners.DEFAULT,
                   help="how the ensemble combines its members: "
                        + "; ".join(f"{n}: {combiners.get(n).doc}" for n in combiners.unweighted()))
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE, help="largest batch a request may carry")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="batch size each member runs at")
    p.add_argument("--max-queue-delay-us", type=int, default=0,
                   help="batch window after the first request (0: batch only what is already queued)")
    p.add_argument("--front-order", default=None, metavar="NAMES|cost",
                   help="the ensemble's front (enserve.front): its members' names, comma-separated, in the order "
                        "they are added when a latency objective leaves room, or 'cost' for cheapest first as "
                        "measured here with ONNX Runtime on one core (default: no front, every request runs every "
                        "member)")
    p.set_defaults(run=run, parser=p)


def run(args: argparse.Namespace) -> int:
    from enserve.server.errors import EnserveError
    from enserve.server.served.importer import import_onnx

    try:
        repo = import_onnx(args.files, args.model_repository, ensemble=args.ensemble,
                           max_batch_size=args.max_batch_size, batch_size=args.batch_size,
                           queue_delay_us=args.max_queue_delay_us, combiner=args.combiner,
                           front_order=None if args.front_order is None else
                           "cost" if args.front_order.strip() == "cost" else
                           [n.strip() for n in args.front_order.split(",")])
    except (EnserveError, OSError) as exc:
        return fail("import", exc)
    print(f"wrote {args.model_repository}: members {sorted(repo.members)}, ensemble '{args.ensemble}'")
    front = repo.ensembles[args.ensemble].front
    if front:
        print("front: " + " < ".join("+".join(p.members) + ("" if p.cost_s is None else f" ({p.cost_s:.4g} s)")
                                     for p in front))
    return 0
