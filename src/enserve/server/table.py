"""The served-model table: frozen descriptions of every model the daemon answers for (each ensemble
and each member), which request validation and the frontends read, and the parts (worker groups
and member masks) a request to it fans out to."""

from __future__ import annotations

from dataclasses import dataclass

from enserve.server.errors import RepositoryError
from enserve.server.placement import Placement
from enserve.server.protocol import WEIGHTED
from enserve.server.repository import Repository, TensorSpec
from enserve.server.request import Shape


@dataclass(frozen=True)
class ServedModel:
    name: str
    kind: str  # "ensemble" | "member"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]  # what the caller may ask for
    max_batch_size: int
    members: tuple[str, ...]
    ring: int  # index of the shared input ring of its input signature
    parts: tuple[tuple[int, int], ...]  # (worker group, mask of the group's members to run)
    shape: Shape


@dataclass(frozen=True)
class Table:
    models: dict[str, ServedModel]
    rings: tuple[tuple[TensorSpec, ...], ...]  # input signature of each ring
    group_rings: tuple[int, ...]  # the ring each worker group reads


def _parts(members: tuple[str, ...], placement: Placement, flags: int = 0) -> tuple[tuple[int, int], ...]:
    masks: dict[int, int] = {}
    for m in members:
        g = placement.group_of(m)
        masks[g] = masks.get(g, 0) | 1 << placement.groups[g].members.index(m) | flags
    return tuple(sorted(masks.items()))


def build_table(repo: Repository, placement: Placement) -> Table:
    """Every member and ensemble as a served model; one ring per input signature. Members sharing a
    worker group must have the same inputs and outputs (they share its rows and output slots)."""
    rings: list[tuple[TensorSpec, ...]] = []

    def ring_of(inputs) -> int:
        key = tuple(inputs)
        if key not in rings:
            rings.append(key)
        return rings.index(key)

    group_rings = []
    for g in placement.groups:
        first = repo.members[g.members[0]]
        for name in g.members[1:]:
            m = repo.members[name]
            if (m.inputs, m.outputs) != (first.inputs, first.outputs):
                raise RepositoryError(
                    f"members '{first.name}' and '{name}' share a worker group but differ in inputs or "
                    "outputs; only members of one signature can share processes")
        group_rings.append(ring_of(first.inputs))
    models: dict[str, ServedModel] = {}
    for spec in repo.members.values():
        members = (spec.name,)
        models[spec.name] = ServedModel(
            spec.name, "member", tuple(spec.inputs), tuple(spec.outputs), spec.max_batch_size, members,
            ring_of(spec.inputs), _parts(members, placement),
            Shape(spec.name, "member", tuple(spec.outputs), 1))
    for ens in repo.ensembles.values():
        first = repo.members[ens.members[0]]
        members = tuple(ens.members)
        weighted = ens.weights is not None  # workers scale each member's output by its weight (sum 1)
        models[ens.name] = ServedModel(
            ens.name, "ensemble", tuple(ens.inputs), tuple(ens.outputs), ens.max_batch_size, members,
            ring_of(ens.inputs), _parts(members, placement, WEIGHTED if weighted else 0),
            Shape(ens.name, "ensemble", tuple(first.outputs), 1.0 if weighted else len(members)))
    return Table(models, tuple(rings), tuple(group_rings))
