"""An ensemble's front: nested subsets of its members, cheapest first, each an ensemble the server
can answer with when the whole one would miss a latency objective.

It travels in the ensemble's ``config.pbtxt`` as the parameter ``enserve.front``, a JSON list that
any client reads from ``ModelConfig`` without enserve's code::

    [{"members": ["b"], "cost_s": 0.04, "val_error": 0.031, "val_loss": 0.11},
     {"members": ["b", "a"], "cost_s": 0.09, "val_error": 0.022, "val_loss": 0.08}]

Each point holds every member of the one before it and at least one more; the last holds them all.
``cost_s`` is the paper's C (seconds for 2000 samples on one core); ``val_error`` and ``val_loss``
are measured on the selection's validation predictions; an imported ensemble has ``cost_s`` when
ordered by measured cost, and none of the three when ordered by name. The server reads only the
members: it measures costs itself. An ensemble without the parameter has one point: all its members.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from enserve.server.errors import RepositoryError

FRONT_PARAMETER = "enserve.front"
MEASURES = ("cost_s", "val_error", "val_loss")


@dataclass(frozen=True)
class FrontPoint:
    members: tuple[str, ...]
    cost_s: float | None = None
    val_error: float | None = None
    val_loss: float | None = None

    def as_json(self) -> dict:
        out: dict = {"members": list(self.members)}
        for key in MEASURES:
            value = getattr(self, key)
            if value is not None:
                out[key] = round(value, 6)
        return out


def whole(members: list[str]) -> tuple[FrontPoint, ...]:
    """The front of an ensemble that names none: one point, every member."""
    return (FrontPoint(tuple(members)),)


def front_text(points: tuple[FrontPoint, ...] | list[FrontPoint]) -> str:
    return json.dumps([p.as_json() for p in points])


def parse_front(text: str, members: list[str], where: str) -> tuple[FrontPoint, ...]:
    """``enserve.front``'s JSON as points; RepositoryError quoting the bad value and the rule."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RepositoryError(f"{where}: {FRONT_PARAMETER} is not JSON ({exc.msg} at character {exc.pos}): "
                              f"{text[:200]!r}") from None
    except RecursionError:
        raise RepositoryError(f"{where}: {FRONT_PARAMETER} nests too deeply to be a list of points") from None
    if not isinstance(raw, list) or not raw:
        raise RepositoryError(f"{where}: {FRONT_PARAMETER} must be a non-empty JSON list of points, got {text[:200]!r}")
    points: list[FrontPoint] = []
    for i, item in enumerate(raw):
        at = f"{where}: {FRONT_PARAMETER} point {i}"
        if not isinstance(item, dict) or not isinstance(item.get("members"), list) or not item["members"] \
                or not all(isinstance(m, str) for m in item["members"]):
            raise RepositoryError(f"{at} must be an object with a non-empty list of member names under "
                                  f"'members', got {json.dumps(item)[:200]}")
        names = item["members"]
        unknown = [m for m in names if m not in members]
        if unknown:
            raise RepositoryError(f"{at} names {unknown}, which are not members of the ensemble {members}")
        if len(set(names)) != len(names):
            raise RepositoryError(f"{at} names a member twice: {names}")
        extra = sorted(set(item) - {"members", *MEASURES})
        if extra:
            raise RepositoryError(f"{at} has unknown keys {extra}; a point has 'members' and any of {list(MEASURES)}")
        measures = {}
        for key in MEASURES:
            value = item.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value) \
                    or value < 0 or (key == "val_error" and value > 1):
                rule = "a number in [0, 1]" if key == "val_error" else "a finite number >= 0"
                raise RepositoryError(f"{at}: {key} is {json.dumps(value)}, but must be {rule}")
            measures[key] = float(value)
        if points and not (set(points[-1].members) < set(names)):
            raise RepositoryError(f"{at} ({names}) must hold every member of point {i - 1} "
                                  f"({list(points[-1].members)}) and at least one more: the points are nested")
        points.append(FrontPoint(tuple(names), **measures))
    if set(points[-1].members) != set(members):
        missing = [m for m in members if m not in points[-1].members]
        raise RepositoryError(f"{where}: {FRONT_PARAMETER}'s last point must hold every member; it lacks {missing}")
    return tuple(points)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return False
