"""Allocation plans: versioned JSON files keyed by ensemble + member hashes + hardware."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PLAN_VERSION = 1


@dataclass
class PlanEntry:
    member: str
    device: str  # "cpu:<i>" or "gpu:<i>"
    kind: str
    cores: list[int]
    batch_size: int


@dataclass
class Plan:
    ensemble: str
    key: str
    hardware: str
    metric: str
    members: list[PlanEntry]
    start_score: float
    score: float
    start: list[PlanEntry]
    evaluated: int
    created: float
    version: int = PLAN_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {data.get('version')!r}, but this enserve reads version {PLAN_VERSION}")
        data["members"] = [PlanEntry(**e) for e in data["members"]]
        data["start"] = [PlanEntry(**e) for e in data["start"]]
        return cls(**data)


def plan_key(ensemble: str, member_hashes: list[str], hardware: str) -> str:
    return hashlib.sha256(json.dumps([ensemble, member_hashes, hardware]).encode()).hexdigest()[:16]


def plan_path(repository: Path, ensemble: str, key: str) -> Path:
    return Path(repository) / ".enserve" / "plans" / f"{ensemble}.{key}.json"


def save(plan: Plan, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(plan.to_json())
    tmp.replace(path)


def load(path: Path) -> Plan:
    try:
        return Plan.from_json(Path(path).read_text())
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"cannot read plan {path}: {exc}") from exc


def now() -> float:
    return time.time()
