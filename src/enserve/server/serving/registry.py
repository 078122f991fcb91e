"""Model control: what the daemon serves, loaded and unloaded while the rest keeps serving.

The unit of loading is an ensemble with its members, or a member that no ensemble names. Each
loaded unit is one orchestrator with workers of its own, so loading one never touches another's
processes or shared memory, and a member two ensembles share runs in both (a member's own name
answers from the unit loaded first). Triton's modes: ``none`` loads everything at start and
refuses load/unload; ``explicit`` loads the ``--load-model`` names at start and obeys load and
unload calls; ``poll`` re-reads the repository periodically and follows it. Names in these calls
are names in the repository, never paths.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from enserve.server.config import MODEL_CONTROL_MODES, ServeOptions
from enserve.server.dataplane.orchestrator import Orchestrator
from enserve.server.dataplane.stats import ModelStats
from enserve.server.errors import (
    InvalidArgument,
    NotFound,
    RepositoryError,
    Unavailable,
    message_of,
)
from enserve.server.lifecycle import Lifecycle
from enserve.server.served.placement import Placement, describe
from enserve.server.served.repository import (
    Repository,
    check_model_name,
    load_repository,
    read_repository,
)
from enserve.server.served.table import ServedModel

log = logging.getLogger("enserve")
def check_name(name: str) -> str:
    """``name`` if it can only be a model name (``repository.check_model_name``); else INVALID_ARGUMENT."""
    try:
        return check_model_name(name)
    except RepositoryError as exc:
        raise InvalidArgument(exc.message) from None


def unit_names(repo: Repository) -> list[str]:
    """The loadable units of a repository: its ensembles, then the members no ensemble names."""
    named = {m for e in repo.ensembles.values() for m in e.members}
    return sorted(repo.ensembles) + sorted(set(repo.members) - named)


def unit_repository(repo: Repository, name: str) -> Repository:
    """The part of ``repo`` that unit ``name`` serves: an ensemble and its members, or one member."""
    if name in repo.ensembles:
        ensemble = repo.ensembles[name]
        return Repository(repo.path, {m: repo.members[m] for m in ensemble.members}, {name: ensemble})
    if name in repo.members:
        return Repository(repo.path, {name: repo.members[name]}, {})
    raise NotFound(f"unknown model '{name}': the repository {repo.path} has {unit_names(repo)}")


@dataclass(eq=False)
class Unit:
    name: str
    repo: Repository
    orchestrator: Orchestrator
    fingerprint: tuple  # what its files were when loaded (poll mode reloads on a change)


def fingerprint(repo: Repository) -> tuple:
    files = [m.path for m in repo.members.values()] + [repo.path / e for e in repo.ensembles]
    out = []
    for f in sorted(files):
        cfg = f / "config.pbtxt" if f.is_dir() else f
        try:
            st = cfg.stat()
            out.append((str(cfg), st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((str(cfg), None, None))
    return tuple(out)


class Registry:
    """Loaded units, and which unit answers each served model name."""

    def __init__(self, options: ServeOptions, place: Callable[[Repository], Placement],
                 lifecycle: Lifecycle | None = None) -> None:
        self.options = options
        self.lifecycle = lifecycle or Lifecycle()  # the server's; each unit's lives under it
        self.place = place  # the placement of a unit's sub-repository (plan, allocator or config)
        self.mode = options.model_control_mode
        if self.mode not in MODEL_CONTROL_MODES:
            raise ValueError(f"model control mode '{self.mode}' is not one of {MODEL_CONTROL_MODES}")
        self.units: dict[str, Unit] = {}
        self.models: dict[str, Unit] = {}
        self.lock = asyncio.Lock()  # one load or unload at a time
        self.repo: Repository | None = None
        self.retiring: set[asyncio.Task] = set()  # units draining: they finish even if their caller is cancelled
        self.skipped: dict[str, str] = {}  # poll mode: folders it could not follow, and why (said once)

    # ------------------------------------------------------------------ lookups

    def lookup(self, name: str) -> tuple[Orchestrator, ServedModel]:
        unit = self.models.get(name)
        if unit is None:
            raise NotFound(f"unknown model '{name}'; this server has {sorted(self.models)}")
        return unit.orchestrator, unit.orchestrator.models[name]

    def orchestrators(self) -> list[Orchestrator]:
        return [u.orchestrator for u in self.units.values()]

    def stats(self) -> dict[str, ModelStats]:
        return {name: unit.orchestrator.stats[name] for name, unit in self.models.items()}

    def queue_depth(self) -> dict[str, int]:
        return {name: unit.orchestrator.inflight[name] for name, unit in self.models.items()}

    def worker_tasks(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.orchestrators():
            for group, count in o.worker_tasks().items():
                out[group] = out.get(group, 0) + count
        return out

    def worker_pids(self) -> dict[str, list[int]]:
        return {group: pids for o in self.orchestrators() for group, pids in o.worker_pids().items()}

    def index(self) -> list[dict]:
        """Every model of the repository, loaded or not, with its state (Triton's repository index)."""
        repo = self.repo or Repository(self.options.model_repository)
        out = []
        for name in sorted(set(repo.members) | set(repo.ensembles) | set(self.models)):
            unit = self.models.get(name)
            if unit is None:
                out.append({"name": name, "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"})
                continue
            reason = unit.orchestrator.not_ready(unit.orchestrator.models[name])
            out.append({"name": name, "version": "1", "state": "READY" if reason is None else "UNAVAILABLE",
                        "reason": reason or ""})
        return out

    # ------------------------------------------------------------------ control

    def check_control(self) -> None:
        if self.mode != "explicit":
            raise Unavailable(f"explicit model load / unload is not allowed in model control mode '{self.mode}': "
                              "start the server with --model-control-mode explicit")

    async def start(self, load: tuple[str, ...] = ()) -> None:
        """The units to serve from the start: all of them, or in explicit mode the named ones ('*': all)."""
        self.repo = load_repository(self.options.model_repository)
        names = unit_names(self.repo) if self.mode != "explicit" or "*" in load else list(load)
        for name in names:
            await self.load(check_name(name), reread=False)

    async def load(self, name: str, reread: bool = True) -> None:
        """Start unit ``name`` (re-read from the repository) beside the serving ones and switch its
        names over to it; a unit loaded before under that name drains and stops after."""
        check_name(name)
        async with self.lock:
            if reread:
                self.repo = await asyncio.to_thread(load_repository, self.options.model_repository)
            sub = unit_repository(self.repo, name)
            placement = await asyncio.to_thread(self.place, sub)
            log.info("loading '%s':\n%s", name, describe(placement))
            orchestrator = Orchestrator(sub, placement, self.options, Lifecycle(self.lifecycle))
            try:
                await orchestrator.start()
            except BaseException:
                await orchestrator.close()
                raise
            unit = Unit(name, sub, orchestrator, fingerprint(sub))
            old = self.units.get(name)
            self.units[name] = unit
            for model in orchestrator.models:
                if model not in self.models or self.models[model] is old:
                    self.models[model] = unit
            log.info("loaded '%s': models %s, workers %s", name, sorted(orchestrator.models),
                     orchestrator.worker_pids())
            if old is not None:
                await self._retire(old)

    async def unload(self, name: str) -> None:
        """Stop serving unit ``name``: new requests get NOT_FOUND at once, those in flight finish."""
        check_name(name)
        async with self.lock:
            unit = self.units.pop(name, None)
            if unit is None:
                owners = sorted(u.name for u in self.units.values() if name in u.orchestrator.models)
                if owners:
                    raise InvalidArgument(f"model '{name}' is served as a member of {owners}: unload that "
                                          "ensemble (a member goes with its ensemble)")
                if self.repo is not None and name not in unit_names(self.repo) and name not in self.repo.members:
                    raise NotFound(f"unknown model '{name}': the repository has {unit_names(self.repo)}")
                return  # known but not loaded: nothing to do (as Triton)
            for model, owner in list(self.models.items()):
                if owner is unit:
                    successor = next((u for u in self.units.values() if model in u.orchestrator.models), None)
                    if successor is None:
                        del self.models[model]
                    else:
                        self.models[model] = successor
            log.info("unloading '%s': draining %d requests", name, len(unit.orchestrator.pending))
            await self._retire(unit)
            log.info("unloaded '%s'", name)

    async def _retire(self, unit: Unit) -> None:
        """Drain and stop a unit no name points to any more; shielded, so that a cancelled caller
        (a poll cut short by shutdown) cannot leave its workers or shared memory behind."""
        task = asyncio.ensure_future(unit.orchestrator.close())
        self.retiring.add(task)
        task.add_done_callback(self.retiring.discard)
        await asyncio.shield(task)

    async def poll(self) -> None:
        """Follow the repository: load new units, reload changed ones, unload removed ones. A folder
        that cannot be followed (a config that does not parse or names another model, a name that is
        not a model name, a member that fails to load) is skipped and reported once, and a unit
        loaded before keeps serving while its folder is broken; the others are still followed."""
        repo, problems = await asyncio.to_thread(read_repository, self.options.model_repository)
        self.repo = repo
        wanted = unit_names(repo)
        for name in [n for n in self.units if n not in wanted and n not in problems]:
            await self._follow(name, self.unload, problems)
        for name in wanted:
            unit = self.units.get(name)
            if unit is None or unit.fingerprint != fingerprint(unit_repository(repo, name)):
                await self._follow(name, functools.partial(self.load, reread=False), problems)
        for name, why in problems.items():
            if self.skipped.get(name) != why:
                log.error("repository poll: skipping '%s': %s", name, why)
        self.skipped = problems

    async def _follow(self, name: str, change: Callable[[str], Awaitable[None]], problems: dict[str, str]) -> None:
        """``change(name)``; what makes it fail goes into ``problems`` (one folder must not stop the others)."""
        try:
            await change(name)
        except Exception as exc:
            problems[name] = message_of(exc)

    async def poll_forever(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.poll()
            except Exception as exc:  # a broken repository edit must not stop the server
                log.error("repository poll failed: %s", message_of(exc))

    async def close(self, timeout_s: float | None = None) -> None:
        """Stop every unit, side by side, within ``timeout_s`` (see ``Orchestrator.close``)."""
        self.models.clear()
        units, self.units = list(self.units.values()), {}
        await asyncio.gather(*(u.orchestrator.close(timeout_s) for u in units), *self.retiring,
                             return_exceptions=True)
