"""``enserve serve``: its flags are generated from ``ServeOptions``, one per field, each with an
``ENSERVE_<FLAG>`` environment fallback (``--grpc-port`` <- ``ENSERVE_GRPC_PORT``), validated
before anything starts."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import MISSING, Field, fields

from enserve.cli.common import USAGE
from enserve.server.config import ServeOptions, check_token
from enserve.server.frontends.security import read_pair

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
TOKEN_VALUES = {"auth_token": "ENSERVE_AUTH_TOKEN", "admin_token": "ENSERVE_ADMIN_TOKEN"}  # the token itself


def env_name(flag: str) -> str:
    return "ENSERVE_" + flag.removeprefix("--").replace("-", "_").upper()


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model repository over KServe v2 gRPC/HTTP")
    for f in fields(ServeOptions):
        m = f.metadata
        default = "" if m["switch"] or f.default in (None, ()) else f" (default: {f.default})"
        help_text = f"{m['help']}{default} [env {env_name(m['flag'])}]"
        if m["switch"]:
            p.add_argument(m["flag"], dest=f.name, action="store_const", const=not f.default, default=None,
                           help=help_text)
        elif m["repeat"]:
            p.add_argument(m["flag"], dest=f.name, action="append", default=None, help=help_text)
        else:
            p.add_argument(m["flag"], dest=f.name, default=None, choices=m["choices"], help=help_text,
                           metavar=None if m["choices"] else env_name(m["flag"]).removeprefix("ENSERVE_"))
    p.set_defaults(run=run, parser=p)


def _value(f: Field, given, environ: dict[str, str]):
    """The option's value: the flag, else its environment variable, else the default; raises
    ValueError naming the flag or variable when a value does not parse."""
    m = f.metadata
    var = env_name(m["flag"])
    if given is None and f.name in TOKEN_VALUES and TOKEN_VALUES[f.name] in environ:
        return check_token(environ[TOKEN_VALUES[f.name]], TOKEN_VALUES[f.name])
    if given is None and var in environ:
        text = environ[var]
        where = f"environment variable {var}={text!r}"
        if m["switch"]:
            if text.lower() not in TRUE + FALSE:
                raise ValueError(f"{where} is not one of {TRUE + FALSE}")
            on = text.lower() in TRUE
            return (not f.default) if on else f.default
        given = [t for t in text.split(",") if t] if m["repeat"] else text
    else:
        where = m["flag"]
    if given is None:
        return f.default if f.default is not MISSING else None
    if m["switch"]:
        return given
    if m["choices"] and given not in m["choices"]:
        raise ValueError(f"{where}: '{given}' is not one of {m['choices']}")
    try:
        if m["repeat"]:
            return tuple(m["parse"](v) for v in given)
        return m["parse"](given)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def options_from(args: argparse.Namespace, environ: dict[str, str] | None = None) -> ServeOptions:
    """Flags over environment over defaults, validated together; raises ValueError on a bad one."""
    environ = os.environ if environ is None else environ
    values = {f.name: _value(f, getattr(args, f.name), environ) for f in fields(ServeOptions)}
    options = ServeOptions(**values)
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
