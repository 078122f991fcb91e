"""What both frontends do, independent of the wire: lookups, metadata, inference, shared memory."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import numpy as np

from enserve import __version__
from enserve.server.config import ServeOptions
from enserve.server.dataplane.adaptive import ANSWER_AT
from enserve.server.dataplane.orchestrator import Orchestrator
from enserve.server.dataplane.request import InflightRequest
from enserve.server.dataplane.shm import ClientRegions
from enserve.server.errors import InvalidArgument, NotFound, Unavailable
from enserve.server.lifecycle import Lifecycle
from enserve.server.served.repository import (
    ENSEMBLE_PLATFORM,
    MEMBERS_OUTPUT,
    ONNX_PLATFORM,
    UNCERTAINTY_OUTPUTS,
    Repository,
    ensemble_config,
    member_config,
)
from enserve.server.served.table import ServedModel
from enserve.server.serving.limits import RequestLimits
from enserve.server.serving.registry import Registry
from enserve.server.serving.tensors import (
    RequestInput,
    RequestOutput,
    check_shm_outputs,
    prepare,
    select_outputs,
    write_shm_output,
)

EXTENSIONS = ["model_configuration", "system_shared_memory", "statistics", "binary_tensor_data"]
REQUEST_OBJECTIVE = "objective_ms"  # a request's parameter: its latency objective
MEMBERS_PARAMETER = "enserve_members"  # the answer's: the members it combined (comma-separated)


@dataclass
class OutputValue:
    request: RequestOutput
    datatype: str
    value: np.ndarray  # shaped (batch, *dims)


@dataclass
class PendingInfer:
    request: InflightRequest  # its future resolves to the model's outputs by name
    target: ServedModel
    wanted: list[RequestOutput]
    regions: ClientRegions | None
    orchestrator: Orchestrator

    def cancel(self) -> None:
        """The caller went away: its workers skip what they have not begun, its slot is free now."""
        self.orchestrator.cancel(self.request)

    async def outputs(self) -> list[OutputValue]:
        """Wait for the answer and return the values asked for; a cancelled wait (the call or the
        client went away) cancels the request too."""
        try:
            values = await self.future
        except asyncio.CancelledError:
            self.cancel()
            raise
        return self.finish(values)

    @property
    def future(self) -> asyncio.Future:
        return self.request.future

    def parameters(self) -> dict[str, str]:
        """The answer's parameters: with a latency objective, the members its answer combined."""
        used = self.request.used
        if self.request.objective_s is None or used is None:
            return {}
        return {MEMBERS_PARAMETER: ",".join(used)}

    def finish(self, values: dict[str, np.ndarray]) -> list[OutputValue]:
        specs = {t.name: t for t in self.target.outputs}
        result = []
        for out in self.wanted:
            value = values[out.name]
            if out.shm_region is not None:
                write_shm_output(out, value, self.regions)
            result.append(OutputValue(out, specs[out.name].datatype, value))
        return result


