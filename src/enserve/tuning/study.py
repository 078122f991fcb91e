"""The Optuna study the build runs: its storage (a journal file on one machine, an RDB URL across
machines), its sampler and pruner by name, each worker's sampler seed, and what it is doing."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from pathlib import Path

SAMPLERS = ("random", "tpe", "gp", "nsga2")
PRUNERS = ("asha", "hyperband", "none")


def make_storage(storage: str, attempts: int = 6):
    """An RDB URL (postgresql://..., sqlite:///...) opens an ``RDBStorage``; any other string is a
    journal file path. Builders that start on a fresh database at the same moment race to create
    its tables (optuna/optuna#1092: "duplicate key value violates unique constraint
    pg_type_typname_nsp_index"); the loser tries again and then finds them made."""
    import optuna
    import sqlalchemy.exc

    if "://" in storage:
        for attempt in range(attempts):
            try:
                return optuna.storages.RDBStorage(storage)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                if attempt == attempts - 1:
                    raise
                time.sleep(0.2 * 2**attempt)
    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage))


def make_sampler(name: str, seed: int | None):
    import optuna

    samplers = {"random": optuna.samplers.RandomSampler, "tpe": optuna.samplers.TPESampler,
                "gp": optuna.samplers.GPSampler, "nsga2": optuna.samplers.NSGAIISampler}
    if name not in samplers:
        raise ValueError(f"sampler '{name}' is not one of {SAMPLERS}")
    return samplers[name](seed=seed)


def make_pruner(name: str, max_epochs: int, min_epochs: int = 1):
    import optuna

    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_epochs, reduction_factor=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_epochs, max_resource=max_epochs, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"pruner '{name}' is not one of {PRUNERS}")


def sampler_seed(seed: int, index: int, storage: str) -> int:
    """The sampler's seed of worker ``index``: from ``seed`` and ``index`` alone when the study is
    this machine's (with one worker, the same seed gives the same trials); with an RDB shared by
    several machines also from the host and process, so that no two builders draw the same
    configurations (every machine runs with the same ``--seed``, which fixes the data split)."""
    if "://" not in storage:
        return seed * 1000 + index
    key = f"{seed}:{index}:{socket.gethostname()}:{os.getpid()}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


def default_storage(library: Path) -> str:
    """The study's journal file inside the library (without ``--storage``)."""
    return str(Path(library) / "study.journal")


def running_trials(storage: str, study_name: str = "enserve") -> int | None:
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=make_storage(storage))
    except Exception:  # not created yet, or the storage is busy: the progress line just omits it
        return None
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
