"""The ``enserve`` command: one module per subcommand, each importing its heavy parts in ``run`` (``serve``
never imports torch). Exit codes, the same everywhere: 0 done, 2 a usage or validation error
(bad flags or values, caught before any work), 1 a failure while working."""

from __future__ import annotations

import argparse
import sys

from enserve import __version__
from enserve.cli import allocate, bench, build, demo, deploy, importing, serve

SUBCOMMANDS = (serve, importing, demo, bench, allocate, build, deploy)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="enserve", description="Serve ensembles of deep neural networks, and "
                                "build them (KServe v2 / Triton protocol).")
    p.add_argument("--version", action="version", version=f"enserve {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
