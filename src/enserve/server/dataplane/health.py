"""Whether a served model can take requests, from the states of its groups' replicas: what
readiness probes and admission ask."""

from __future__ import annotations

from collections.abc import Sequence

from enserve.server.dataplane.runtime import GroupRuntime
from enserve.server.dataplane.supervisor import WorkerState
from enserve.server.served.table import ServedModel


def unavailable(model: ServedModel, groups: Sequence[GroupRuntime]) -> str | None:
    """Why ``model`` cannot be served (a group with every replica down), or None."""
    for g, _ in model.parts:
        workers = groups[g].workers
        if all(w.state is WorkerState.DOWN for w in workers):
            return "; ".join(w.reason for w in workers if w.reason) or "its workers are down"
    return None


def not_ready(model: ServedModel, groups: Sequence[GroupRuntime]) -> str | None:
    """Why ``model`` is not ready: unavailable, or a group with no replica ready (restarting, whose
    requests wait for it); None when ready."""
    reason = unavailable(model, groups)
    if reason is not None:
        return reason
    for g, _ in model.parts:
        if not any(w.state is WorkerState.READY for w in groups[g].workers):
            return f"{groups[g].workers[0].spec.label} is restarting"
    return None