class Service:
    def __init__(self, registry: Registry, options: ServeOptions) -> None:
        self.registry = registry
        self.options = options
        self.regions = ClientRegions()
        self.lifecycle: Lifecycle = registry.lifecycle  # the server's: drained by a signal
        self.limits = RequestLimits.for_repository(registry.repo or Repository(options.model_repository), options)

    # ------------------------------------------------------------------ health and metadata

    def ready(self) -> bool:
        return self.lifecycle.accepting and all(o.not_ready(m) is None
                                      for o in self.registry.orchestrators() for m in o.models.values())

    def target(self, name: str, version: str = "") -> ServedModel:
        return self._lookup(name, version)[1]

    def _lookup(self, name: str, version: str = "") -> tuple[Orchestrator, ServedModel]:
        orchestrator, model = self.registry.lookup(name)
        if version not in ("", "1"):
            raise NotFound(f"model '{name}' has no version '{version}'; it has version '1'")
        return orchestrator, model

    def model_ready(self, name: str, version: str = "") -> bool:
        """Whether ``name`` can serve now; an unknown model or version is simply not ready (Triton)."""
        try:
            orchestrator, model = self._lookup(name, version)
        except NotFound:
            return False
        return self.lifecycle.accepting and orchestrator.not_ready(model) is None

    def server_metadata(self) -> dict:
        return {"name": "enserve", "version": __version__, "extensions": EXTENSIONS}

    def model_metadata(self, name: str, version: str = "") -> dict:
        t = self.target(name, version)

        def tensors(specs):
            return [{"name": s.name, "datatype": s.datatype, "shape": [-1, *s.dims]} for s in specs]

        platform = ENSEMBLE_PLATFORM if t.kind == "ensemble" else ONNX_PLATFORM
        return {"name": t.name, "versions": ["1"], "platform": platform,
                "inputs": tensors(t.inputs), "outputs": tensors(t.outputs)}

    def model_config(self, name: str, version: str = ""):
        """Triton's config of the model as it is served (a member's instances, batch size, cores)."""
        orchestrator, t = self._lookup(name, version)
        repo = orchestrator.repo
        if t.kind == "ensemble":
            return ensemble_config(repo.ensembles[name], repo.members)
        placement = orchestrator.placement
        group = placement.groups[placement.group_of(name)]
        cores = sorted({c for r in group.replicas for c in r.cores})
        return member_config(repo.members[name], devices=tuple(r.device for r in group.replicas),
                             batch_size=group.batch_size, queue_delay_us=group.queue_delay_us,
                             cpu_cores=tuple(cores) or None,
                             worker_group="+".join(group.members) if len(group.members) > 1 else None)

    def stats(self, name: str = "", version: str = ""):
        if name:
            orchestrator, model = self._lookup(name, version)
            return [orchestrator.stats[model.name]]
        return list(self.registry.stats().values())

    def index(self) -> list[dict]:
        return self.registry.index()

    async def load(self, name: str) -> None:
        self.registry.check_control()
        await self.registry.load(name)

    async def unload(self, name: str) -> None:
        self.registry.check_control()
        await self.registry.unload(name)

    # ------------------------------------------------------------------ inference

    async def infer(
        self,
        model: str,
        version: str,
        inputs: list[RequestInput],
        outputs: list[RequestOutput],
        timeout_s: float | None = None,
    ) -> list[OutputValue]:
        return await self.begin(model, version, inputs, outputs, timeout_s).outputs()

    def begin(self, model: str, version: str, inputs: list[RequestInput], outputs: list[RequestOutput],
              timeout_s: float | None = None, objective_s: float | None = None) -> PendingInfer:
        """Validate and submit a request without waiting: its future resolves to the model's outputs,
        which ``finish`` turns into the values asked for (errors are raised here or by the future).
        ``objective_s``: the request's latency objective (0: none; None: the model's or the server's)."""
        self.lifecycle.check_accepting()
        orchestrator, target = self._lookup(model, version)
        regions = self.regions if self.options.allow_client_shm else None
        arrays, batch = prepare(target, inputs, regions)
        wanted = select_outputs(target, outputs)
        check_shm_outputs(wanted, target, batch, regions)
        uncertainty = any(out.name in UNCERTAINTY_OUTPUTS for out in wanted)
        objective = self._objective(orchestrator, target, objective_s)
        members_output = any(out.name == MEMBERS_OUTPUT for out in wanted)
        request = orchestrator.submit(target, arrays, batch, timeout_s, uncertainty, objective, members_output)
        return PendingInfer(request, target, wanted, regions, orchestrator)

    def _objective(self, orchestrator: Orchestrator, target: ServedModel, given: float | None) -> float | None:
        """The request's latency objective in seconds: its own, else its model's, else the server's;
        None for a member, an ensemble without a front (one point: nothing to choose) or when there is
        none. One that even the front's cheapest point cannot meet is refused: the answer is due at
        ``ANSWER_AT`` of the objective, so that share must hold its members' measured time for one row."""
        if target.kind != "ensemble" or len(target.points) < 2:
            return None
        objective = given if given is not None else target.objective_s if target.objective_s is not None else \
            None if self.options.objective_ms is None else self.options.objective_ms / 1e3
        if not objective:
            return None
        floor_ns = orchestrator.cheapest_point_ns(target)
        if ANSWER_AT * objective * 1e9 < floor_ns:
            raise InvalidArgument(
                f"latency objective {objective * 1e3:g} ms is below what the cheapest point of the front of model "
                f"'{target.name}' needs for one row: {floor_ns / 1e6:.3g} ms measured (an answer is "
                f"due at {ANSWER_AT:.0%} of the objective)")
        return objective

    def flush(self) -> None:
        """Hand the descriptors of the requests submitted so far to the workers now."""
        for orchestrator in self.registry.orchestrators():
            orchestrator.dispatch.flush()

    # ------------------------------------------------------------------ client shared memory

    def _check_shm_allowed(self) -> None:
        if not self.options.allow_client_shm:
            raise Unavailable(
                "system shared memory is disabled on this server; start it with --allow-client-shm"
            )

    def shm_register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self._check_shm_allowed()
        self.regions.register(name, key, offset, byte_size)

    def shm_unregister(self, name: str = "") -> None:
        self._check_shm_allowed()
        self.regions.unregister(name or None)

    def shm_status(self, name: str = "") -> list:
        self._check_shm_allowed()
        return self.regions.status(name or None)


def cuda_shm_unavailable() -> Unavailable:
    return Unavailable(
        "CUDA shared memory is not available on this server: it needs an NVIDIA GPU with the CUDA "
        "runtime; use system shared memory (--allow-client-shm) instead"
    )


def parse_objective(value) -> float | None:
    """A request's 'objective_ms' parameter as seconds: None when absent, 0 for none (the model's
    own is not used either); a number of milliseconds otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{REQUEST_OBJECTIVE} '{value}' is not a number of milliseconds")
    try:
        seconds = float(value) / 1e3
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds) or value < 0:
        raise InvalidArgument(f"{REQUEST_OBJECTIVE} is {value}, but must be a finite number of milliseconds >= 0 "
                              "(0: none)")
    if value > 0 and seconds == 0:
        raise InvalidArgument(f"{REQUEST_OBJECTIVE} is {value}: too small to be a number of milliseconds")
    return seconds


def parse_timeout(value) -> float | None:
    """A client timeout in microseconds (Triton's 'timeout' parameter, an integer) as seconds; 0 or
    absent: none."""
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"timeout '{value}' is not an integer number of microseconds")
    if value < 0:
        raise InvalidArgument(f"timeout is {value} us, but must be >= 0")
    return value / 1e6
