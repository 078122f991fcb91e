"""``enserve init-demo``: a repository of small synthetic CNNs and their ensemble."""

from __future__ import annotations

import argparse
from pathlib import Path

from enserve.cli.common import fail, int_list
from enserve.models.synthetic import DEFAULT_WIDTHS
from enserve.server.served.repository import DEFAULT_ENSEMBLE


def add_parser(sub) -> None:
    p = sub.add_parser("init-demo", help="write a repository of 4 small CNNs (3x32x32, 10 classes) and their ensemble")
    p.add_argument("--model-repository", type=Path, required=True)
    p.add_argument("--force", action="store_true", help="rewrite it even if it exists")
    p.add_argument("--widths", type=int_list, default=DEFAULT_WIDTHS,
                   help="first-layer widths of the members, one member each (compute grows as width^2)")
    p.set_defaults(run=run, parser=p)


def run(args: argparse.Namespace) -> int:
    from enserve.models.demo import write_demo_repository

    try:
        written = write_demo_repository(args.model_repository, args.widths, force=args.force)
    except (ValueError, OSError) as exc:
        return fail("init-demo", exc)
    if not written:
        print(f"{args.model_repository} already holds an ensemble; keeping it (--force rewrites it)")
        return 0
    print(f"wrote {args.model_repository}: {len(args.widths)} CNN members (widths "
          f"{', '.join(map(str, args.widths))}) and their ensemble '{DEFAULT_ENSEMBLE}'")
    return 0
