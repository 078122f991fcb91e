"""``enserve serve``: its flags are generated from ``ServeOptions`` (``cli.flags``), one per field,
each with an ``ENSERVE_<FLAG>`` environment fallback, validated before anything starts."""

from __future__ import annotations

import argparse
import sys

from enserve.cli.common import USAGE
from enserve.cli.flags import Specials, add_flags, env_name, values_from
from enserve.server.config import ServeOptions, check_token
from enserve.server.frontends.security import read_pair

TOKEN_VALUES: Specials = {"auth_token": ("ENSERVE_AUTH_TOKEN", check_token),  # the token itself, not a file
                          "admin_token": ("ENSERVE_ADMIN_TOKEN", check_token)}
__all__ = ["add_parser", "env_name", "options_from", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model repository over KServe v2 gRPC/HTTP")
    add_flags(p, ServeOptions)
    p.set_defaults(run=run, parser=p)


def options_from(args: argparse.Namespace, environ: dict[str, str] | None = None) -> ServeOptions:
    """Flags over environment over defaults, validated together; raises ValueError on a bad one."""
    options = ServeOptions(**values_from(args, ServeOptions, environ=environ, specials=TOKEN_VALUES))
    options.validate()
    read_pair(options.tls_cert, options.tls_key)  # the certificate and key can be read: before any work
    return options


def run(args: argparse.Namespace) -> int:
    from enserve.server.daemon import run as serve

    try:
        options = options_from(args)
    except ValueError as exc:
        print(f"enserve serve: error: {exc} (see enserve serve --help)", file=sys.stderr)
        return USAGE
    return serve(options)
