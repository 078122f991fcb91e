"""Flags generated from an options class (``enserve.options.option`` fields), one per field, each
with an ``ENSERVE_<FLAG>`` environment fallback (``--grpc-port`` <- ``ENSERVE_GRPC_PORT``); parsed
values become the options object, validated before anything starts."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import MISSING, Field, fields
from typing import Any

Specials = dict[str, tuple[str, Callable[[str, str], Any]]]  # field -> (variable, parse(value, variable))

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_name(flag: str) -> str:
    return "ENSERVE_" + flag.removeprefix("--").replace("-", "_").upper()


def option_fields(cls: type, names: tuple[str, ...] | None = None) -> list[Field]:
    """The fields of ``cls`` that are options (carry a flag), its own before those it inherits; or
    those named, in that order."""
    by_name = {f.name: f for f in fields(cls) if "flag" in f.metadata}
    if names is not None:
        return [by_name[n] for n in names]
    own = cls.__dict__.get("__annotations__", {})
    return sorted(by_name.values(), key=lambda f: f.name not in own)


def add_flags(p: argparse.ArgumentParser, cls: type, names: tuple[str, ...] | None = None) -> None:
    """One flag per option field of ``cls`` (or of those ``names``): its help says the default and
    the environment variable."""
    for f in option_fields(cls, names):
        m = f.metadata
        shown = m["shown"] if m["shown"] is not None else f.default
        default = "" if m["switch"] or shown in (None, ()) else f" (default: {shown})"
        help_text = f"{m['help']}{default} [env {env_name(m['flag'])}]".replace("%", "%%")
        if m["switch"]:
            p.add_argument(m["flag"], dest=f.name, action="store_const", const=not f.default, default=None,
                           help=help_text)
        elif m["repeat"]:
            p.add_argument(m["flag"], dest=f.name, action="append", default=None, help=help_text)
        else:
            p.add_argument(m["flag"], dest=f.name, default=None, choices=m["choices"], help=help_text,
                           metavar=None if m["choices"] else env_name(m["flag"]).removeprefix("ENSERVE_"))


def value_of(f: Field, given, environ: dict[str, str], specials: Specials | None = None):
    """The option's value: the flag, else its environment variable, else the default; raises
    ValueError naming the flag or variable when a value does not parse. ``specials`` maps a field to
    another variable holding its value itself (a token, rather than the file the flag names)."""
    m = f.metadata
    var = env_name(m["flag"])
    special, parse_special = (specials or {}).get(f.name, (None, None))
    if given is None and special is not None and special in environ:
        return parse_special(environ[special], special)
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
        if m["parse"] in (int, float):  # Python's own words ("invalid literal for int()") say less
            raise ValueError(f"{where}: '{given}' is not {'an integer' if m['parse'] is int else 'a number'}") from None
        raise ValueError(f"{where}: {exc}") from None


def values_from(args: argparse.Namespace, cls: type, names: tuple[str, ...] | None = None,
                environ: dict[str, str] | None = None, specials: Specials | None = None) -> dict[str, Any]:
    """Flags over environment over defaults, for the option fields of ``cls`` (or those ``names``)."""
    environ = os.environ if environ is None else environ
    return {f.name: value_of(f, getattr(args, f.name, None), environ, specials) for f in option_fields(cls, names)}
