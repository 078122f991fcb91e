"""What every subcommand shares: exit codes and how a failure is reported."""

from __future__ import annotations

import argparse
import sys

USAGE = 2  # bad flags or values: nothing was done
FAILURE = 1  # something failed while working


def fail(command: str, error: BaseException | str, code: int = FAILURE) -> int:
    """Print ``enserve <command>: <message>`` on stderr and return ``code``."""
    print(f"enserve {command}: {getattr(error, 'message', None) or error}", file=sys.stderr)
    return code


def positive_int(text: str) -> int:
    """'3' -> 3; an argparse type that refuses 0, negatives and non-integers."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, not '{text}'")
    return value


def int_list(text: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32); an argparse type."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers") from None
    return values
