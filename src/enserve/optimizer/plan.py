"""Allocation plans: versioned JSON files keyed by ensemble + member hashes + hardware.

Version 2: worker groups, each with its members, batch size and replicas (device, cores, threads).
Version 1 plans (one entry per member) are read as one group per member with one replica.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from enserve.optimizer.files import write_atomically

PLAN_VERSION = 3  # 3: the bench in its own field (2 wrote it into the metric, 1 had a group per member)
# The allocator's rules (starts, moves, margins): part of the key, so a plan saved by an older
# allocator is made again once instead of being served forever. Bump it when the rules change.
SEARCH_RULES = 3


@dataclass
class PlanReplica:
    device: str  # "cpu:<i>" or "gpu:<i>"
    kind: str
    cores: list[int]
    threads: int


@dataclass
class PlanGroup:
    members: list[str]
    batch_size: int
    replicas: list[PlanReplica]


@dataclass
class Plan:
    ensemble: str
    key: str
    hardware: str
    metric: str  # what the search maximised: one of ``search.METRICS``
    groups: list[PlanGroup]
    start_score: float
    score: float
    start: list[PlanGroup]
    evaluated: int
    created: float
    version: int = PLAN_VERSION
    bench: str = ""  # what scored the allocations: one of ``search.BENCHES``

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        version = data.get("version")
        if version == 1:
            data = _upgrade_v1(data)
        if version in (1, 2):  # the metric said its bench: "throughput (real bench)"
            metric, _, bench = data["metric"].partition(" (")
            data = dict(data, metric=metric, bench=bench.removesuffix(" bench)"), version=PLAN_VERSION)
        elif version != PLAN_VERSION:
            raise ValueError(f"plan version {version!r}, but this enserve reads versions 1 to {PLAN_VERSION}")
        for k in ("groups", "start"):
            data[k] = [PlanGroup(g["members"], g["batch_size"], [PlanReplica(**r) for r in g["replicas"]])
                       for g in data[k]]
        return cls(**data)


def _upgrade_v1(data: dict) -> dict:
    """v1: one entry per member (device, kind, cores, batch); members on the same cores shared them."""
    def groups(entries: list[dict]) -> list[dict]:
        sharing: dict[tuple, int] = {}
        for e in entries:
            sharing[tuple(e["cores"])] = sharing.get(tuple(e["cores"]), 0) + (e["kind"] == "cpu")
        return [{"members": [e["member"]], "batch_size": e["batch_size"], "replicas": [{
            "device": e["device"], "kind": e["kind"], "cores": e["cores"],
            "threads": max(1, len(e["cores"]) // sharing[tuple(e["cores"])]) if e["kind"] == "cpu" else 1}]}
            for e in entries]

    data = dict(data, groups=groups(data.pop("members")), start=groups(data["start"]), version=PLAN_VERSION)
    return data


def plan_key(ensemble: str, member_hashes: list[str], hardware: str) -> str:
    return hashlib.sha256(json.dumps([ensemble, member_hashes, hardware, PLAN_VERSION, SEARCH_RULES])
                          .encode()).hexdigest()[:16]


def state_dir(repository: Path) -> Path:
    """Where enserve keeps what it measured of a repository: plans, profiles."""
    return Path(repository) / ".enserve"


def plan_path(repository: Path, ensemble: str, key: str) -> Path:
    return state_dir(repository) / "plans" / f"{ensemble}.{key}.json"


def profiles_path(repository: Path) -> Path:
    return state_dir(repository) / "profiles.json"


def save(plan: Plan, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, plan.to_json().encode())  # daemons may share a repository


def load(path: Path) -> Plan:
    try:
        return Plan.from_json(Path(path).read_text())
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"cannot read plan {path}: {exc}") from exc


def now() -> float:
    return time.time()


def plan_table(plan: Plan) -> str:
    """The start and the refined plan: per group its members, batch size, and replicas with threads."""
    def rows(groups: list[PlanGroup]) -> list[str]:
        out = []
        for g in groups:
            reps: dict[tuple[str, int], int] = {}
            for r in g.replicas:
                reps[(r.device, r.threads)] = reps.get((r.device, r.threads), 0) + 1
            where = ", ".join(f"{n} x {d} ({t} thread{'s' if t > 1 else ''})" for (d, t), n in sorted(reps.items()))
            out.append(f"  {'+'.join(g.members):<32} batch {g.batch_size:>3}   {len(g.replicas)} replica(s): {where}")
        return out

    unit = "images/s" if plan.metric == "throughput" else "-p99 ms"
    how = plan.metric + (f", {plan.bench} bench" if plan.bench else "")
    return "\n".join([f"start ({plan.start_score:.1f} {unit}):", *rows(plan.start),
                      f"refined ({plan.score:.1f} {unit}, {how}, after {plan.evaluated} allocations scored):",
                      *rows(plan.groups)])
