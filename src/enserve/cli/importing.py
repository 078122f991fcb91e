"""``enserve import``: a model repository (and an ensemble) from ONNX files."""

from __future__ import annotations

import argparse
from pathlib import Path

from enserve.cli.common import USAGE, fail
from enserve.cli.flags import add_flags, values_from
from enserve.server.served.importer import ImportOptions, member_names


def add_parser(sub) -> None:
    p = sub.add_parser("import", help="build a model repository (and an ensemble) from ONNX files")
    p.add_argument("files", nargs="+", type=Path, help="ONNX classifiers with the same inputs and outputs")
    add_flags(p, ImportOptions)
    p.set_defaults(run=run, parser=p)


def run(args: argparse.Namespace) -> int:
    from enserve.server.errors import EnserveError
    from enserve.server.served.importer import import_onnx

    try:
        options = ImportOptions(**values_from(args, ImportOptions))
        options.validate()
        front_order = options.front(member_names(args.files))
    except ValueError as exc:
        return fail("import", exc, USAGE)
    try:
        repo = import_onnx(args.files, options.model_repository, ensemble=options.ensemble,
                           max_batch_size=options.max_batch_size, batch_size=options.batch_size,
                           queue_delay_us=options.max_queue_delay_us, combiner=options.combiner,
                           front_order=front_order)
    except (EnserveError, OSError) as exc:
        return fail("import", exc)
    print(f"wrote {options.model_repository}: members {sorted(repo.members)}, ensemble '{options.ensemble}'")
    front = repo.ensembles[options.ensemble].front
    if front:
        print("front: " + " < ".join("+".join(p.members) + ("" if p.cost_s is None else f" ({p.cost_s:.4g} s)")
                                     for p in front))
    return 0
