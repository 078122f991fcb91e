"""Options as keyword-only dataclasses whose fields carry their command-line flag: one home for
each option's name, type, choices, bounds, default and help. ``enserve serve``, ``allocate``,
``build`` and ``select`` generate their flags from them (``enserve.cli.flags``); the code takes the
objects. Pure: nothing here parses a command line or reads a file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field, fields
from typing import Any


def option(default, flag: str, help: str, parse: Callable[[str], object] | None = None,
           choices: tuple[str, ...] | None = None, switch: bool = False, repeat: bool = False,
           minimum: float | None = None, above: float | None = None, shown: str | None = None):
    """An option and its command-line flag (each with an ``ENSERVE_<FLAG>`` environment fallback);
    ``minimum`` / ``above`` bound a number; ``shown`` is the default as the help says it, when the
    value alone would not say it (e.g. None meaning 'decided later')."""
    return field(default=default, metadata={"flag": flag, "help": help, "parse": parse, "choices": choices,
                                            "switch": switch, "repeat": repeat, "minimum": minimum,
                                            "above": above, "shown": shown})


def check_fields(options: Any) -> None:
    """Every choice one of its list and every number within its bounds (NaN never is); ValueError
    naming the flag, the value and the rule."""
    for f in fields(options):
        value, m = getattr(options, f.name), f.metadata
        if "flag" not in m:
            continue
        if m["choices"] and value is not None and value not in m["choices"]:
            raise ValueError(f"{m['flag']} is {value!r}, but must be one of {m['choices']}")
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if m["minimum"] is not None and not value >= m["minimum"]:
            raise ValueError(f"{m['flag']} is {value}, but must be >= {m['minimum']}")
        if m["above"] is not None and not value > m["above"]:
            raise ValueError(f"{m['flag']} is {value}, but must be > {m['above']}")
