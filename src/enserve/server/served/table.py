"""The served-model table: frozen descriptions of every model the daemon answers for (each ensemble
and each member), which request validation and the frontends read, and the parts (worker groups
and member masks) a request to it fans out to."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

from enserve import combiners
from enserve.server.errors import RepositoryError
from enserve.server.protocol import combine_flags
from enserve.server.served.placement import Placement
from enserve.server.served.repository import Repository, TensorSpec


@dataclass(frozen=True)
class AnswerRecipe:
    """How a request's answer is made from its parts' sums (``combiners.answer``)."""

    model: str
    kind: str  # "ensemble" | "member" (a member's own output, not combined)
    outputs: tuple[TensorSpec, ...]  # the members' outputs (an ensemble adds its uncertainty after)
    weight_sum: float  # what the sums of the members' terms are divided by: their count, or 1 when weighted
    space: int  # the combiner's space: index into ``combiners.SPACES``
    weights: tuple[tuple[str, float], ...] = ()  # each member's term weight (1, or its weight when weighted)

    def weight_of(self, members) -> float:
        """What the sums of ``members``' terms are divided by (an answer from some of them)."""
        w = dict(self.weights)
        return float(sum(w[m] for m in members))


@dataclass(frozen=True)
class ServedPoint:
    """One point of an ensemble's front as served: its members, the parts they need and the recipe
    that divides by their weight."""

    members: tuple[str, ...]
    parts: tuple[tuple[int, int], ...]
    recipe: AnswerRecipe

    @cached_property
    def member_set(self) -> frozenset[str]:
        return frozenset(self.members)


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
    recipe: AnswerRecipe
    points: tuple[ServedPoint, ...] = ()  # its front, cheapest first; the last is the whole model
    objective_s: float | None = None  # its config's latency objective

    @cached_property
    def point_parts(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Each point's parts, cheapest point first (what the policy reads on every request)."""
        return tuple(p.parts for p in self.points)


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
        parts = _parts(members, placement)
        recipe = AnswerRecipe(spec.name, "member", tuple(spec.outputs), 1.0, combiners.space_id("identity"),
                              ((spec.name, 1.0),))
        models[spec.name] = ServedModel(
            spec.name, "member", tuple(spec.inputs), tuple(spec.outputs), spec.max_batch_size, members,
            ring_of(spec.inputs), parts, recipe, (ServedPoint(members, parts, recipe),))
    for ens in repo.ensembles.values():
        first = repo.members[ens.members[0]]
        members = tuple(ens.members)
        combiner = combiners.get(ens.combiner)  # workers add each member's term; weighted: scaled (sum 1)
        flags = combine_flags(combiner.space_id, combiner.weighted)
        weights = tuple((m, w if combiner.weighted else 1.0) for m, w in ens.weight_of().items())
        recipe = AnswerRecipe(ens.name, "ensemble", tuple(first.outputs), 1.0 if combiner.weighted else len(members),
                              combiner.space_id, weights)
        points = tuple(ServedPoint(p.members, _parts(p.members, placement, flags),
                                   recipe if set(p.members) == set(members)
                                   else replace(recipe, weight_sum=recipe.weight_of(p.members)))
                       for p in ens.points())
        models[ens.name] = ServedModel(
            ens.name, "ensemble", tuple(ens.inputs), tuple(ens.outputs), ens.max_batch_size, members,
            ring_of(ens.inputs), _parts(members, placement, flags), recipe, points,
            None if ens.objective_ms is None else ens.objective_ms / 1e3)
    return Table(models, tuple(rings), tuple(group_rings))
